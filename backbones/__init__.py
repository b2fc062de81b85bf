"""Face-recognition backbones: one registry, one surface.

    from backbones import build, names, load_weights
    model = build("ir_se50", embedding_size=512, channel_order="bgr")
    load_weights(model, "model_ir_se50.pth")

Every backbone takes RGB ``(B, 3, 112, 112)`` images normalised as ``(x/255 - 0.5)/0.5`` and
returns an un-normalised ``(B, embedding_size)`` float32 embedding (see :mod:`backbones.base`).
Adding a backbone means registering its builder with :func:`register_backbone` in its own file
and importing that file below.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple

import torch

from utils.torchfile import CheckpointError, check_finite, load_file

from .base import BACKBONES, SPECS, BackboneSpec, FaceBackbone, check_channel_order, check_head_args, register_backbone
from .weights import describe_backbone, load_state_dict_file, load_weights, mismatch_report, state_dict_of

register = BACKBONES.register

# family modules register themselves on import
from . import efficientnet, iresnet, irse, mobilefacenet, vit  # noqa: E402,F401  isort: skip


def build(name: str, embedding_size: int = 512, dropout: float = 0.0, channel_order: str = "rgb",
          **kwargs: Any) -> FaceBackbone:
    """Build the backbone registered as ``name``.

    ``dropout`` is the drop probability (0-1) before the embedding Linear; ``channel_order`` is
    the order the weights expect ('rgb', or 'bgr' for InsightFace_Pytorch checkpoints); the input
    fed to the model is always RGB. Out-of-range values (``embedding_size`` outside [1, 65536],
    ``dropout`` outside [0, 1), an unknown channel order) raise ValueError (TypeError for a
    wrong type) before anything is built.
    """
    BACKBONES.get(name)  # an unknown name is reported before the arguments
    embedding_size, dropout = check_head_args(embedding_size, dropout)
    channel_order = check_channel_order(channel_order)
    return BACKBONES.build(name, embedding_size=embedding_size, dropout=dropout, channel_order=channel_order,
                           **kwargs)


class LoadedBackbone(NamedTuple):
    model: FaceBackbone
    name: str  # the architecture built
    channel_order: str  # the order the weights expect ('rgb' or 'bgr')
    state_dict: Dict[str, torch.Tensor]  # the weights loaded


def from_file(path: str, backbone: str = "", embedding_size: int = 512, input_order: str = "") -> LoadedBackbone:
    """Rebuild the backbone a weights file describes, with its weights: our backbone.pt, a training
    checkpoint's model, or foreign weights (``backbone`` names their architecture; ``embedding_size``
    their width). ``backbone`` / ``input_order`` given override what the file says.

    Every field is validated before the model is built; weights holding NaN/inf and weights that do
    not fit (the short mismatch report) are refused, as one CheckpointError line naming the file.
    """
    data = load_file(path)
    info = describe_backbone(data, path)
    if info is None:
        if not backbone:
            raise CheckpointError(f"{path}: foreign weights (not written by train.py): say which architecture "
                                  f"with --backbone NAME")
        info = {"backbone": backbone, "embedding_size": embedding_size, "channel_order": "rgb",
                "state_dict": state_dict_of(data, path)}
    name = backbone or info["backbone"]
    order = input_order or info["channel_order"]
    state = info["state_dict"]
    check_finite(state, path)
    model = build(name, embedding_size=info["embedding_size"], channel_order=order)
    problems = mismatch_report(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"{path} does not fit backbone {name!r}: " + "; ".join(problems))
    model.load_state_dict(state)
    return LoadedBackbone(model, name, order, state)


def names() -> List[str]:
    """All registered backbone names, sorted."""
    return BACKBONES.names()


def spec(name: str) -> BackboneSpec:
    """Metadata of a registered name (compatible layout, published channel order)."""
    BACKBONES.get(name)  # raises the did-you-mean KeyError
    # names registered with the plain ``register`` decorator carry no metadata
    return SPECS.get(name.lower(), BackboneSpec(name.lower(), family="-"))


__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "FaceBackbone",
    "LoadedBackbone",
    "build",
    "from_file",
    "load_state_dict_file",
    "load_weights",
    "names",
    "register",
    "register_backbone",
    "spec",
]
