"""IJB-B / IJB-C evaluation: the release's loose crops -> face features -> template features -> scores.

The protocol is insightface's (arcface_torch ``eval_ijbc.py`` for 1:1, ``ijb_1n.py`` for the
closed-set ranks) with NIST's open-set TPIR@FPIR per gallery added:

1. each loose crop is aligned with its 5 points onto the ArcFace template (evaluation.ijb_faces);
2. face feature = e(x) + e(flip x), un-normalised (``tta``: sum; ``none``: e(x); ``concat``);
3. optionally L2-normalised (``norm_score`` off) and multiplied by the faceness score
   (``detector_score`` on) -- both defaults are the reference's TestMode N1 D1 F2 -- chunk by
   chunk inside the template aggregation (no float64 copy of all N x D features);
4. template feature = sum over its media of the mean feature of the media's faces, normalised;
5. 1:1 score = dot product of the two template features; TAR at each FAR read off sklearn's ROC
   at the nearest FPR (highest TPR on ties); 1:N: rank-k over G1+G2 and TPIR@FPIR per gallery.

The meta files are read once per process (``load_ijb``) and shared by every checkpoint; the
aligned crops are cached on disk keyed by the meta files' sha256, so a second checkpoint skips
decoding and alignment.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Tuple

import numpy as np
import torch.nn as nn
from tqdm import tqdm

from data.ijb import IJBFaces, IJBLayout, check_known, find_ijb, read_faces, read_pairs, read_template_subjects
from evaluation.embed import TTA_MODES, embed
from evaluation.ijb_faces import aligned_faces
from evaluation.ijb_protocol import (
    FARS,
    FPIRS,
    RANKS,
    identification,
    pair_scores,
    tar_at_far,
    template_features,
)
from utils.errors import UserError

MODES = ("1:1", "1:N")

class IJBModeError(UserError, ValueError):
    """--ijb-mode names an unknown mode, or one whose protocol files the release lacks."""


@dataclass(frozen=True)
class IJBOptions:
    """The protocol switches (the reference's TestMode letters in brackets)."""

    tta: str = "sum"  # F2 (sum of the flip views); "none" = no flip; "concat" = F1
    detector_score: bool = True  # D1: weight each face by its faceness score
    norm_score: bool = True  # N1: keep each face feature's norm as a quality weight

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class IJBData:
    """One release's protocol files, read and checked (every referenced template has faces)."""

    layout: IJBLayout
    faces: IJBFaces
    modes: Tuple[str, ...]
    pairs: Tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    galleries: Dict[str, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    probe: Tuple[np.ndarray, np.ndarray] | None = None

    @property
    def target(self) -> str:
        return self.layout.target


@dataclass
class IJBResult:
    """What one checkpoint scored on one release: the JSON-ready summary and the arrays behind it."""

    summary: Dict[str, Any]
    faces: np.ndarray  # (N, D) float32 raw flip-combined features, 5pts-line order, before any weighting
    ok: np.ndarray  # (N,) bool: the image could be read and aligned
    scores: np.ndarray | None = None  # (P,) float64 pair scores in pair-file order (1:1)
    roc: Tuple[np.ndarray, np.ndarray] | None = None  # (fpr, tpr) of the 1:1 ROC


def parse_modes(text: str, layout: IJBLayout) -> Tuple[str, ...]:
    """``auto`` = 1:1, plus 1:N when the release holds both galleries and the probe file; else a comma list."""
    has_1n = bool(layout.probe) and len(layout.galleries) == 2
    if text.strip() == "auto":
        modes = tuple(m for m, ok in (("1:1", bool(layout.pairs)), ("1:N", has_1n)) if ok)
        if not modes:
            raise IJBModeError(f"{layout.root}: neither the 1:1 pair file nor the 1:N files are there")
        return modes
    modes = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    for m in modes:
        if m not in MODES:
            raise IJBModeError(f"--ijb-mode: unknown mode {m!r} (known: {', '.join(MODES)}, or auto)")
    if not modes:
        raise IJBModeError("--ijb-mode: no mode given (known: 1:1, 1:N, auto)")
    if "1:1" in modes and not layout.pairs:
        raise IJBModeError(f"{layout.root}: --ijb-mode 1:1 needs meta/<target>_template_pair_label.txt, not found")
    if "1:N" in modes and not has_1n:
        raise IJBModeError(f"{layout.root}: --ijb-mode 1:N needs the two gallery CSVs and the probe_mixed CSV "
                           f"in meta/, not all found")
    return modes


def load_ijb(path: str, modes: str = "auto", log: Callable[[str], None] | None = None) -> IJBData:
    """Find and read a release folder; every template the chosen protocols name must have faces.

    ``log`` (if given) hears one line before the reading starts: IJB-C's meta files take seconds.
    """
    layout = find_ijb(path)
    chosen = parse_modes(modes, layout)
    if log is not None:
        log(f"{layout.target}: reading {layout.root}/meta ...")
    faces = read_faces(layout)
    known = np.unique(faces.templates)
    data = IJBData(layout, faces, chosen)
    if "1:1" in chosen:
        t1, t2, label = read_pairs(layout.pairs)
        check_known(known, t1, layout.pairs)
        check_known(known, t2, layout.pairs)
        data.pairs = (t1, t2, label)
    if "1:N" in chosen:
        for name, csv in layout.galleries.items():
            templates, subjects = read_template_subjects(csv)
            check_known(known, templates, csv, first_line=2)
            data.galleries[name] = (templates, subjects)
        templates, subjects = read_template_subjects(layout.probe)
        check_known(known, templates, layout.probe, first_line=2)
        data.probe = (templates, subjects)
    return data


def raw_face_features(model: nn.Module, data: IJBData, tta: str = "sum", batch_size: int = 256,
                      device: str = "cpu", amp: bool = False, cache_dir: str | None = None, workers: int = 0,
                      progress: bool = False, log: Callable[[str], None] | None = None
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """(N, D) float32 flip-combined, un-normalised features in 5pts-line order, and the (N,) ok mask.

    Decoding and alignment run in loader workers (or come from the crop cache) while the model
    embeds the previous batch; a face whose image could not be read gets a zero feature, as the
    reference's would, and is counted by the caller.
    """
    n = len(data.faces.names)
    feats: np.ndarray | None = None
    ok = np.zeros(n, dtype=bool)
    bar = tqdm(total=n, desc=f"{data.target} faces", unit="face", disable=not progress)
    try:
        for batch in aligned_faces(data.faces, data.layout.image_dir, cache_dir, batch_size=batch_size,
                                   workers=workers, progress=False, **({"log": log} if log else {})):
            e = embed(model, batch.images, batch_size=batch_size, device=device, tta=tta, amp=amp,
                      normalize_rows=False)
            if feats is None:
                feats = np.zeros((n, e.shape[1]), dtype=np.float32)
            stop = batch.start + len(e)
            feats[batch.start:stop] = e
            feats[batch.start:stop][~batch.ok] = 0.0
            ok[batch.start:stop] = batch.ok
            bar.update(len(e))
    finally:
        bar.close()
    if feats is None:  # no faces at all: read_faces refuses empty files, so this is a broken loader
        raise RuntimeError(f"{data.target}: the aligned-face loader yielded no batch")
    return feats, ok


def _keyed(d: Dict[Any, Any]) -> Dict[str, Any]:
    """JSON keys: FAR/FPIR floats as str(float) ("1e-06", "0.0001"), ranks as "1"."""
    return {str(k): (_keyed(v) if isinstance(v, dict) else _plain(v)) for k, v in d.items()}


def _plain(v: Any) -> Any:
    if isinstance(v, (np.floating, float)):
        return None if not np.isfinite(v) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def score_features(raw: np.ndarray, ok: np.ndarray, data: IJBData, options: IJBOptions) -> IJBResult:
    """Everything after the network: weighting, templates, 1:1 and 1:N numbers (float64 throughout)."""
    faces = data.faces
    # raw float32 in, weighted chunk by chunk: no float64 N x D copy of the features
    template_ids, template_feats = template_features(
        raw, faces.templates, faces.medias, faceness=faces.faceness if options.detector_score else None,
        norm_score=options.norm_score)
    summary: Dict[str, Any] = {
        "target": data.target, "path": data.layout.root, "faces": int(len(raw)),
        "unreadable_faces": int((~ok).sum()), "templates": int(len(template_ids)), "modes": list(data.modes),
        "options": options.to_dict(), "meta_sha256": faces.key,
    }
    result = IJBResult(summary, raw, ok)
    if data.pairs is not None:
        t1, t2, label = data.pairs
        scores = pair_scores(template_ids, template_feats, t1, t2)
        roc = tar_at_far(label, scores, FARS)
        n_neg = int(roc["n_negatives"])
        summary["verification"] = {
            "pairs": int(len(label)), "genuine": int((label == 1).sum()), "impostor": n_neg,
            "tar_at_far": _keyed(roc["tar_at_far"]), "threshold_at_far": _keyed(roc["threshold_at_far"]),
            "auc": _plain(roc["auc"]),
            "resolved": {str(f): bool(roc["reachable"][f]) for f in FARS},
        }
        result.scores, result.roc = scores, (np.asarray(roc["fpr"]), np.asarray(roc["tpr"]))
    if data.probe is not None:
        ident = identification(template_ids, template_feats, data.probe[0], data.probe[1], data.galleries,
                               ranks=RANKS, fpirs=FPIRS)
        summary["identification"] = _keyed(ident)
    return result


def evaluate_ijb(model: nn.Module, data: IJBData, options: IJBOptions = IJBOptions(), batch_size: int = 256,
                 device: str = "cpu", amp: bool = False, cache_dir: str | None = None, workers: int = 0,
                 progress: bool = False, log: Callable[[str], None] | None = None) -> IJBResult:
    """Score ``model`` on one release with the reference protocol (see the module docstring)."""
    if options.tta not in TTA_MODES:
        raise IJBModeError(f"tta {options.tta!r}: unknown (known: {', '.join(TTA_MODES)})")
    raw, ok = raw_face_features(model, data, tta=options.tta, batch_size=batch_size, device=device, amp=amp,
                                cache_dir=cache_dir, workers=workers, progress=progress, log=log)
    return score_features(raw, ok, data, options)
