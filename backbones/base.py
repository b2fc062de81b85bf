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
  so the embedding is float32 and fp16 overflow in the wide head cannot happen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple, TypeVar

import torch
from torch import nn

from utils.registry import Registry

CHANNEL_ORDERS = ("rgb", "bgr")

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


def fp32(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``module`` on ``x`` in float32 with autocast switched off (fp16/bf16-safe head)."""
    device_type = x.device.type
    if not torch.amp.is_autocast_available(device_type):  # e.g. 'meta' while profiling
        return module(x.float())
    with torch.autocast(device_type=device_type, enabled=False):
        return module(x.float())


class FaceBackbone(nn.Module):
    """Base class: RGB (B,3,112,112) in [-1, 1] -> (B, embedding_size) un-normalised embedding.

    Subclasses implement :meth:`forward_features` (the trunk, input already in the trained
    channel order) and :meth:`forward_head` (features -> embedding, last Linear/BN in fp32).
    """

    input_size: Tuple[int, int] = (112, 112)

    def __init__(self, embedding_size: int = 512, channel_order: str = "rgb") -> None:
        super().__init__()
        if embedding_size <= 0:
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        self.embedding_size = int(embedding_size)
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
