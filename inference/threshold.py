"""The cosine threshold verify/identify use, and where it came from (always printed with it).

Order: ``--threshold`` if given; else the model's own evaluation: the eval.json evaluate.py wrote
beside the model file (its row for this file, by sha256, else by path), the mean over its
verification sets of ``best_threshold``; for an exported .onnx, the threshold its export recorded
from that file. ``best_threshold`` is a squared L2 distance between normalised embeddings, so
cosine = 1 - d/2 (d = 2 - 2 cos). Else DEFAULT_COSINE.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict

from evaluation.report import SCHEMA as EVAL_SCHEMA
from utils.torchfile import sha256_file

# InsightFace_Pytorch's facebank default: squared L2 1.5 between normalised embeddings = cosine 0.25
DEFAULT_COSINE = 0.25


@dataclass
class Threshold:
    cosine: float
    origin: str

    @property
    def distance(self) -> float:
        """The same threshold as a squared L2 distance between normalised embeddings."""
        return 2.0 - 2.0 * self.cosine

    def text(self) -> str:
        return f"threshold: cosine {self.cosine:.4f} (squared L2 {self.distance:.4f}) from {self.origin}"


def cosine_of_distance(d: float) -> float:
    return 1.0 - d / 2.0


def from_eval_json(model_path: str) -> Threshold | None:
    """The threshold of ``model_path``'s row in the eval.json beside it, or None if there is none."""
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "eval.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            report: Dict[str, Any] = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("schema") != EVAL_SCHEMA:
        return None
    rows = [r for r in report.get("checkpoints", []) if isinstance(r, dict)]
    sha = sha256_file(model_path)
    row = next((r for r in rows if r.get("sha256") == sha), None) or next(
        (r for r in rows if r.get("path") == os.path.abspath(model_path)), None)
    if row is None:
        return None
    found = {name: res.get("best_threshold") for name, res in (row.get("results") or {}).items()
             if isinstance(res, dict) and isinstance(res.get("best_threshold"), (int, float))}
    if not found:
        return None
    d = sum(found.values()) / len(found)
    return Threshold(cosine_of_distance(d), f"{path} (mean best_threshold {d:.4f} over {', '.join(sorted(found))}, "
                                            f"tta={report.get('tta', '?')})")


def resolve(model_path: str, kind: str, metadata: Dict[str, str], given: float | None) -> Threshold:
    """The threshold to use for ``model_path`` (see the module docstring for the order)."""
    if given is not None:
        return Threshold(float(given), "--threshold")
    found = from_eval_json(model_path)
    if found is not None:
        return found
    if kind == "onnx" and "eval_threshold_cosine" in metadata:
        return Threshold(float(metadata["eval_threshold_cosine"]),
                         f"{model_path} metadata: {metadata.get('eval_threshold_origin', '?')}")
    return Threshold(DEFAULT_COSINE, "the default (no eval.json for this model beside it; InsightFace_Pytorch's "
                                     "facebank threshold, squared L2 1.5)")
