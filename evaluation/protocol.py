"""Pair verification metrics: the standard 10-fold protocol (LFW, CFP-FP, AgeDB-30, ...), vectorised.

The fold accuracies and thresholds are exactly those of the published loop over thresholds
(insightface ``eval/verification.py``, itself from facenet) run on the same embeddings with
NumPy >= 2, but every threshold is scored at once from integer counts (``np.bincount`` +
``np.cumsum``), so ties resolve identically and a 6000-pair benchmark takes milliseconds.

Conventions used throughout:

- distance = squared L2 between the two embeddings of a pair (0..4 for unit vectors);
  a pair is predicted "same" when ``distance < threshold`` (strict).
- every accuracy, VAL, FAR, TAR, AUC and EER is a fraction in 0..1, never a percentage;
  the command line turns them into %.
- threshold comparisons are made in float64. That is what NumPy >= 2 does in the published
  loop, whose thresholds are float64 scalars, also for float32 distances (NumPy 1.x compared
  those in float32, which can move a pair lying within float32 rounding of a grid threshold).
- a NaN distance is never accepted as "same", at any threshold (as ``np.less`` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.bins import label_warning

ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)  # 0.00 .. 3.99, 400 values
VAL_THRESHOLDS = np.arange(0, 4, 0.001)  # 0.000 .. 3.999, 4000 values
VAL_FAR_TARGET = 1e-3
TAR_FAR_TARGETS = (1e-4, 1e-3, 1e-2)


@dataclass(eq=False)
class VerificationResult:
    """Everything one verification set reports. All rates are fractions in 0..1.

    accuracy, accuracy_std: mean and population std (ddof=0) of ``fold_accuracies``.
    fold_thresholds: per fold, the distance threshold chosen on the other folds;
        ``best_threshold`` is their mean.
    val, val_std, far: fold-wise VAL (true accept rate) at the threshold where the training folds
        reach FAR = ``far_target`` (1e-3), and the mean FAR that threshold gives on the held-out
        folds. A fold without same (different) pairs has no VAL (FAR) and is left out of the mean;
        NaN when no fold has one.
    tar_at_far: over ALL pairs, not fold-wise: {far_target: TAR}. Pairs with distance <= d are
        accepted; d runs over the observed distances (and "accept nothing"); the TAR reported is
        the one at the largest d whose FAR <= far_target.
    auc, eer: area under, and equal error rate of, the all-pairs ROC (similarity = -distance);
        the EER is linearly interpolated where FPR = 1 - TPR.
    fpr, tpr: the all-pairs ROC, one point per distinct distance, starting at (0, 0).
    xnorm: mean L2 norm of the raw (un-normalised, un-flipped) embeddings, insightface's
        "XNorm"; set by the caller that still has them (NaN when unknown). A collapsing or
        exploding norm is an early sign of a broken run.
    Without both same and different pairs the all-pairs metrics are NaN and the ROC is empty.
    warning: set (e.g. "all 20 pairs are 'same'") when every pair has one label: the accuracy
        then reads ~100% for a threshold that accepts (or rejects) nearly everything, whatever the model;
        None otherwise.
    """

    accuracy: float
    accuracy_std: float
    fold_accuracies: np.ndarray
    fold_thresholds: np.ndarray
    best_threshold: float
    val: float
    val_std: float
    far: float
    far_target: float
    tar_at_far: dict[float, float]
    auc: float
    eer: float
    num_pairs: int
    fpr: np.ndarray
    tpr: np.ndarray
    xnorm: float = float("nan")
    warning: str | None = None

    def to_dict(self, include_roc: bool = True) -> dict:
        """JSON-ready copy: arrays become lists, NaN becomes None, ``tar_at_far`` keys become
        strings ("0.0001"). ``include_roc=False`` drops the (long) fpr/tpr lists."""
        out = {
            "accuracy": _num(self.accuracy),
            "accuracy_std": _num(self.accuracy_std),
            "fold_accuracies": [_num(a) for a in self.fold_accuracies],
            "fold_thresholds": [_num(t) for t in self.fold_thresholds],
            "best_threshold": _num(self.best_threshold),
            "val": _num(self.val),
            "val_std": _num(self.val_std),
            "far": _num(self.far),
            "far_target": _num(self.far_target),
            "tar_at_far": {f"{k:g}": _num(v) for k, v in self.tar_at_far.items()},
            "auc": _num(self.auc),
            "eer": _num(self.eer),
            "num_pairs": int(self.num_pairs),
            "xnorm": _num(self.xnorm),
            "warning": self.warning,
        }
        if include_roc:
            out["fpr"] = [float(x) for x in self.fpr]
            out["tpr"] = [float(x) for x in self.tpr]
        return out


def _num(x) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def _fold_sizes(n: int, nfolds: int) -> np.ndarray:
    if nfolds < 2:
        raise ValueError(f"nfolds={nfolds}: k-fold verification needs nfolds >= 2")
    if n < nfolds:
        raise ValueError(f"{n} pairs: {nfolds}-fold verification needs at least nfolds={nfolds} pairs")
    sizes = np.full(nfolds, n // nfolds, dtype=np.intp)
    sizes[: n % nfolds] += 1
    return sizes


def pair_distances(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    """Squared L2 distance per row, ``sum(square(emb1 - emb2), axis=1)`` in the embeddings' own
    dtype, exactly as the published code computes it: float32 and float64 sums can differ in
    the last bit, enough to move a pair across a threshold."""
    emb1, emb2 = np.asarray(emb1), np.asarray(emb2)
    if emb1.ndim != 2 or emb1.shape != emb2.shape:
        raise ValueError(f"pair_distances: need two (N, D) arrays of one shape, got {emb1.shape} and {emb2.shape}")
    return np.sum(np.square(np.subtract(emb1, emb2)), axis=1)


def _check_pairs(distances, issame, nfolds: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 distances, bool labels and the fold id of every pair (validated)."""
    dist = np.asarray(distances)
    same = np.asarray(issame)
    if dist.ndim != 1 or same.shape != dist.shape:
        raise ValueError(f"need 1-D distances and issame of one length, got shapes {dist.shape} and {same.shape}")
    if same.dtype != bool:
        if not np.isin(same, (0, 1)).all():
            raise ValueError("issame must hold booleans (or 0/1)")
        same = same.astype(bool)
    fold_id = np.repeat(np.arange(nfolds), _fold_sizes(dist.size, nfolds))
    return dist.astype(np.float64), same, fold_id


