"""The surface every backbone shares, and the backbone registry.

Contract (every backbone, every caller):

* input: RGB images, shape ``(B, 3, 112, 112)``, normalised as ``(x / 255 - 0.5) / 0.5``
  (values in [-1, 1]);
* output: ``(B, embedding_size)`` *un-normalised* embedding (margin heads and evaluation
  L2-normalise it themselves);
* ``channel_order`` says what the weights were trained on. A ``'bgr'`` backbone flips the
  channels of its (RGB) input once, so BGR-trained checkpoints (InsightFace_Pytorch) work
  behind an RGB data pipeline. The flip is not a parameter and adds no state_dict key.
* The last Linear/BN of the embedding head runs in float32 even under ``torch.autocast``,
  so the embedding is float32 and fp16 overflow in the wide head cannot happen. A model
  converted with ``.double()`` runs that head (and everything else) in float64 and returns
  a float64 embedding.
* ``embedding_size`` is an integer in [1, 65536] and ``dropout`` a probability in [0, 1);
  both are checked before any layer is built (:func:`check_head_args`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple, TypeVar

import torch
from torch import nn

from utils.registry import Registry

CHANNEL_ORDERS = ("rgb", "bgr")
MAX_EMBEDDING_SIZE = 65536  # 128x the usual 512; beyond it the Linear alone would be absurd (25088 x E floats)

BACKBONES = Registry("backbone")

F = TypeVar("F", bound=Callable[..., "FaceBackbone"])


@dataclass(frozen=True)
class BackboneSpec:
    """What a registered name is, besides how to build it.

    ``layout`` names the published key set its state_dict matches exactly: an entry of
    ``state_dict_layouts.json`` (``InsightFace_Pytorch/ir_se50``, ``arcface_torch/iresnet50``...) or
    ``efficientnet_pytorch/efficientnet-bN`` (the stock package model); ``None`` if there is no
    published checkpoint layout. ``trained_channel_order`` is the channel order
    the published checkpoints of that layout were trained on (our default build is always RGB).
    """

    name: str
    family: str
    layout: str | None = None
    trained_channel_order: str = "rgb"


SPECS: Dict[str, BackboneSpec] = {}


def register_backbone(
    name: str, *, family: str, layout: str | None = None, trained_channel_order: str = "rgb"
) -> Callable[[F], F]:
    """Decorator: register a builder under ``name`` in :data:`BACKBONES` and record its metadata."""
    if trained_channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"backbone {name!r}: trained_channel_order {trained_channel_order!r} not in {CHANNEL_ORDERS}")

    def deco(fn: F) -> F:
        BACKBONES.register(name)(fn)
        SPECS[name.lower()] = BackboneSpec(name.lower(), family, layout, trained_channel_order)
        return fn

    return deco


def check_channel_order(channel_order: str) -> str:
    order = channel_order.lower()
    if order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order {channel_order!r} is not one of {CHANNEL_ORDERS}")
    return order


def check_head_args(embedding_size: Any, dropout: Any) -> tuple[int, float]:
    """(embedding_size, dropout) if ``embedding_size`` is an integer in [1, 65536] and ``dropout``
    a finite probability in [0, 1); TypeError/ValueError naming the parameter otherwise.
    Called before any layer exists, so a typo like 10**9 never allocates."""
    if isinstance(embedding_size, bool) or not isinstance(embedding_size, numbers.Integral):
        raise TypeError(f"embedding_size must be an integer in [1, {MAX_EMBEDDING_SIZE}], got {embedding_size!r}")
    if not 1 <= embedding_size <= MAX_EMBEDDING_SIZE:
        raise ValueError(f"embedding_size must be an integer in [1, {MAX_EMBEDDING_SIZE}], got {embedding_size!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise TypeError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if not (math.isfinite(float(dropout)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    return int(embedding_size), float(dropout)


def fp32(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``module`` on ``x`` with autocast switched off, in float32 at least (fp16/bf16-safe head).

    Half-precision ``x`` (from an autocast trunk) becomes float32; float32 and float64 stay
    as they are, so a ``.double()`` model computes its embedding in float64.
    """
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    device_type = x.device.type
    if not torch.amp.is_autocast_available(device_type):  # e.g. 'meta' while profiling
        return module(x)
    with torch.autocast(device_type=device_type, enabled=False):
        return module(x)


class FaceBackbone(nn.Module):
    """Base class: RGB (B,3,112,112) in [-1, 1] -> (B, embedding_size) un-normalised embedding.

    Subclasses implement :meth:`forward_features` (the trunk, input already in the trained
    channel order) and :meth:`forward_head` (features -> embedding, last Linear/BN in fp32).
    """

    input_size: Tuple[int, int] = (112, 112)

    def __init__(self, embedding_size: int = 512, channel_order: str = "rgb", dropout: float = 0.0) -> None:
        """Checks ``embedding_size``, ``dropout`` and ``channel_order``: call it before building layers."""
        super().__init__()
        self.embedding_size, _ = check_head_args(embedding_size, dropout)
        self.channel_order = check_channel_order(channel_order)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{type(self).__name__} expects (B, 3, H, W) RGB images, got shape {tuple(x.shape)}")
        if self.channel_order == "bgr":
            x = x.flip(1)  # RGB -> BGR; weights were trained on BGR
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, channel_order={self.channel_order!r}"
