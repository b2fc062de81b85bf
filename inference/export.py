"""Export a torch MODEL to ONNX / TorchScript, and refuse an export that does not compute the same embeddings.

Right after writing (to a temporary name beside the target), the same inputs (a random batch of 5, a
random batch of 1, and the real images given) run through the torch module and the exported model;
every row must agree (cosine >= MIN_COSINE); the file is renamed to its name only then.

Exporters (torch 2.14): ``dynamo`` (torch.export-based, the default since torch 2.9; needs
onnxscript; opset 18, its native one: asking it for 17 makes it run onnx's version converter,
which fails on some graphs) and ``torchscript`` (the legacy tracer, dynamo=False: deprecated but
~4x faster to export and no onnxscript; opset 17). Both give a dynamic batch axis.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Dict

import numpy as np
import torch

from data.transforms import normalize
from utils.atomic import atomic_path
from utils.errors import UserError

from .model import EmbeddingModel, load_onnx, onnx_metadata
from .threshold import from_eval_json

MIN_COSINE = 0.9999
INPUT_NAME, OUTPUT_NAME = "input", "embedding"
EXPORTERS = {"dynamo": 18, "torchscript": 17}  # exporter -> opset


class ExportError(UserError, RuntimeError):
    """The exported model does not compute the torch model's embeddings (or the model cannot be exported)."""


@dataclass
class Parity:
    """How one exported model agrees with torch: per input batch, the worst row."""

    target: str
    min_cosine: float
    max_abs_diff: float
    rows: int
    batches: Dict[str, float]  # batch label -> its worst row cosine

    def text(self) -> str:
        parts = ", ".join(f"{k} {v:.6f}" for k, v in self.batches.items())
        return (f"{self.target}: {self.rows} rows, min cosine {self.min_cosine:.6f} (>= {MIN_COSINE} required), "
                f"max abs diff {self.max_abs_diff:.3g} [{parts}]")


def check_inputs(real_images: np.ndarray | None, seed: int = 0) -> Dict[str, np.ndarray]:
    """label -> normalised float32 (B,3,112,112): random batches of 5 and 1, and the real images if any."""
    g = torch.Generator().manual_seed(seed)
    batches = {"random x5": torch.rand(5, 3, 112, 112, generator=g) * 2 - 1,
               "random x1": torch.rand(1, 3, 112, 112, generator=g) * 2 - 1}
    if real_images is not None and len(real_images):
        batches[f"real x{len(real_images)}"] = normalize(torch.from_numpy(np.ascontiguousarray(real_images)))
    return {k: v.numpy() for k, v in batches.items()}


def compare(target: str, reference: Dict[str, np.ndarray], got: Dict[str, np.ndarray]) -> Parity:
    """Row cosines (float64) and the max abs difference of ``got`` against ``reference``."""
    worst: Dict[str, float] = {}
    diff, rows = 0.0, 0
    for label, ref in reference.items():
        a, b = ref.astype(np.float64), got[label].astype(np.float64)
        if a.shape != b.shape:
            raise ExportError(f"{target}: batch {label} gives shape {b.shape}, torch {a.shape}")
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)
        worst[label] = float(np.nan_to_num(cos, nan=-1.0).min())
        diff = max(diff, float(np.abs(a - b).max()))
        rows += len(a)
    return Parity(target, min(worst.values()), diff, rows, worst)


def _torch_outputs(module: torch.nn.Module, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    with torch.inference_mode():
        return {k: module(torch.from_numpy(v)).float().numpy() for k, v in inputs.items()}


def _require(parity: Parity) -> Parity:
    if not parity.min_cosine >= MIN_COSINE:
        raise ExportError(f"export refused, {parity.text()}")
    return parity


def _reference(model: EmbeddingModel, real_images: np.ndarray | None):
    """(the torch module in fp32 on the CPU, the check inputs, their torch embeddings) for an export."""
    if model.module is None:
        raise ExportError(f"{model.path}: export needs the torch weights (backbone.pt / checkpoint.pt), "
                          f"not an exported model")
    module = model.module.float().cpu().eval()
    inputs = check_inputs(real_images)
    return module, inputs, _torch_outputs(module, inputs)


def write_onnx(model: EmbeddingModel, path: str, exporter: str = "dynamo",
               real_images: np.ndarray | None = None) -> Parity:
    """Export ``model`` (torch) to ``path`` with metadata; parity-checked before it gets its name."""
    import onnx  # optional dependencies: only export needs them

    module, inputs, reference = _reference(model, real_images)
    extra: Dict[str, object] = {"exporter": exporter, "opset": EXPORTERS[exporter]}
    found = from_eval_json(model.path)
    if found is not None:
        extra.update(eval_threshold_cosine=repr(found.cosine), eval_threshold_origin=found.origin)
    example = (torch.from_numpy(inputs["random x5"]),)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's and the deprecation warnings: parity is checked below
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=65536)
            torch.onnx.export(module, example, tmp, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=EXPORTERS[exporter], dynamo=True, dynamic_shapes=({0: batch},),
                              verbose=False, external_data=False)
        else:
            torch.onnx.export(module, example, tmp, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=EXPORTERS[exporter], dynamo=False,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        proto = onnx.load(tmp)
        meta = onnx_metadata(model, INPUT_NAME, OUTPUT_NAME, extra)
        del proto.metadata_props[:]
        for key, value in meta.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, tmp)
        exported = load_onnx(tmp)
        parity = _require(compare(os.path.basename(path), reference,
                                  {k: exported.forward(v) for k, v in inputs.items()}))
    return parity


def write_torchscript(model: EmbeddingModel, path: str, real_images: np.ndarray | None = None) -> Parity:
    """Trace ``model`` to a TorchScript file; reloaded from disk and parity-checked before it gets its name."""
    module, inputs, reference = _reference(model, real_images)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(module, (torch.from_numpy(inputs["random x5"]),), check_trace=False)
        torch.jit.save(traced, tmp)
        loaded = torch.jit.load(tmp, map_location="cpu").eval()
        parity = _require(compare(os.path.basename(path), reference, _torch_outputs(loaded, inputs)))
    return parity
