"""evaluation.protocol against the published protocol written plainly (a loop over thresholds)."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold

from evaluation.protocol import (
    evaluate_embeddings,
    evaluate_pairs,
    kfold_accuracy,
    pair_distances,
    roc_curve,
    threshold_at_far,
)

GRID = np.arange(0, 4, 0.01)
FINE_GRID = np.arange(0, 4, 0.001)


# ---- independent references -------------------------------------------------------------------


def reference_accuracy(dist, issame, nfolds=10):
    """The published calculate_roc accuracy part: loop over 400 thresholds per fold."""

    def accuracy(threshold, d, s):
        predict = np.less(d, threshold)
        tp = np.sum(np.logical_and(predict, s))
        tn = np.sum(np.logical_and(np.logical_not(predict), np.logical_not(s)))
        return float(tp + tn) / d.size

    accs, thrs = [], []
    for train, test in KFold(n_splits=nfolds, shuffle=False).split(np.arange(len(dist))):
        acc_train = np.array([accuracy(t, dist[train], issame[train]) for t in GRID])
        best = np.argmax(acc_train)
        thrs.append(GRID[best])
        accs.append(accuracy(GRID[best], dist[test], issame[test]))
    return np.array(accs), np.array(thrs)


def random_pairs(n, rng, dim=64):
    """Normalised float32 embeddings (2n, dim) where same pairs are closer, plus labels."""
    a = rng.standard_normal((n, dim)).astype(np.float32)
    noise = rng.standard_normal((n, dim)).astype(np.float32)
    issame = rng.random(n) < 0.5
    b = np.where(issame[:, None], a + 2.5 * noise, noise)
    emb = np.empty((2 * n, dim), np.float32)
    emb[0::2], emb[1::2] = a, b
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb, issame


# ---- k-fold accuracy ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [600, 613])
def test_random_embeddings_match_reference_exactly(n):
    emb, issame = random_pairs(n, np.random.default_rng(n))
    dist_ref = np.sum(np.square(emb[0::2] - emb[1::2]), 1)
    acc_ref, thr_ref = reference_accuracy(dist_ref, issame)
    assert 0.6 < acc_ref.mean() < 0.99  # informative: neither chance nor perfect
    result = evaluate_embeddings(emb, issame)
    np.testing.assert_array_equal(result.fold_accuracies, acc_ref)
    np.testing.assert_array_equal(result.fold_thresholds, thr_ref)
    assert result.accuracy == np.mean(acc_ref)
    assert result.accuracy_std == np.std(acc_ref)
    assert result.best_threshold == np.mean(thr_ref)


def test_pair_distances_hand_computed():
    # orthogonal unit vectors: |a - b|^2 = 2; opposite: 4; identical: 0; 60 degrees apart: 2 - 2 cos 60 = 1
    a = np.array([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [1.0, 0.0]])
    b = np.array([[0.0, 1.0], [-1.0, 0.0], [0.6, 0.8], [0.5, np.sqrt(3) / 2]])
    np.testing.assert_allclose(pair_distances(a, b), [2.0, 4.0, 0.0, 1.0], atol=1e-15)


def test_pair_distances_keep_embedding_dtype():
    """float32 embeddings give float32 distances (as the published code), within float32 rounding of a
    plain float64 loop over the components."""
    emb, _ = random_pairs(20, np.random.default_rng(1))
    d = pair_distances(emb[0::2], emb[1::2])
    assert d.dtype == np.float32
    for i in range(20):
        exact = 0.0
        for x, y in zip(emb[2 * i].tolist(), emb[2 * i + 1].tolist()):
            exact += (x - y) ** 2
        assert d[i] == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ties_on_grid_thresholds_and_duplicates(dtype):
    rng = np.random.default_rng(3)
    n = 400
    # distances exactly on grid values (0.5, 1.0, 1.3, ...) and many exact duplicates
    on_grid = GRID[rng.choice([29, 50, 57, 100, 101, 130], size=n)].astype(dtype)
    issame = rng.random(n) < 0.5
    dist = np.where(rng.random(n) < 0.7, on_grid, rng.choice(on_grid[:20], size=n)).astype(dtype)
    acc_ref, thr_ref = reference_accuracy(dist, issame)
    acc, thr = kfold_accuracy(dist, issame)
    np.testing.assert_array_equal(acc, acc_ref)
    np.testing.assert_array_equal(thr, thr_ref)


def test_flat_accuracy_takes_first_maximum():
    # every threshold in (0.5, 1.0] separates perfectly: the first, 0.51, must win
    dist = np.array([0.5] * 10 + [1.0] * 10)
    issame = np.array([True] * 10 + [False] * 10)
    order = np.random.default_rng(0).permutation(20)
    acc, thr = kfold_accuracy(dist[order], issame[order])
    np.testing.assert_array_equal(thr, np.full(10, GRID[51]))
    np.testing.assert_array_equal(acc, np.ones(10))


def test_single_label_folds_match_reference():
    rng = np.random.default_rng(5)
    n = 203
    dist = rng.uniform(0, 3, n)
    issame = dist + rng.normal(0, 0.5, n) < 1.5
    issame[:21] = True  # fold 0 all same
    issame[21:42] = False  # fold 1 all different
    result = evaluate_pairs(dist, issame)
    acc_ref, thr_ref = reference_accuracy(dist, issame)
    np.testing.assert_array_equal(result.fold_accuracies, acc_ref)
    np.testing.assert_array_equal(result.fold_thresholds, thr_ref)
    assert 0 <= result.val <= 1 and 0 <= result.far <= 1


@pytest.mark.parametrize("label", [True, False])
def test_single_label_dataset(label):
    dist = np.random.default_rng(6).uniform(0, 3, 50)
    issame = np.full(50, label)
    result = evaluate_pairs(dist, issame)
    acc_ref, thr_ref = reference_accuracy(dist, issame)
    np.testing.assert_array_equal(result.fold_accuracies, acc_ref)
    np.testing.assert_array_equal(result.fold_thresholds, thr_ref)
    assert np.isnan(result.auc) and np.isnan(result.eer) and result.fpr.size == 0
    json.dumps(result.to_dict(), allow_nan=False)


def test_fewer_pairs_than_folds_is_an_error():
    with pytest.raises(ValueError, match="at least nfolds=10 pairs"):
        evaluate_pairs(np.ones(9), np.ones(9, bool))


def test_embedding_rows_must_pair_with_labels():
    with pytest.raises(ValueError, match="expected"):
        evaluate_embeddings(np.zeros((21, 4)), np.ones(10, bool))


# ---- VAL @ FAR (fold-wise) ----------------------------------------------------------------------


def spread_pairs(rng):
    """Different pairs in every 0.001 cell of [0, 4) twice over (in two different folds), so every
    9-fold training FAR curve strictly increases: no repeated FAR values. Same pairs are close."""
    cells = np.arange(4000)
    diff = np.r_[cells, cells] * 0.001 + rng.uniform(0.0002, 0.0008, 8000)
    fold_of_diff = np.r_[cells % 10, (cells + 1) % 10]
    same = rng.exponential(0.005, 2000)
    fold_of_same = np.arange(2000) % 10
    dist = np.r_[diff, same]
    issame = np.r_[np.zeros(8000, bool), np.ones(2000, bool)]
    order = np.lexsort((rng.random(10000), np.r_[fold_of_diff, fold_of_same]))  # group by fold
    return dist[order], issame[order]


def reference_val_far(dist, issame, target=1e-3):
    """The published calculate_val written plainly: the training FAR at each of the 4000 thresholds, one at a
    time, then the threshold where that (strictly increasing) curve reaches ``target``, interpolated linearly
    between the two grid thresholds around it."""
    vals, fars = [], []
    for train, test in KFold(n_splits=10, shuffle=False).split(np.arange(len(dist))):
        d_diff = dist[train][~issame[train]]
        far_train = [np.count_nonzero(d_diff < t) / d_diff.size for t in FINE_GRID]
        assert all(lo < hi for lo, hi in zip(far_train, far_train[1:]))
        threshold = 0.0
        for j in range(len(FINE_GRID) - 1):
            if far_train[j] <= target < far_train[j + 1]:
                w = (target - far_train[j]) / (far_train[j + 1] - far_train[j])
                threshold = FINE_GRID[j] + w * (FINE_GRID[j + 1] - FINE_GRID[j])
                break
        accepted = dist[test] < threshold
        vals.append(np.sum(accepted & issame[test]) / np.sum(issame[test]))
        fars.append(np.sum(accepted & ~issame[test]) / np.sum(~issame[test]))
    return np.mean(vals), np.std(vals), np.mean(fars)


def test_val_far_matches_direct_computation():
    dist, issame = spread_pairs(np.random.default_rng(7))
    result = evaluate_pairs(dist, issame)
    val, val_std, far = reference_val_far(dist, issame)
    assert result.val == pytest.approx(val, abs=1e-12)
    assert result.val_std == pytest.approx(val_std, abs=1e-12)
    assert result.far == pytest.approx(far, abs=1e-12)
    assert 0 < result.val < 1 and 0 < result.far < 0.01


def test_val_far_matches_scipy_slinear_without_repeats():
    interpolate = pytest.importorskip("scipy.interpolate")
    far = np.sort(np.random.default_rng(8).uniform(0, 0.01, 4000))
    f = interpolate.interp1d(far, FINE_GRID, kind="slinear")
    for target in (1e-3, 5e-3, far[17]):
        assert threshold_at_far(far, FINE_GRID, target) == pytest.approx(float(f(target)), abs=1e-12)


def test_threshold_at_far_with_repeated_far_values():
    far = np.array([0.0, 0.1, 0.1, 0.1, 0.3, 0.3, 0.5])
    thr = np.arange(7.0)
    assert threshold_at_far(far, thr, 0.1) == 3.0  # exact hit: largest threshold with that FAR
    assert threshold_at_far(far, thr, 0.2) == 3.5  # between last 0.1 (3) and first 0.3 (4)
    assert threshold_at_far(far, thr, 0.05) == 0.5
    assert threshold_at_far(far, thr, 0.5) == 6.0


def test_repeated_far_values_do_not_crash():
    rng = np.random.default_rng(9)
    n = 600  # few different pairs: training FAR curves are step functions with long flat runs
    issame = rng.random(n) < 0.5
    dist = np.where(issame, rng.uniform(0, 1.2, n), rng.uniform(0.9, 3, n)).round(2)
    result = evaluate_pairs(dist, issame)
    assert 0 <= result.val <= 1 and 0 <= result.far <= 1 and 0 <= result.val_std <= 1


# ---- all-pairs ROC metrics ----------------------------------------------------------------------


def test_tar_at_far_matches_direct_computation():
    rng = np.random.default_rng(10)
    n = 3000
    issame = rng.random(n) < 0.5
    dist = np.where(issame, rng.normal(1.0, 0.25, n), rng.normal(1.8, 0.2, n)).round(3)  # with ties
    result = evaluate_pairs(dist, issame)
    for target in (1e-4, 1e-3, 1e-2):
        best_tar = 0.0  # "accept nothing" always has FAR 0
        for d in np.unique(dist):
            accepted = dist <= d
            if np.mean(accepted[~issame]) <= target:
                best_tar = np.mean(accepted[issame])
        assert result.tar_at_far[target] == pytest.approx(best_tar, abs=1e-15)
    assert result.auc == pytest.approx(roc_auc_score(issame, -dist), abs=1e-12)


def test_eer_interpolates_the_crossing():
    # sorted by distance: S D D S D -> ROC (0,0) (0,.5) (1/3,.5) (2/3,.5) (2/3,1) (1,1)
    dist = np.array([0.1, 0.2, 0.3, 0.4, 0.5] * 2)
    issame = np.array([True, False, False, True, False] * 2)
    result = evaluate_pairs(dist, issame)
    assert result.eer == pytest.approx(0.5)
    separable = evaluate_pairs(np.r_[np.full(10, 0.2), np.full(10, 1.5)], np.r_[np.ones(10), np.zeros(10)])
    assert separable.eer == 0.0 and separable.auc == 1.0


def test_roc_curve_points():
    fpr, tpr, thr = roc_curve(np.array([0.3, 0.1, 0.3, 0.2]), np.array([False, True, True, False]))
    np.testing.assert_array_equal(thr, [-np.inf, 0.1, 0.2, 0.3])
    np.testing.assert_array_equal(fpr, [0, 0, 0.5, 1])
    np.testing.assert_array_equal(tpr, [0, 0.5, 0.5, 1])


def test_to_dict_is_strict_json():
    emb, issame = random_pairs(100, np.random.default_rng(11))
    d = json.loads(json.dumps(evaluate_embeddings(emb, issame).to_dict(), allow_nan=False))
    assert set(d["tar_at_far"]) == {"0.0001", "0.001", "0.01"}
    assert len(d["fold_accuracies"]) == 10 and len(d["fpr"]) == len(d["tpr"])
    assert 0 <= d["accuracy"] <= 1


def test_label_warning_names_a_one_label_set():
    from data.bins import label_warning

    assert label_warning([True] * 20) == "all 20 pairs are 'same'"
    assert label_warning(np.zeros(20, np.int64)) == "all 20 pairs are 'different'"
    assert label_warning([True, False] * 10) is None and label_warning([]) is None


def test_result_carries_the_warning_into_its_dict():
    rng = np.random.default_rng(0)
    dist = rng.uniform(0, 4, 20)
    all_same = evaluate_pairs(dist, np.ones(20, bool))
    assert all_same.warning == "all 20 pairs are 'same'" and all_same.to_dict()["warning"] == all_same.warning
    mixed = evaluate_pairs(dist, np.arange(20) % 2 == 0)
    assert mixed.warning is None and mixed.to_dict()["warning"] is None
