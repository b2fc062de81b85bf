"""IJB scoring (evaluation/ijb_protocol.py) against float64 brute-force references written here:
per-template and per-pair Python loops, sklearn's ROC points walked one by one, and the 1:N
definitions (insightface ijb_1n.py closed set, NIST open set) spelled out per probe."""

import math
from fractions import Fraction

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from evaluation.ijb_protocol import (
    FARS,
    IJBProtocolError,
    UnknownTemplateError,
    describe_reachability,
    face_features,
    identification,
    pair_scores,
    tar_at_far,
    template_features,
)
from utils.errors import UserError


def random_faces(rng, n_templates=40, dim=16):
    """Faces of templates with random, gapped ids in shuffled order; media of 1-5 frames, some
    single-face templates, one all-zero face (an unreadable image)."""
    ids = rng.choice(np.arange(1, 10 * n_templates), n_templates, replace=False)
    templates, medias = [], []
    media_id = 1000
    for i, tid in enumerate(ids):
        n_media = 1 if i % 7 == 0 else int(rng.integers(1, 4))
        for _ in range(n_media):
            frames = 1 if i % 7 == 0 else int(rng.integers(1, 6))
            templates += [tid] * frames
            medias += [media_id] * frames
            media_id += int(rng.integers(1, 5))
    perm = rng.permutation(len(templates))
    templates, medias = np.array(templates)[perm], np.array(medias)[perm]
    raw = rng.standard_normal((len(templates), dim)).astype(np.float32) * rng.uniform(0.5, 3, (len(templates), 1))
    raw[3] = 0
    return raw.astype(np.float32), templates, medias


def brute_templates(feats, templates, medias):
    """The reference's loops, in float64: per template, per media: mean; sum; normalise."""
    out = {}
    for tid in sorted(set(templates.tolist())):
        total = np.zeros(feats.shape[1])
        for mid in sorted(set(medias[templates == tid].tolist())):
            rows = [feats[i].astype(np.float64) for i in range(len(templates))
                    if templates[i] == tid and medias[i] == mid]
            total += sum(rows) / len(rows)
        norm = math.sqrt(sum(v * v for v in total))
        out[tid] = total / norm if norm > 0 else total
    return out


def test_face_features_options_match_the_formula():
    raw = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, -1.0]], np.float32)
    faceness = np.array([0.5, 0.9, 2.0])
    np.testing.assert_array_equal(face_features(raw, faceness, detector_score=False, norm_score=True), raw)
    np.testing.assert_allclose(face_features(raw, faceness, True, True), [[1.5, 2.0], [0, 0], [2.0, -2.0]], atol=1e-15)
    s = 1 / math.sqrt(2)
    unit = [[0.6, 0.8], [0, 0], [s, -s]]
    np.testing.assert_allclose(face_features(raw, faceness, False, False), unit, atol=1e-15)
    got = face_features(raw, faceness, True, False)
    np.testing.assert_allclose(got, [[0.3, 0.4], [0, 0], [2 * s, -2 * s]], atol=1e-15)
    assert got.dtype == np.float64 and np.isfinite(got).all()
    assert raw[0, 0] == 3.0  # input untouched


