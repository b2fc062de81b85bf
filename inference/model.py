"""MODEL behind one surface: a backbone.pt / checkpoint.pt (PyTorch) or an exported .onnx (onnxruntime).

Both give ``forward(x)``: float32 (B,3,112,112) RGB normalised as (x/255-0.5)/0.5 -> float32
(B, embedding_size) raw embeddings. Everything above (embed, facebank, identify, verify) goes
through that one call, so the ONNX model answers exactly the questions the torch one does.

A model's identity is the sha256 of its weights (the tensors, in key order: the same for the
backbone.pt and the training checkpoint holding them); an export carries its source's identity in
its metadata, so a facebank built with the torch model is accepted by its .onnx and vice versa.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping

import numpy as np
import torch
import torch.nn as nn

import backbones
from utils.errors import UserError
from utils.files import check_regular

INPUT_SIZE = (112, 112)
NORMALISATION = "(x/255 - 0.5) / 0.5"  # data.transforms.normalize: uint8 -> [-1, 1]
INPUT_LAYOUT = "NCHW float32, RGB"
METADATA_SCHEMA = "facetrain-onnx/1"


class ModelError(UserError, ValueError):
    """MODEL cannot be used: an unknown file kind, foreign weights without --backbone, an ONNX file
    without our metadata (one line naming the file)."""


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors (key, dtype, shape, bytes) in key order: the identity of a model's weights."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class EmbeddingModel:
    """A loaded MODEL: ``forward`` plus what identifies and describes it.

    ``kind``: "torch" or "onnx"; ``sha256``: weights identity (see the module docstring);
    ``channel_order``: the order the weights were trained on (the input is always RGB);
    ``module``: the torch module (None for ONNX); ``metadata``: the ONNX metadata (empty for torch).
    """

    path: str
    kind: str
    backbone: str
    embedding_size: int
    channel_order: str
    sha256: str
    forward: Callable[[np.ndarray], np.ndarray]
    module: nn.Module | None = None
    metadata: Dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return (f"{self.path} ({self.kind}: {self.backbone}, {self.embedding_size}-d, weights trained on "
                f"{self.channel_order.upper()}, weights sha256 {self.sha256[:12]})")


def _torch_forward(module: nn.Module, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    """Batches through ``module`` in channels_last (as evaluation runs it: faster convolutions on
    CPUs and GPUs; the numbers agree with the contiguous layout to float rounding)."""
    module.to(memory_format=torch.channels_last)

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            t = torch.from_numpy(x).to(device).contiguous(memory_format=torch.channels_last)
            return module(t).float().cpu().numpy()
    return forward


def load_torch(path: str, backbone: str = "", embedding_size: int = 512, input_order: str = "",
               device: str = "cpu") -> EmbeddingModel:
    """Rebuild the backbone a backbone.pt / checkpoint.pt describes (as evaluate.py does), or
    ``backbone`` for foreign weights; NaN/inf weights and a state_dict that does not fit are refused."""
    loaded = backbones.from_file(path, backbone, embedding_size, input_order)
    module, name, order, state = loaded.model, loaded.name, loaded.channel_order, loaded.state_dict
    dev = torch.device(device)
    module.to(dev).eval()
    return EmbeddingModel(path, "torch", name, int(module.embedding_size), order, weights_sha256(state),
                          _torch_forward(module, dev), module=module)


def load_onnx(path: str, threads: int = 0) -> EmbeddingModel:
    """An .onnx written by ``infer.py export``: onnxruntime on the CPU; input layout from its metadata."""
    import onnxruntime as ort  # an optional dependency: only ONNX models need it

    check_regular(path, "ONNX model")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types for a damaged or foreign file
        raise ModelError(f"{path}: onnxruntime cannot load it: {str(exc).splitlines()[0][:160]}") from None
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if meta.get("schema") != METADATA_SCHEMA:
        raise ModelError(f"{path}: no {METADATA_SCHEMA!r} metadata (not written by infer.py export): the input "
                         f"layout, normalisation and weights identity are unknown")
    if meta.get("input_size") != "112x112" or meta.get("normalisation") != NORMALISATION \
            or meta.get("input_layout") != INPUT_LAYOUT:
        raise ModelError(f"{path}: metadata asks for input {meta.get('input_size')} {meta.get('input_layout')} "
                         f"normalised {meta.get('normalisation')}; this code feeds 112x112 {INPUT_LAYOUT} "
                         f"normalised {NORMALISATION}")
    input_name = meta.get("input_name", session.get_inputs()[0].name)

    def forward(x: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return EmbeddingModel(path, "onnx", meta.get("backbone", "?"), int(meta["embedding_size"]),
                          meta.get("weights_channel_order", "rgb"), meta["weights_sha256"], forward, metadata=meta)


def load_model(path: str, backbone: str = "", embedding_size: int = 512, input_order: str = "",
               device: str = "cpu") -> EmbeddingModel:
    """MODEL by its kind: ``.onnx`` -> onnxruntime, anything else -> a torch weights file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model file")
    if path.lower().endswith(".onnx"):
        if backbone or input_order:
            raise ModelError(f"{path}: an exported model carries its architecture and channel order; "
                             f"--backbone/--input-order apply to torch weights only")
        return load_onnx(path)
    return load_torch(path, backbone, embedding_size, input_order, device)


def onnx_metadata(model: EmbeddingModel, input_name: str, output_name: str, extra: Mapping[str, Any]) -> Dict[str, str]:
    """What an export records so that ``load_onnx`` (or any other runtime) can feed it correctly."""
    meta = {"schema": METADATA_SCHEMA, "input_name": input_name, "output_name": output_name,
            "input_size": "112x112", "input_layout": INPUT_LAYOUT, "input_channel_order": "rgb",
            "normalisation": NORMALISATION, "embedding_size": str(model.embedding_size),
            "output": "raw (un-normalised) embedding; L2-normalise it, add the flipped image's for flip TTA",
            "backbone": model.backbone, "weights_channel_order": model.channel_order,
            "weights_sha256": model.sha256, "source": os.path.abspath(model.path)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta
