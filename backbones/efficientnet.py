"""EfficientNet-B0..B7 (``efficientnet_pytorch`` blocks, never any weight download) for 112x112 faces.

Two variants per size:

* ``efficientnet_bN`` (face): the stem conv keeps resolution (stride 1), so the four stride-2
  stages take 112 -> 7; the head is BN2d -> Dropout -> Flatten -> Linear(C*7*7 -> E) -> BN1d
  (C = the width-scaled 1280 channels of ``_conv_head``), as for IR nets. Block paddings are
  computed by the package as for a 224 input after a stride-2 stem, i.e. for our 112 map.
  The Linear dominates the parameter count for big widths (B7: C = 2560 -> 64M).
* ``efficientnet_bN_plain``: stock ``EfficientNet.from_name('efficientnet-bN', num_classes=E)``
  (stride-2 stem, global average pool, ``_fc`` producing the embedding), whose state_dict equals
  the stock one key for key, so Insightface_EfficientNet checkpoints load.

Swish is plain ``x * sigmoid(x)`` by default (exportable, torch.compile friendly); call
``set_swish(memory_efficient=True)`` to trade that for the package's activation-memory-saving
autograd Function when training big variants eagerly.

The package is imported when an EfficientNet is built, not when this module is: every other
backbone (and train.py, evaluate.py) works on a machine without it (a GPU box whose image
lacks it; it ships no wheel to carry there).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import FaceBackbone, check_head_args, fp32, register_backbone

_TRUNK = ("_conv_stem", "_bn0", "_blocks", "_conv_head", "_bn1", "_swish")


def _stock(name: str, **kwargs: Any) -> Any:
    """``efficientnet_pytorch.EfficientNet.from_name(name, **kwargs)`` (imported here, see the module docstring)."""
    from efficientnet_pytorch import EfficientNet

    return EfficientNet.from_name(name, **kwargs)


class _EfficientNetBase(FaceBackbone):
    """Adopts the stock model's modules as direct children (stock key names, no wrapper prefix)."""

    def __init__(self, net: nn.Module, embedding_size: int, channel_order: str):
        super().__init__(embedding_size, channel_order)
        self._global_params = net._global_params
        for name in _TRUNK:
            setattr(self, name, getattr(net, name))
        self.set_swish(memory_efficient=False)

    def set_swish(self, memory_efficient: bool = False) -> None:
        """Plain swish (export/compile safe) or the package's memory-efficient autograd Function."""
        from efficientnet_pytorch.utils import MemoryEfficientSwish, Swish

        self._swish = MemoryEfficientSwish() if memory_efficient else Swish()
        for block in self._blocks:
            block.set_swish(memory_efficient)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._swish(self._bn0(self._conv_stem(x)))
        rate = self._global_params.drop_connect_rate or 0.0
        n = len(self._blocks)
        for i, block in enumerate(self._blocks):
            x = block(x, drop_connect_rate=rate * i / n if rate else None)
        return self._swish(self._bn1(self._conv_head(x)))


class EfficientNetFace(_EfficientNetBase):
    """EfficientNet trunk at full 112x112 stem resolution with a flatten-Linear embedding head."""

    def __init__(self, variant: int, embedding_size: int = 512, dropout: float = 0.0, channel_order: str = "rgb",
                 drop_connect_rate: float = 0.2):
        check_head_args(embedding_size, dropout)  # before the package builds anything
        # image_size=224 makes the package compute the SAME paddings for the maps our stride-1
        # stem produces from a 112 input (112, 56, 28, 14, 7).
        net = _stock(f"efficientnet-b{variant}", image_size=224, include_top=False,
                     drop_connect_rate=drop_connect_rate)
        super().__init__(net, embedding_size, channel_order)
        stem = net._conv_stem
        self._conv_stem = nn.Conv2d(stem.in_channels, stem.out_channels, 3, 1, 1, bias=False)
        channels = net._bn1.num_features
        self.bn = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * 7 * 7, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)
        nn.init.kaiming_normal_(self._conv_stem.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.fc.weight, 0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(torch.flatten(self.bn(x), 1))
        return fp32(lambda t: self.features(self.fc(t)), x)


class EfficientNetPlain(_EfficientNetBase):
    """Stock EfficientNet: stride-2 stem, average pool, dropout, ``_fc`` to the embedding."""

    def __init__(self, variant: int, embedding_size: int = 512, dropout: float = 0.0, channel_order: str = "rgb",
                 drop_connect_rate: float | None = None):
        check_head_args(embedding_size, dropout)  # before the package builds anything
        extra = {} if drop_connect_rate is None else {"drop_connect_rate": drop_connect_rate}
        net = _stock(f"efficientnet-b{variant}", num_classes=embedding_size, dropout_rate=dropout, **extra)
        super().__init__(net, embedding_size, channel_order)
        self._avg_pooling = net._avg_pooling
        self._dropout = net._dropout
        self._fc = net._fc

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self._dropout(torch.flatten(self._avg_pooling(x), 1))
        return fp32(self._fc, x)


def _register(variant: int) -> None:
    def face(embedding_size: int = 512, dropout: float = 0.0, channel_order: str = "rgb",
             **kwargs: Any) -> EfficientNetFace:
        return EfficientNetFace(variant, embedding_size, dropout, channel_order, **kwargs)

    def plain(embedding_size: int = 512, dropout: float = 0.0, channel_order: str = "rgb",
              **kwargs: Any) -> EfficientNetPlain:
        return EfficientNetPlain(variant, embedding_size, dropout, channel_order, **kwargs)

    face.__name__ = face.__qualname__ = f"efficientnet_b{variant}"
    face.__doc__ = f"EfficientNet-B{variant} for 112x112 faces (stride-1 stem, flatten-Linear-BN1d head)."
    plain.__name__ = plain.__qualname__ = f"efficientnet_b{variant}_plain"
    plain.__doc__ = f"Stock EfficientNet-B{variant}, ``_fc`` = embedding (Insightface_EfficientNet checkpoints)."
    register_backbone(face.__name__, family="efficientnet")(face)
    register_backbone(plain.__name__, family="efficientnet", layout=f"efficientnet_pytorch/efficientnet-b{variant}",
                      trained_channel_order="rgb")(plain)


for _v in range(8):
    _register(_v)
