"""IJB-B / IJB-C scoring from per-face features: templates, 1:1 TAR@FAR, 1:N rank-k and TPIR@FPIR.

The numbers are those of insightface's published scripts (arcface_torch ``eval_ijbc.py`` for
1:1, ``recognition/_evaluation_/ijb/ijb_1n.py`` for closed-set rank-k), computed without Python
loops over templates, media or pairs:

- face feature: flip-summed raw embedding, optionally L2-normalised, optionally times faceness;
- template feature: mean of the face features within each media id, summed over the
  template's media, L2-normalised (a zero sum stays zero, as ``sklearn.preprocessing.normalize``);
- pair score: dot product of the two template features (cosine similarity, -1..1);
- TAR at FAR: sklearn ``roc_curve`` points, the one whose FPR is nearest the FAR, ties to the
  highest TPR (the reference flips the arrays and takes the first minimum).

Arithmetic is float64 throughout. The reference keeps face features in float32 up to the media
mean, so its template features differ from ours by float32 rounding (~1e-7 in a score); the
benchmark (benchmarks/bench_ijb.py) checks a transcription of the reference given the same
float64 features to 1e-12. Every rate returned is a fraction in 0..1, never a percentage;
an undefined rate (no mated probe, no mated search) is NaN.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Dict, Iterable, Mapping, Tuple

import numpy as np
import torch
from sklearn.metrics import auc, roc_curve

from utils.errors import UserError

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIRS = (0.01, 0.1)
RANKS = (1, 5, 10)

_AGGREGATE_ROWS = 1 << 16  # faces converted to float64 at a time while aggregating (~256 MB at 512-d)


class IJBProtocolError(UserError, ValueError):
    """Input the protocol cannot score: no positive or negative pairs, NaN scores, a subject with
    two gallery templates, a template listed with two subjects."""


class UnknownTemplateError(IJBProtocolError):
    """A template id (in the pair file, a gallery or the probe list) that has no face features.

    ``template``: the id; ``index``: 0-based index of the first pair (or list row) holding it;
    ``source``: "pair" or the list's name (e.g. "G1", "probe"). The caller adds file and line.
    """

    def __init__(self, template: int, index: int, source: str = "pair"):
        self.template, self.index, self.source = int(template), int(index), source
        where = f"pair {self.index}" if source == "pair" else f"{source} row {self.index}"
        super().__init__(f"template {self.template} ({where}, 0-based) has no face in the face list")


def face_features(raw: np.ndarray, faceness: np.ndarray | None, detector_score: bool = True,
                  norm_score: bool = True) -> np.ndarray:
    """(N, D) float64 face features from flip-summed raw embeddings, in the reference's order.

    ``norm_score=False`` divides each row by its L2 norm (a zero row, e.g. an unreadable image,
    stays zero); ``detector_score=True`` then multiplies row i by ``faceness[i]`` (the detector's
    0..1 score from the 5pts file). With both defaults the feature keeps its norm, which weighs
    sharp, confident faces more in the template mean. Every step is per row, so a block of rows
    gives the same numbers as the whole array (template_features applies it chunk by chunk).
    """
    feats = np.array(raw, dtype=np.float64)  # a copy: the caller's array is never changed
    if feats.ndim != 2:
        raise ValueError(f"face features must be (N, D), got shape {feats.shape}")
    if not norm_score:
        norms = np.sqrt(np.sum(feats * feats, axis=1, keepdims=True))
        feats = np.divide(feats, norms, out=np.zeros_like(feats), where=norms > 0)
    if detector_score:
        scores = np.asarray(faceness, dtype=np.float64).reshape(-1)
        if scores.shape[0] != feats.shape[0]:
            raise ValueError(f"{scores.shape[0]} faceness scores for {feats.shape[0]} faces")
        feats *= scores[:, None]
    return feats


def _group_starts(*keys: np.ndarray) -> np.ndarray:
    """Indices where any of the (already sorted together) key arrays changes value; 0 first."""
    change = np.zeros(keys[0].shape[0], dtype=bool)
    change[:1] = True
    for key in keys:
        change[1:] |= key[1:] != key[:-1]
    return np.flatnonzero(change)


def _run_numbers(n: int, starts: np.ndarray) -> np.ndarray:
    """(n,) int64: the number of the run each of n sorted items is in, given the runs' starts."""
    first = np.zeros(n, np.int64)
    first[starts] = 1
    return np.cumsum(first) - 1


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.sum(x * x, axis=1, keepdims=True))
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def template_features(feats: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                      chunk: int = _AGGREGATE_ROWS, faceness: np.ndarray | None = None,
                      norm_score: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """(sorted unique template ids (T,) int64, (T, D) float64 L2-normalised template features).

    Row i of ``feats`` is the face on line i of the face/template/media list. Each face gets the
    number of its (template, media) run; ``torch.index_add_`` sums the faces of each run in line
    order (the order of the reference's ``np.where``; 10x faster than ``np.add.reduceat`` over
    axis 0), ``chunk`` faces at a time converted to float64, so only ~chunk x D extra memory is
    used whatever the number of faces; the media means are summed per template the same way.

    ``feats`` are face features as they are summed. Pass the raw flip-combined features with
    ``faceness`` (detector score on) and/or ``norm_score=False`` instead, and each chunk is made
    into face features on the way (``face_features`` row by row, the same numbers): IJB-C's raw
    float32 features never get a float64 N x D copy (1.9 GB at 469k x 512).
    """
    feats = np.asarray(feats)
    templates = np.asarray(templates).astype(np.int64).reshape(-1)
    medias = np.asarray(medias).astype(np.int64).reshape(-1)
    n = feats.shape[0]
    if feats.ndim != 2 or templates.shape[0] != n or medias.shape[0] != n:
        raise ValueError(f"features {feats.shape}, {templates.shape[0]} template ids, {medias.shape[0]} media ids")
    if faceness is not None:
        faceness = np.asarray(faceness, dtype=np.float64).reshape(-1)
        if faceness.shape[0] != n:
            raise ValueError(f"{faceness.shape[0]} faceness scores for {n} faces")
    if n == 0:
        return np.zeros(0, np.int64), np.zeros((0, feats.shape[1]), np.float64)
    order = np.lexsort((medias, templates))
    starts = _group_starts(templates[order], medias[order])  # one run per (template, media), sorted
    run_of_face = np.empty(n, np.int64)
    run_of_face[order] = _run_numbers(n, starts)
    media_sums = torch.zeros((starts.shape[0], feats.shape[1]), dtype=torch.float64)
    step = max(1, int(chunk))
    for r0 in range(0, n, step):
        block = face_features(feats[r0:r0 + step], None if faceness is None else faceness[r0:r0 + step],
                              detector_score=faceness is not None, norm_score=norm_score)
        media_sums.index_add_(0, torch.from_numpy(run_of_face[r0:r0 + step]), torch.from_numpy(block))
    counts = np.diff(np.append(starts, n))
    media_means = media_sums.numpy() / counts[:, None]
    run_templates = templates[order][starts]
    t_starts = _group_starts(run_templates)
    template_of_run = _run_numbers(run_templates.shape[0], t_starts)
    summed = torch.zeros((t_starts.shape[0], feats.shape[1]), dtype=torch.float64)
    summed.index_add_(0, torch.from_numpy(template_of_run), torch.from_numpy(media_means))
    return run_templates[t_starts], _normalise_rows(summed.numpy())


def _rows_of(unique_templates: np.ndarray, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(row of each id in the sorted ``unique_templates``, whether it is there)."""
    ids = np.asarray(ids).astype(np.int64).reshape(-1)
    if unique_templates.shape[0] == 0:
        return np.zeros(ids.shape[0], np.int64), np.zeros(ids.shape[0], bool)
    pos = np.minimum(np.searchsorted(unique_templates, ids), unique_templates.shape[0] - 1)
    return pos, unique_templates[pos] == ids


def _rows_or_raise(unique_templates: np.ndarray, ids: np.ndarray, source: str) -> np.ndarray:
    ids = np.asarray(ids).astype(np.int64).reshape(-1)
    rows, known = _rows_of(unique_templates, ids)
    if not known.all():
        first = int(np.argmin(known))
        raise UnknownTemplateError(ids[first], first, source)
    return rows


def pair_scores(unique_templates: np.ndarray, template_feats: np.ndarray, t1: np.ndarray, t2: np.ndarray,
                chunk: int = 1 << 12, tile: int = 2048, min_density: float = 1 / 64) -> np.ndarray:
    """(P,) float64 dot products of the template features of each pair (t1[i], t2[i]).

    A pair score is symmetric, so each pair is put in the tile (min row // tile, max row // tile)
    of the template Gram matrix. A tile holding at least ``min_density * tile**2`` pairs is
    computed whole by one matrix product (BLAS: ~20x faster per pair than gathering rows when
    pairs are dense, as IJB-C's 15.6M pairs over 23k templates are); the pairs of sparser tiles
    are gathered ``chunk`` at a time into two reused (chunk, D) buffers. Either way no pairs x D
    array is built, and both give the dot product to float64 rounding (~1e-16).
    A template id without features raises UnknownTemplateError naming the first pair holding it.
    """
    unique_templates = np.asarray(unique_templates).astype(np.int64)
    feats = np.ascontiguousarray(template_feats, dtype=np.float64)
    t1 = np.asarray(t1).astype(np.int64).reshape(-1)
    t2 = np.asarray(t2).astype(np.int64).reshape(-1)
    if t1.shape != t2.shape:
        raise ValueError(f"{t1.shape[0]} first templates for {t2.shape[0]} second templates")
    rows1, known1 = _rows_of(unique_templates, t1)
    rows2, known2 = _rows_of(unique_templates, t2)
    known = known1 & known2
    if not known.all():
        first = int(np.argmin(known))
        raise UnknownTemplateError(t1[first] if not known1[first] else t2[first], first, "pair")
    lo, hi = np.minimum(rows1, rows2), np.maximum(rows1, rows2)
    tile = max(1, int(tile))
    n_tiles = -(-feats.shape[0] // tile) if feats.shape[0] else 1
    key = (lo // tile) * n_tiles + hi // tile
    order = np.argsort(key, kind="stable")
    keys, first_of, counts = np.unique(key[order], return_index=True, return_counts=True)
    out = np.empty(t1.shape[0], np.float64)
    sparse = []
    for k, f, c in zip(keys, first_of, counts):  # a loop over tiles: (23k / 2048)^2 / 2 = 66 on IJB-C
        idx = order[f:f + c]
        if c < min_density * tile * tile:
            sparse.append(idx)
            continue
        r0, c0 = (k // n_tiles) * tile, (k % n_tiles) * tile
        block = feats[r0:r0 + tile] @ feats[c0:c0 + tile].T
        out[idx] = block[lo[idx] - r0, hi[idx] - c0]
    if sparse:
        idx = np.concatenate(sparse)
        out[idx] = _gathered_dots(feats, lo[idx], hi[idx], chunk)
    return out


def _gathered_dots(feats: np.ndarray, rows1: np.ndarray, rows2: np.ndarray, chunk: int) -> np.ndarray:
    """Row-pair dot products, ``chunk`` pairs at a time through two reused buffers (4096 x 512
    float64 = 16 MB each: small enough to stay in cache, measured 2x faster than 16k)."""
    out = np.empty(rows1.shape[0], np.float64)
    chunk = max(1, int(chunk))
    buf1 = np.empty((min(chunk, rows1.shape[0]), feats.shape[1]), np.float64)
    buf2 = np.empty_like(buf1)
    for s in range(0, rows1.shape[0], chunk):
        e = min(s + chunk, rows1.shape[0])
        a, b = buf1[: e - s], buf2[: e - s]
        np.take(feats, rows1[s:e], axis=0, out=a)
        np.take(feats, rows2[s:e], axis=0, out=b)
        out[s:e] = np.einsum("ij,ij->i", a, b)
    return out


def _nearest_point(fpr: np.ndarray, far: float) -> int:
    """Index of the ROC point whose FPR is nearest ``far``; on ties the last (highest TPR)."""
    dist = np.abs(fpr - far)
    return int(np.flatnonzero(dist == dist.min())[-1])


def tar_at_far(labels: np.ndarray, scores: np.ndarray, fars: Iterable[float] = FARS) -> dict:
    """1:1 verification: TAR (0..1) at each FAR by the reference's nearest-ROC-point rule.

    Returns {"tar_at_far": {far: tar}, "fpr_at_far": {far: the FPR of the point used},
    "threshold_at_far": {far: its score threshold}, "reachable": {far: n_negatives >= 1/far},
    "auc", "fpr", "tpr", "thresholds" (sklearn's roc_curve arrays, drop_intermediate=True as the
    reference), "n_positives", "n_negatives"}. A FAR below 1/n_negatives is not reachable: its
    TAR is that of the nearest point (often FPR 0), to be marked as such in a report.
    """
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.shape[0]} labels for {scores.shape[0]} scores")
    bad = ~np.isfinite(scores)
    if bad.any():
        raise IJBProtocolError(f"{int(bad.sum())} pair scores are not finite (first: pair {int(np.argmax(bad))})")
    n_pos = int(np.sum(labels == 1))
    n_neg = labels.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        raise IJBProtocolError(f"TAR@FAR needs both labels: {n_pos} genuine and {n_neg} impostor pairs")
    fpr, tpr, thresholds = roc_curve(labels, scores)
    fars = tuple(float(f) for f in fars)
    picks = {far: _nearest_point(fpr, far) for far in fars}
    return {
        "tar_at_far": {far: float(tpr[i]) for far, i in picks.items()},
        "fpr_at_far": {far: float(fpr[i]) for far, i in picks.items()},
        "threshold_at_far": {far: float(thresholds[i]) for far, i in picks.items()},
        "reachable": {far: Fraction(repr(far)) * n_neg >= 1 for far in fars},
        "auc": float(auc(fpr, tpr)),
        "fpr": fpr, "tpr": tpr, "thresholds": thresholds,
        "n_positives": n_pos, "n_negatives": n_neg,
    }


def _unique_rows(templates: np.ndarray, subjects: np.ndarray, source: str) -> Tuple[np.ndarray, np.ndarray]:
    """(templates, subjects), one row per template sorted by id, from per-face list rows."""
    t = np.asarray(templates).astype(np.int64).reshape(-1)
    s = np.asarray(subjects).astype(np.int64).reshape(-1)
    if t.shape != s.shape:
        raise ValueError(f"{source}: {t.shape[0]} templates for {s.shape[0]} subjects")
    pairs = np.unique(np.stack([t, s], axis=1), axis=0) if t.size else np.zeros((0, 2), np.int64)
    dup = np.flatnonzero(pairs[1:, 0] == pairs[:-1, 0])
    if dup.size:
        tid = pairs[dup[0], 0]
        raise IJBProtocolError(f"{source}: template {tid} is listed with subjects "
                               f"{pairs[dup[0], 1]} and {pairs[dup[0] + 1, 1]}")
    return pairs[:, 0], pairs[:, 1]


def _threshold_at_fpir(nonmated_top1: np.ndarray, fpir: float) -> float:
    """NIST's threshold: the smallest T with #(non-mated top-1 > T) <= fpir * n_nonmated, i.e. the
    (k+1)-th largest score, k = floor(fpir * n) with fpir read as the decimal it is written as."""
    n = nonmated_top1.shape[0]
    k = math.floor(Fraction(repr(float(fpir))) * n)
    if k >= n:
        return -math.inf
    return float(-np.partition(-nonmated_top1, k)[k])


def identification(template_ids: np.ndarray, template_feats: np.ndarray, probe_templates: np.ndarray,
                   probe_subjects: np.ndarray, galleries: Mapping[str, Tuple[np.ndarray, np.ndarray]],
                   ranks: Iterable[int] = RANKS, fpirs: Iterable[float] = FPIRS, chunk: int = 4096) -> dict:
    """1:N search of the probe templates against the galleries: closed-set rank-k, open-set TPIR@FPIR.

    Closed set (insightface ijb_1n.py): the gallery is the union of all ``galleries``; a probe's
    mate is the gallery template of its subject; its rank is 1 + the number of gallery templates
    scoring strictly higher, so a tie with the mate counts in the probe's favour (the reference's
    argsort breaks ties by column order instead; with real-valued scores ties do not occur).
    rank[k] = fraction of mated probes with rank <= k. Probes whose subject has no gallery
    template are counted as "unmated_probes" and left out (the reference stops with an error).

    Open set, per gallery g (NIST FRVT 1:N, IJB-C paper): a probe whose subject is in g is a mated
    search, any other a non-mated one. At FPIR f the threshold T is the (k+1)-th largest non-mated
    top-1 score, k = floor(f * n_nonmated) (-inf when k >= n_nonmated), so at most f * n_nonmated
    non-mated searches score above T; TPIR = fraction of mated searches whose mate is rank 1 in g
    (ties in its favour) and scores > T.

    Inputs are list rows as read (one per face; repeats are merged); scores are dot products of
    the (already normalised) template features, ``chunk`` probes at a time.
    """
    template_ids = np.asarray(template_ids).astype(np.int64)
    feats = np.asarray(template_feats, dtype=np.float64)
    ranks = tuple(int(k) for k in ranks)
    fpirs = tuple(float(f) for f in fpirs)
    if not galleries:
        raise ValueError("identification needs at least one gallery")

    gal_sets: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    for name, (g_t, g_s) in galleries.items():
        _rows_or_raise(template_ids, g_t, name)  # first, so the error names the list row as read
        gal_sets[name] = _unique_rows(g_t, g_s, name)
    union_t, union_s = _unique_rows(np.concatenate([t for t, _ in gal_sets.values()]),
                                    np.concatenate([s for _, s in gal_sets.values()]), "gallery")
    subj_sorted, subj_count = np.unique(union_s, return_counts=True)
    if (subj_count > 1).any():
        subj = subj_sorted[np.argmax(subj_count > 1)]
        raise IJBProtocolError(f"subject {subj} has {subj_count.max()} gallery templates "
                               f"({', '.join(map(str, union_t[union_s == subj]))}); the protocol needs one")
    gal_feats = feats[_rows_or_raise(template_ids, union_t, "gallery")]

    _rows_or_raise(template_ids, probe_templates, "probe")
    probe_t, probe_s = _unique_rows(probe_templates, probe_subjects, "probe")
    probe_feats = feats[_rows_or_raise(template_ids, probe_t, "probe")]
    by_subject = np.argsort(union_s)
    pos, has_mate = _rows_of(union_s[by_subject], probe_s)
    mate = np.where(has_mate, by_subject[pos], -1)

    cols = {name: np.flatnonzero(np.isin(union_t, t)) for name, (t, _) in gal_sets.items()}
    in_g = {name: np.isin(probe_s, s) for name, (_, s) in gal_sets.items()}
    n_probe = probe_t.shape[0]
    rank = np.zeros(n_probe, np.int64)
    mate_score = np.full(n_probe, -np.inf)
    top1 = {name: np.full(n_probe, -np.inf) for name in gal_sets}
    rank1_in = {name: np.zeros(n_probe, bool) for name in gal_sets}
    chunk = max(1, int(chunk))
    for s in range(0, n_probe, chunk):
        e = min(s + chunk, n_probe)
        sim = probe_feats[s:e] @ gal_feats.T
        m = mate[s:e]
        ms = np.where(m >= 0, sim[np.arange(e - s), np.maximum(m, 0)], np.inf)
        mate_score[s:e] = ms
        rank[s:e] = 1 + np.sum(sim > ms[:, None], axis=1)
        for name, c in cols.items():
            if c.size == 0:
                continue
            sub = sim[:, c]
            top1[name][s:e] = sub.max(axis=1)
            rank1_in[name][s:e] = np.sum(sub > ms[:, None], axis=1) == 0

    mated_any = mate >= 0
    n_mated = int(mated_any.sum())
    result = {
        "rank": {k: float(np.mean(rank[mated_any] <= k)) if n_mated else math.nan for k in ranks},
        "probes": n_probe, "unmated_probes": n_probe - n_mated, "gallery_templates": int(union_t.shape[0]),
        "tpir_at_fpir": {}, "thresholds": {}, "mated": {}, "nonmated": {},
    }
    for name in gal_sets:
        mated_g, nonmated_g = in_g[name], ~in_g[name]
        nm_top1 = top1[name][nonmated_g]
        result["mated"][name], result["nonmated"][name] = int(mated_g.sum()), int(nonmated_g.sum())
        result["thresholds"][name], result["tpir_at_fpir"][name] = {}, {}
        for f in fpirs:
            thr = _threshold_at_fpir(nm_top1, f)
            hit = rank1_in[name][mated_g] & (mate_score[mated_g] > thr)
            result["thresholds"][name][f] = thr
            result["tpir_at_fpir"][name][f] = float(hit.mean()) if hit.size else math.nan
    return result


def describe_reachability(result: dict) -> str | None:
    """One line naming the FARs a verification result cannot resolve (fewer than 1/FAR impostor
    pairs), or None when every FAR is reachable: what a report prints under the TAR table."""
    short = [far for far, ok in result["reachable"].items() if not ok]
    if not short:
        return None
    return (f"FAR {', '.join(f'{f:g}' for f in short)} below 1/{result['n_negatives']} impostor pairs: "
            "TAR there is at the nearest ROC point, not a measurement at that FAR")
