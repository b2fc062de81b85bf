"""arcface_torch IResNets (``iresnet18/34/50/100/200``), in insightface's published layout (RGB input).

Unit: BN -> 3x3 conv -> BN -> PReLU -> 3x3 conv (stride s) -> BN, plus a 1x1 conv + BN
``downsample`` on the first unit of every stage (all stages stride 2). Head: ``bn2`` (BN2d) ->
Dropout -> Flatten -> ``fc`` Linear(512*7*7 -> E) -> ``features`` BN1d whose weight is frozen at
1 (``requires_grad=False``, as published). GFLOPs (MACs) at 112x112, published: r18 2.6, r34 4.5,
r50 6.3, r100 12.1, r200 23.4.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from .base import FaceBackbone, fp32, register_backbone

STAGE_BLOCKS: Dict[int, Tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 200: (6, 26, 60, 6),
}
STAGE_WIDTHS = (64, 128, 256, 512)


class IBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + (x if self.downsample is None else self.downsample(x))


class IResNet(FaceBackbone):
    """arcface_torch ``IResNet``: 112x112 -> 7x7x512 -> bn2/dropout/fc/features -> E."""

    def __init__(self, num_layers: int = 50, embedding_size: int = 512, dropout: float = 0.0,
                 channel_order: str = "rgb"):
        super().__init__(embedding_size, channel_order, dropout)
        if num_layers not in STAGE_BLOCKS:
            raise ValueError(f"iresnet num_layers {num_layers!r} not one of {sorted(STAGE_BLOCKS)}")
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU(64)
        cin = 64
        for i, (width, n) in enumerate(zip(STAGE_WIDTHS, STAGE_BLOCKS[num_layers]), start=1):
            down = nn.Sequential(nn.Conv2d(cin, width, 1, 2, bias=False), nn.BatchNorm2d(width))
            blocks: List[nn.Module] = [IBasicBlock(cin, width, 2, down)]
            blocks += [IBasicBlock(width, width) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = width
        self.bn2 = nn.BatchNorm2d(512)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(512 * 7 * 7, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.fc.weight, 0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return fp32(lambda t: self.features(self.fc(t)), x)


def _register(num_layers: int) -> None:
    name = f"iresnet{num_layers}"

    def builder(embedding_size: int = 512, dropout: float = 0.0, channel_order: str = "rgb",
                **kwargs: Any) -> IResNet:
        return IResNet(num_layers, embedding_size, dropout, channel_order, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"arcface_torch iresnet{num_layers} (published weights: RGB input)."
    register_backbone(name, family="iresnet", layout=f"arcface_torch/{name}", trained_channel_order="rgb")(builder)


for _n in STAGE_BLOCKS:
    _register(_n)