def _counts_below(dist: np.ndarray, same: np.ndarray, fold_id: np.ndarray, nfolds: int, thresholds: np.ndarray):
    """counts[k, c, j] = pairs of fold k with label c (0 different, 1 same) and dist < thresholds[j].

    A pair is counted from the first threshold strictly above its distance onwards, so one
    histogram of those first indices plus a cumulative sum gives every threshold at once.
    """
    nt = thresholds.size
    first = np.searchsorted(thresholds, dist, side="right")  # NaN -> nt: never counted
    cell = (fold_id * 2 + same) * (nt + 1) + first
    hist = np.bincount(cell, minlength=nfolds * 2 * (nt + 1)).reshape(nfolds, 2, nt + 1)
    return np.cumsum(hist, axis=2)[:, :, :nt]


def _label_counts(same: np.ndarray, fold_id: np.ndarray, nfolds: int) -> np.ndarray:
    """(nfolds, 2): number of different (column 0) and same (column 1) pairs in each fold."""
    return np.bincount(fold_id * 2 + same, minlength=nfolds * 2).reshape(nfolds, 2)


def kfold_accuracy(distances: np.ndarray, issame: np.ndarray, nfolds: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Per-fold accuracy (fraction 0..1) and threshold of the k-fold protocol.

    For each fold, the threshold of ``ACCURACY_THRESHOLDS`` with the best accuracy on the other
    folds (the first one on ties, as ``np.argmax``), then the accuracy of the held-out fold at it.
    Accuracies are compared as integer counts of correct pairs, which orders thresholds exactly as
    the published float accuracies do.
    """
    dist, same, fold_id = _check_pairs(distances, issame, nfolds)
    thresholds = ACCURACY_THRESHOLDS
    below = _counts_below(dist, same, fold_id, nfolds, thresholds)  # (K, 2, T)
    n_label = _label_counts(same, fold_id, nfolds)  # (K, 2)
    train_below = below.sum(axis=0) - below
    train_n = n_label.sum(axis=0) - n_label
    # correct = same pairs accepted + different pairs rejected
    train_correct = train_below[:, 1] + (train_n[:, 0, None] - train_below[:, 0])
    best = np.argmax(train_correct, axis=1)
    folds = np.arange(nfolds)
    test_correct = below[folds, 1, best] + n_label[:, 0] - below[folds, 0, best]
    return test_correct / n_label.sum(axis=1), thresholds[best]


def threshold_at_far(far: np.ndarray, thresholds: np.ndarray, target: float) -> float:
    """The threshold at which a non-decreasing FAR curve reaches ``target``, by linear interpolation.

    Rule (what insightface's ``interp1d(far, thresholds, kind='slinear')`` computed before SciPy
    began rejecting repeated x): the curve joins the points (far[j], thresholds[j]) in threshold
    order, so a run of equal FARs is a vertical step. If ``target`` equals a FAR of the curve, the
    largest threshold with that FAR; otherwise, between the last threshold below the target and
    the next threshold (the first with the higher FAR), linearly in FAR. Requires
    far[0] <= target <= far[-1].
    """
    far = np.asarray(far, dtype=np.float64)
    if not far[0] <= target <= far[-1]:
        raise ValueError(f"FAR target {target} outside the curve's range [{far[0]}, {far[-1]}]")
    hi = int(np.searchsorted(far, target, side="right"))  # first index with FAR > target
    if hi == far.size:  # target is the top FAR
        return float(thresholds[-1])
    # on an exact hit (far[hi - 1] == target) this returns thresholds[hi - 1]
    return float(np.interp(target, far[[hi - 1, hi]], thresholds[[hi - 1, hi]]))


def _val_far(dist, same, fold_id, nfolds: int, far_target: float) -> tuple[float, float, float]:
    """Fold-wise VAL mean, VAL std (ddof=0) and FAR mean at ``far_target`` (see VerificationResult)."""
    below = _counts_below(dist, same, fold_id, nfolds, VAL_THRESHOLDS)[:, 0]  # different pairs only
    n_label = _label_counts(same, fold_id, nfolds)
    train_fa = below.sum(axis=0) - below  # (K, T)
    train_ndiff = n_label[:, 0].sum() - n_label[:, 0]
    vals = np.full(nfolds, np.nan)
    fars = np.full(nfolds, np.nan)
    for k in range(nfolds):
        # no different pairs to train on: FAR is 0 everywhere (the published code divides by zero)
        far_train = train_fa[k] / train_ndiff[k] if train_ndiff[k] else np.zeros(VAL_THRESHOLDS.size)
        if far_train.max() >= far_target:
            threshold = threshold_at_far(far_train, VAL_THRESHOLDS, far_target)
        else:
            threshold = 0.0
        test = fold_id == k
        accepted = dist[test] < threshold
        n_diff, n_same = n_label[k]
        if n_same:
            vals[k] = np.count_nonzero(accepted & same[test]) / n_same
        if n_diff:
            fars[k] = np.count_nonzero(accepted & ~same[test]) / n_diff
    defined = vals[~np.isnan(vals)]
    val = float(np.mean(defined)) if defined.size else np.nan
    val_std = float(np.std(defined)) if defined.size else np.nan
    defined_far = fars[~np.isnan(fars)]
    return val, val_std, float(np.mean(defined_far)) if defined_far.size else np.nan


def roc_curve(distances: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All-pairs ROC: (fpr, tpr, thresholds) where pairs with distance <= thresholds[i] are accepted.

    One point per distinct distance in increasing order, after a first point (0, 0) at threshold
    -inf. NaN distances count as +inf. Empty arrays if there are no same or no different pairs.
    """
    dist = np.asarray(distances, dtype=np.float64)
    same = np.asarray(issame, dtype=bool)
    n_pos = int(np.count_nonzero(same))
    n_neg = same.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.empty(0), np.empty(0), np.empty(0)
    dist = np.where(np.isnan(dist), np.inf, dist)
    order = np.argsort(dist, kind="stable")
    d, s = dist[order], same[order]
    last = np.flatnonzero(np.r_[d[1:] != d[:-1], True])  # last pair of each distinct distance
    tp = np.r_[0, np.cumsum(s)[last]]
    fp = np.r_[0, np.cumsum(~s)[last]]
    return fp / n_neg, tp / n_pos, np.r_[-np.inf, d[last]]


def _eer(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """FPR where the ROC polyline crosses FPR = 1 - TPR (= FNR)."""
    gap = fpr + tpr - 1.0  # -1 at (0, 0), +1 at (1, 1), non-decreasing along the curve
    i = int(np.argmax(gap >= 0))
    if gap[i] == 0 or i == 0:
        return float(fpr[i])
    w = -gap[i - 1] / (gap[i] - gap[i - 1])
    return float(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]))


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, far_target: float) -> float:
    """TAR of an all-pairs ROC (from ``roc_curve``) at the largest threshold whose FAR <= far_target."""
    if fpr.size == 0:
        return np.nan
    return float(tpr[np.searchsorted(fpr, far_target, side="right") - 1])


