"""Verification on the .bin targets: load (decode once), embed, score.

Shared by training-time evaluation and evaluate.py so both print the same
numbers for the same weights.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch.nn as nn

from data.bins import label_warning
from evaluation.embed import embed
from evaluation.protocol import VerificationResult, evaluate_embeddings

# The seven standard sets, in the order papers and the seeds report them.
STANDARD_TARGETS = ("lfw", "cfp_ff", "cfp_fp", "agedb_30", "calfw", "cplfw", "vgg2_fp")


@dataclass
class Target:
    """A decoded verification set: 2N uint8 RGB images and N same/different flags."""

    name: str
    path: str
    images: np.ndarray
    issame: np.ndarray
    sha256: str = ""  # of the .bin file
    warning: str | None = None  # e.g. "all 20 pairs are 'same'": its accuracy means nothing


@dataclass
class TargetSet:
    """The targets found (decoded) and the requested ones that were missing."""

    targets: List[Target] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)


_DECODED: Dict[tuple, Target] = {}
NFOLDS = 10  # the protocol's folds: a target with fewer pairs is refused when loaded


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def find_targets(data_dir: str, names: Sequence[str] | None = None) -> tuple[Dict[str, str], List[str]]:
    """Map target name -> .bin path under `data_dir`; list the requested names not found.

    With no `names`, every `*.bin` in the folder is a target (standard ones first).
    """
    present = {f[:-4]: os.path.join(data_dir, f) for f in os.listdir(data_dir) if f.endswith(".bin")} \
        if os.path.isdir(data_dir) else {}
    if names:
        found = {n: present[n] for n in names if n in present}
        return found, [n for n in names if n not in present]
    order = [n for n in STANDARD_TARGETS if n in present] + sorted(n for n in present if n not in STANDARD_TARGETS)
    return {n: present[n] for n in order}, []


def load_targets(data_dir: str, names: Sequence[str] | None = None, image_size=(112, 112),
                 progress: bool = False, cache_dir: str | None = "default",
                 log: Callable[[str], None] | None = None) -> TargetSet:
    """Decode the requested targets once per process, and once per file content on disk.

    In a process a set is kept by path, size and mtime; across processes the decoded
    pixels are cached by the file's sha256 (evaluation/cache.py; ``cache_dir`` None
    switches that off, "default" uses $FACETRAIN_CACHE or ~/.cache/facetrain).
    Every problem shows here, before any training or embedding: a FIFO or device is refused
    unread, a set with fewer than 10 pairs raises BinFormatError naming the file, and a set
    whose pairs all have one label is logged as a warning line (``log``, default stderr)
    and carried as ``Target.warning``.
    """
    from evaluation.cache import load_decoded  # local: data/ is only needed when targets are loaded

    log = log or _stderr
    found, missing = find_targets(data_dir, names)
    out = TargetSet(missing=missing)
    for name, path in found.items():
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, tuple(image_size))
        if key not in _DECODED:
            d = load_decoded(path, image_size=tuple(image_size), cache_dir=cache_dir, progress=progress,
                             min_pairs=NFOLDS, log=log)
            _DECODED[key] = Target(name, path, d.images, d.issame, d.sha256, label_warning(d.issame))
        target = _DECODED[key]
        if target.warning:
            log(f"warning: verification target {name} ({path}): {target.warning}; "
                "its accuracy does not measure the model (one threshold can accept or reject every pair)")
        out.targets.append(target)
    return out


def evaluate_targets(model: nn.Module, targets: Sequence[Target], batch_size: int = 256, device: str = "cpu",
                     tta: str = "sum", amp: bool = False, amp_dtype: str = "auto", progress: bool = False,
                     embeddings_out: Dict[str, np.ndarray] | None = None) -> Dict[str, VerificationResult]:
    """10-fold verification of `model` on each target (with its XNorm); optionally keep the embeddings.

    ``amp``/``amp_dtype`` as in embed(): training passes its own --amp/--amp-dtype so verification
    runs in the training's precision.
    """
    results: Dict[str, VerificationResult] = {}
    for t in targets:
        emb, norms = embed(model, t.images, batch_size=batch_size, device=device, tta=tta, amp=amp,
                           amp_dtype=amp_dtype, progress=progress, desc=t.name, return_norms=True)
        if embeddings_out is not None:
            embeddings_out[t.name] = emb
        results[t.name] = evaluate_embeddings(emb, t.issame)
        results[t.name].xnorm = float(np.mean(norms))
    return results


def mean_accuracy(results: Dict[str, VerificationResult]) -> float:
    """Mean over targets of the 10-fold mean accuracy (fraction 0-1)."""
    return float(np.mean([r.accuracy for r in results.values()])) if results else float("nan")
