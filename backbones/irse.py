"""IR and IR-SE ResNets (ArcFace paper, "improved residual" units) in the InsightFace_Pytorch layout.

Names ``ir50``, ``ir_se50``, ``ir100``, ``ir_se100``, ``ir152``, ``ir_se152``; their state_dicts
equal TreB1eN's ``Backbone(num_layers, drop_ratio, mode)`` key for key, so a published
``model_ir_se50.pth`` loads with ``strict=True``. Those weights were trained on BGR input:
build with ``channel_order='bgr'`` to use them behind an RGB pipeline.

Unit: BN -> 3x3 conv -> PReLU -> 3x3 conv (stride s) -> BN [-> SE], plus a shortcut that is a
strided identity (``MaxPool2d(1, s)``) when widths match, else 1x1 conv + BN. Head: BN2d ->
Dropout -> Flatten -> Linear(512*7*7 -> E) -> BN1d. The published forward L2-normalises; ours
returns the raw embedding (normalising is the head's / evaluator's job).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from .base import FaceBackbone, fp32, register_backbone

STAGE_BLOCKS: Dict[int, Tuple[int, int, int, int]] = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
STAGE_WIDTHS = (64, 128, 256, 512)


class SEModule(nn.Module):
    """Squeeze-and-excitation with 1x1 convs (keys ``fc1``, ``fc2``, no biases), reduction 16."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.fc2(self.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * w


class BottleneckIR(nn.Module):
    """IR unit (``se=True``: IR-SE); keys ``shortcut_layer`` (convs only) and ``res_layer``."""

    def __init__(self, cin: int, cout: int, stride: int, se: bool):
        super().__init__()
        if cin == cout:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)  # strided identity
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        layers: List[nn.Module] = [
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if se:
            layers.append(SEModule(cout))
        self.res_layer = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut_layer(x) + self.res_layer(x)


class IRBackbone(FaceBackbone):
    """InsightFace_Pytorch ``Backbone``: 112x112 -> 7x7x512 -> BN/Dropout/Linear/BN1d -> E."""

    def __init__(self, num_layers: int = 50, se: bool = True, embedding_size: int = 512, dropout: float = 0.0,
                 channel_order: str = "rgb"):
        super().__init__(embedding_size, channel_order, dropout)
        if num_layers not in STAGE_BLOCKS:
            raise ValueError(f"IR num_layers {num_layers!r} not one of {sorted(STAGE_BLOCKS)}")
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        units: List[nn.Module] = []
        cin = 64
        for width, n in zip(STAGE_WIDTHS, STAGE_BLOCKS[num_layers]):
            units.append(BottleneckIR(cin, width, 2, se))
            units += [BottleneckIR(width, width, 1, se) for _ in range(n - 1)]
            cin = width
        self.body = nn.Sequential(*units)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512), nn.Dropout(dropout), nn.Flatten(), nn.Linear(512 * 7 * 7, embedding_size),
            nn.BatchNorm1d(embedding_size),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.input_layer(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        bn2d, drop, flatten, linear, bn1d = self.output_layer
        x = flatten(drop(bn2d(x)))
        return fp32(lambda t: bn1d(linear(t)), x)


def _register(num_layers: int, se: bool) -> None:
    name = f"ir_se{num_layers}" if se else f"ir{num_layers}"

    def builder(embedding_size: int = 512, dropout: float = 0.0, channel_order: str = "rgb",
                **kwargs: Any) -> IRBackbone:
        return IRBackbone(num_layers, se, embedding_size, dropout, channel_order, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"InsightFace_Pytorch {'IR-SE' if se else 'IR'}-{num_layers} (published weights: BGR input)."
    register_backbone(name, family="irse", layout=f"InsightFace_Pytorch/{name}", trained_channel_order="bgr")(builder)


for _n in (50, 100, 152):
    for _se in (False, True):
        _register(_n, _se)