def test_template_features_equal_the_per_template_loops():
    rng = np.random.default_rng(0)
    raw, templates, medias = random_faces(rng)
    feats = face_features(raw, rng.uniform(0.1, 1, len(raw)))
    want = brute_templates(feats, templates, medias)
    for chunk in (7, 1 << 16):  # runs split across aggregation chunks, and one chunk
        ids, tf = template_features(feats, templates, medias, chunk=chunk)
        assert ids.dtype == np.int64 and list(ids) == sorted(want)
        np.testing.assert_allclose(tf, np.stack([want[t] for t in ids]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("detector_score,norm_score", [(True, True), (True, False), (False, False), (False, True)])
def test_weighting_inside_the_chunks_equals_the_per_face_loop(detector_score, norm_score):
    """Raw float32 features weighted chunk by chunk (no N x D float64 copy) = weighting each face first."""
    rng = np.random.default_rng(2)
    raw, templates, medias = random_faces(rng)
    faceness = rng.uniform(0.1, 1, len(raw))
    before = raw.copy()
    weighted = []
    for i in range(len(raw)):  # the protocol per face, in float64: normalise (N0), times faceness (D1)
        f = raw[i].astype(np.float64)
        norm = math.sqrt(sum(v * v for v in f))
        if not norm_score:
            f = f / norm if norm > 0 else f
        weighted.append(f * faceness[i] if detector_score else f)
    want = brute_templates(np.array(weighted), templates, medias)
    eager = template_features(face_features(raw, faceness, detector_score, norm_score), templates, medias)
    for chunk in (1, 7, len(raw)):
        ids, tf = template_features(raw, templates, medias, chunk=chunk,
                                    faceness=faceness if detector_score else None, norm_score=norm_score)
        assert list(ids) == sorted(want) and list(ids) == list(eager[0])
        np.testing.assert_allclose(tf, np.stack([want[t] for t in ids]), rtol=0, atol=1e-12)
        np.testing.assert_allclose(tf, eager[1], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(raw, before)  # the caller's array untouched


def test_zero_template_stays_zero():
    feats = np.array([[0.0, 0.0], [1.0, 1.0]])
    ids, tf = template_features(feats, np.array([9, 4]), np.array([1, 2]))
    assert list(ids) == [4, 9]
    np.testing.assert_array_equal(tf[1], [0.0, 0.0])
    np.testing.assert_allclose(tf[0], [2 ** -0.5] * 2, atol=1e-15)


def test_pair_scores_equal_the_per_pair_loop():
    rng = np.random.default_rng(1)
    raw, templates, medias = random_faces(rng)
    ids, tf = template_features(face_features(raw, np.ones(len(raw))), templates, medias)
    t1, t2 = rng.choice(ids, 500), rng.choice(ids, 500)
    want = brute_templates(raw.astype(np.float64), templates, medias)
    loop = np.array([sum(a * b for a, b in zip(want[x], want[y])) for x, y in zip(t1, t2)])
    for chunk, tile, density in ((1, 8, math.inf), (37, 8, math.inf), (1 << 14, 8, 0.0), (64, 8, 0.5), (99, 1000, 0)):
        # all pairs gathered; all by tile products (small tiles / one tile); a mix of both
        got = pair_scores(ids, tf, t1, t2, chunk=chunk, tile=tile, min_density=density)
        np.testing.assert_allclose(got, loop, rtol=0, atol=1e-12)


def test_unknown_template_names_id_and_first_pair():
    ids = np.array([2, 5, 9])
    tf = np.eye(3)
    with pytest.raises(UnknownTemplateError) as err:
        pair_scores(ids, tf, np.array([2, 5, 5, 1]), np.array([9, 9, 7, 2]))
    assert err.value.template == 7 and err.value.index == 2
    assert "7" in str(err.value) and "pair 2" in str(err.value)
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)
    with pytest.raises(UnknownTemplateError) as err:  # past the largest id
        pair_scores(ids, tf, np.array([2, 10]), np.array([9, 2]))
    assert (err.value.template, err.value.index) == (10, 1)


def brute_tar(labels, scores, far):
    """Walk sklearn's ROC points: keep the nearest FPR; on an equal distance the higher TPR."""
    fpr, tpr, _ = roc_curve(labels, scores)
    best = None
    for f, t in zip(fpr, tpr):
        d = abs(f - far)
        if best is None or d < best[0] or (d == best[0] and t > best[1]):
            best = (d, t)
    return best[1]


def test_tar_at_far_matches_the_brute_force_rule():
    rng = np.random.default_rng(2)
    labels = np.r_[np.ones(300), np.zeros(3000)].astype(int)
    scores = np.where(labels == 1, rng.normal(0.6, 0.2, labels.size), rng.normal(0.0, 0.2, labels.size))
    scores = np.round(scores, 2)  # many ties in score
    got = tar_at_far(labels, scores)
    for far in FARS:
        assert got["tar_at_far"][far] == brute_tar(labels, scores, far)
        assert got["reachable"][far] == (3000 * far >= 1)
    assert got["n_negatives"] == 3000 and got["n_positives"] == 300 and 0.9 < got["auc"] <= 1


def test_tar_at_far_equidistant_points_take_the_highest_tpr():
    # 4 negatives: ROC FPRs 0, .25, .5, ...; FAR 0.125 is equally far from 0 and 0.25
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.5, 0.2, 0.1])
    fpr, tpr, _ = roc_curve(labels, scores)
    assert 0.0 in fpr and 0.25 in fpr
    got = tar_at_far(labels, scores, fars=(0.125,))
    assert got["fpr_at_far"][0.125] == 0.25
    assert got["tar_at_far"][0.125] == 0.75  # (fpr .25, tpr .75) beats (fpr 0, tpr .5)
    assert got["reachable"] == {0.125: False}  # 4 impostor pairs < 1 / 0.125
    assert tar_at_far(labels, scores, fars=(0.25,))["reachable"] == {0.25: True}
    assert "0.125" in describe_reachability(got) and "1/4" in describe_reachability(got)
    assert describe_reachability(tar_at_far(labels, scores, fars=(0.25,))) is None


def test_tar_at_far_rejects_one_class_and_nan():
    with pytest.raises(IJBProtocolError):
        tar_at_far(np.ones(4, int), np.arange(4.0))
    with pytest.raises(IJBProtocolError, match="pair 1"):
        tar_at_far(np.array([1, 0, 1]), np.array([0.1, np.nan, 0.3]))