def evaluate_pairs(distances: np.ndarray, issame: np.ndarray, nfolds: int = 10) -> VerificationResult:
    """Full verification report from per-pair squared L2 distances and same/different labels.

    Rates are fractions 0..1. Raises ValueError for fewer than ``nfolds`` pairs.
    """
    dist, same, fold_id = _check_pairs(distances, issame, nfolds)
    fold_acc, fold_thr = kfold_accuracy(dist, same, nfolds)
    val, val_std, far = _val_far(dist, same, fold_id, nfolds, VAL_FAR_TARGET)
    fpr, tpr, _ = roc_curve(dist, same)
    has_roc = fpr.size > 0
    return VerificationResult(
        accuracy=float(np.mean(fold_acc)),
        accuracy_std=float(np.std(fold_acc)),
        fold_accuracies=fold_acc,
        fold_thresholds=fold_thr,
        best_threshold=float(np.mean(fold_thr)),
        val=val,
        val_std=val_std,
        far=far,
        far_target=VAL_FAR_TARGET,
        tar_at_far={t: tar_at_far(fpr, tpr, t) for t in TAR_FAR_TARGETS},
        auc=float(np.trapezoid(tpr, fpr)) if has_roc else np.nan,
        eer=_eer(fpr, tpr) if has_roc else np.nan,
        num_pairs=int(dist.size),
        fpr=fpr,
        tpr=tpr,
        warning=label_warning(same),
    )


def evaluate_embeddings(embeddings: np.ndarray, issame: np.ndarray, nfolds: int = 10) -> VerificationResult:
    """Verification report for embeddings of shape (2N, D): pair i is rows 2i and 2i+1, ``issame``
    has shape (N,). The embeddings must already be L2-normalised by the caller (in the standard
    protocol: normalise(e(x) + e(flip x))); distances are computed in their own dtype."""
    emb = np.asarray(embeddings)
    same = np.asarray(issame)
    if emb.ndim != 2 or emb.shape[0] != 2 * same.shape[0]:
        raise ValueError(
            f"embeddings of shape {emb.shape} for {same.shape[0]} pairs: expected (2 * {same.shape[0]}, D), "
            "pair i being rows 2i and 2i+1"
        )
    return evaluate_pairs(pair_distances(emb[0::2], emb[1::2]), same, nfolds)