def brute_identification(feats_of, probes, galleries, ranks, fpirs):
    """Per probe: score every gallery template, count; NIST thresholds by trying every score."""
    union = {}
    for rows in galleries.values():
        union.update(rows)
    out = {"rank": {}, "tpir": {}, "unmated": 0}
    ranks_seen = []
    for pt, ps in probes.items():
        mates = [t for t, s in union.items() if s == ps]
        if not mates:
            out["unmated"] += 1
            continue
        sc = {t: float(np.dot(feats_of[pt], feats_of[t])) for t in union}
        ranks_seen.append(1 + sum(1 for t in union if sc[t] > sc[mates[0]]))
    for k in ranks:
        out["rank"][k] = sum(r <= k for r in ranks_seen) / len(ranks_seen)
    for name, rows in galleries.items():
        nonmated_top1, mated = [], []
        for pt, ps in probes.items():
            sc = {t: float(np.dot(feats_of[pt], feats_of[t])) for t in rows}
            if ps in rows.values():
                mate = [t for t, s in rows.items() if s == ps][0]
                is_top = all(sc[t] <= sc[mate] for t in rows)
                mated.append((is_top, sc[mate]))
            else:
                nonmated_top1.append(max(sc.values()))
        for f in fpirs:
            allowed = Fraction(str(f)) * len(nonmated_top1)
            candidates = sorted(set(nonmated_top1)) + [math.inf]
            thr = -math.inf if len(nonmated_top1) <= allowed else min(
                t for t in candidates if sum(s > t for s in nonmated_top1) <= allowed)
            out["tpir"][(name, f)] = sum(top and s > thr for top, s in mated) / len(mated)
    return out


def test_identification_matches_the_per_probe_definitions():
    rng = np.random.default_rng(3)
    n_subj, dim = 60, 8
    centres = rng.standard_normal((n_subj, dim))
    tids = rng.choice(np.arange(100, 5000), 2 * n_subj + 10, replace=False)
    feats = np.empty((tids.size, dim))
    subj_of = {}
    for i, t in enumerate(tids):  # first n_subj: gallery templates; the rest probes (10 of unknown people)
        s = i % n_subj if i < 2 * n_subj else n_subj + i
        subj_of[t] = s
        base = centres[s] if s < n_subj else rng.standard_normal(dim)
        feats[i] = base + rng.normal(0, 1.0, dim)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    order = np.argsort(tids)
    ids, tf = tids[order], feats[order]
    gal_t = tids[:n_subj]
    g1 = {t: subj_of[t] for t in gal_t[:25]}
    g2 = {t: subj_of[t] for t in gal_t[25:]}
    probes = {t: subj_of[t] for t in tids[n_subj:]}

    def rows(d, repeat):  # per-face rows: each template repeated, shuffled
        t = np.repeat(np.array(list(d)), repeat)
        perm = rng.permutation(t.size)
        return t[perm], np.array([d[x] for x in t])[perm]

    galleries = {"G1": rows(g1, 3), "G2": rows(g2, 2)}
    got = identification(ids, tf, *rows(probes, 4), galleries, ranks=(1, 5, 10), fpirs=(0.01, 0.1, 0.3))
    want = brute_identification(dict(zip(ids, tf)), probes, {"G1": g1, "G2": g2}, (1, 5, 10), (0.01, 0.1, 0.3))
    assert got["probes"] == 70 and got["unmated_probes"] == want["unmated"] == 10
    assert got["gallery_templates"] == 60
    assert got["mated"] == {"G1": 25, "G2": 35} and got["nonmated"] == {"G1": 45, "G2": 35}
    for k in (1, 5, 10):
        assert got["rank"][k] == pytest.approx(want["rank"][k], abs=1e-15)
    assert 0 < got["rank"][1] < got["rank"][10] <= 1
    for name in ("G1", "G2"):
        for f in (0.01, 0.1, 0.3):
            assert got["tpir_at_fpir"][name][f] == pytest.approx(want["tpir"][(name, f)], abs=1e-15)
    nm = sorted((max(float(np.dot(dict(zip(ids, tf))[p], dict(zip(ids, tf))[t])) for t in g1)
                 for p, s in probes.items() if s not in g1.values()), reverse=True)
    assert got["thresholds"]["G1"][0.01] == pytest.approx(nm[0], abs=1e-15)  # floor(.45) = 0 above T
    assert got["thresholds"]["G1"][0.1] == pytest.approx(nm[4], abs=1e-15)  # floor(4.5) = 4 above T


def test_identification_rejects_a_subject_with_two_templates_and_unknown_probes():
    ids, tf = np.array([1, 2, 3]), np.eye(3)
    with pytest.raises(IJBProtocolError, match="subject 7"):
        identification(ids, tf, np.array([3]), np.array([7]), {"G1": (np.array([1]), np.array([7])),
                                                               "G2": (np.array([2]), np.array([7]))})
    with pytest.raises(UnknownTemplateError, match="probe row 2") as err:  # the row as given, not after merging
        identification(ids, tf, np.array([3, 3, 4]), np.array([7, 7, 7]), {"G1": (np.array([1]), np.array([7]))})
    assert (err.value.template, err.value.index, err.value.source) == (4, 2, "probe")
    with pytest.raises(UnknownTemplateError, match="G2 row 1"):
        identification(ids, tf, np.array([3]), np.array([7]), {"G1": (np.array([1]), np.array([7])),
                                                               "G2": (np.array([2, 8]), np.array([5, 5]))})
