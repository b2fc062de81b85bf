"""MobileFaceNet (Chen et al. 2018) in the two published state_dict layouts.

* ``mobilefacenet``: InsightFace_Pytorch (TreB1eN) ``MobileFaceNet(512)``; published weights
  were trained on BGR input. Blocks (1 = dw conv, then 4, 6, 2 residual bottlenecks), widths
  64/128, expansion widths 128/256/512, global depthwise 7x7 conv, Linear(512 -> E), BN1d.
* ``mbf``: insightface arcface_torch ``get_mbf(num_features=E)`` (scale 2: widths doubled,
  stem 128 channels), trained on RGB.

Both keep the published module names, so their state_dicts equal the reference layouts key
for key. Our dropout (default 0) sits before the Linear and owns no state.
"""

from __future__ import annotations

from typing import Any, List, Sequence

import torch
from torch import nn

from .base import FaceBackbone, fp32, register_backbone

# ---------------------------------------------------------------- InsightFace_Pytorch layout


class ConvBnPrelu(nn.Module):
    """conv (no bias) -> BN -> PReLU; keys ``conv``, ``bn``, ``prelu``."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.prelu = nn.PReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prelu(self.bn(self.conv(x)))


class ConvBn(nn.Module):
    """conv (no bias) -> BN, no activation; keys ``conv``, ``bn``."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to ``mid`` -> 3x3 depthwise -> 1x1 linear projection."""

    def __init__(self, cin: int, cout: int, mid: int, stride: int = 1, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.conv = ConvBnPrelu(cin, mid)
        self.conv_dw = ConvBnPrelu(mid, mid, 3, stride, 1, groups=mid)
        self.project = ConvBn(mid, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.conv_dw(self.conv(x)))
        return x + y if self.residual else y


class Residual(nn.Module):
    """``num_blocks`` stride-1 residual bottlenecks of width ``c``; key ``model``."""

    def __init__(self, c: int, num_blocks: int, mid: int):
        super().__init__()
        self.model = nn.Sequential(*[DepthWise(c, c, mid, residual=True) for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MobileFaceNet(FaceBackbone):
    """InsightFace_Pytorch MobileFaceNet: 112x112 -> 7x7x512 -> GDC -> Linear -> BN1d."""

    def __init__(self, embedding_size: int = 512, dropout: float = 0.0, channel_order: str = "rgb"):
        super().__init__(embedding_size, channel_order, dropout)
        self.conv1 = ConvBnPrelu(3, 64, 3, 2, 1)
        self.conv2_dw = ConvBnPrelu(64, 64, 3, 1, 1, groups=64)
        self.conv_23 = DepthWise(64, 64, 128, stride=2)
        self.conv_3 = Residual(64, 4, 128)
        self.conv_34 = DepthWise(64, 128, 256, stride=2)
        self.conv_4 = Residual(128, 6, 256)
        self.conv_45 = DepthWise(128, 128, 512, stride=2)
        self.conv_5 = Residual(128, 2, 256)
        self.conv_6_sep = ConvBnPrelu(128, 512)
        self.conv_6_dw = ConvBn(512, 512, 7, 1, 0, groups=512)  # global depthwise conv (GDC)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(512, embedding_size, bias=False)
        self.bn = nn.BatchNorm1d(embedding_size)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for m in (self.conv1, self.conv2_dw, self.conv_23, self.conv_3, self.conv_34, self.conv_4, self.conv_45):
            x = m(x)
        return self.conv_6_sep(self.conv_5(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(torch.flatten(self.conv_6_dw(x), 1))
        return fp32(lambda t: self.bn(self.linear(t)), x)


# ---------------------------------------------------------------- arcface_torch layout


class _Seq(nn.Module):
    """A module whose only child is ``layers`` (an nn.Sequential), as arcface_torch names them."""

    def __init__(self, *mods: nn.Module):
        super().__init__()
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _conv_block(cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1) -> _Seq:
    return _Seq(nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout),
                nn.PReLU(cout))


def _linear_block(cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1) -> _Seq:
    return _Seq(nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout))


class _DepthWiseA(_Seq):
    def __init__(self, cin: int, cout: int, mid: int, stride: int = 1, residual: bool = False):
        super().__init__(_conv_block(cin, mid), _conv_block(mid, mid, 3, stride, 1, groups=mid),
                         _linear_block(mid, cout))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(x)
        return x + y if self.residual else y


def _residual_a(c: int, num_blocks: int, mid: int) -> _Seq:
    return _Seq(*[_DepthWiseA(c, c, mid, residual=True) for _ in range(num_blocks)])


class MobileFaceNetArcface(FaceBackbone):
    """arcface_torch ``get_mbf``: MobileFaceNet with widths x ``scale`` (published: scale 2)."""

    def __init__(self, embedding_size: int = 512, dropout: float = 0.0, channel_order: str = "rgb",
                 blocks: Sequence[int] = (1, 4, 6, 2), scale: int = 2):
        super().__init__(embedding_size, channel_order, dropout)
        w1, w2 = 64 * scale, 128 * scale
        layers: List[nn.Module] = [_conv_block(3, w1, 3, 2, 1)]
        if blocks[0] == 1:
            layers.append(_conv_block(w1, w1, 3, 1, 1, groups=64))
        else:
            layers.append(_residual_a(w1, blocks[0], 128))
        layers += [
            _DepthWiseA(w1, w1, 128, stride=2),
            _residual_a(w1, blocks[1], 128),
            _DepthWiseA(w1, w2, 256, stride=2),
            _residual_a(w2, blocks[2], 256),
            _DepthWiseA(w2, w2, 512, stride=2),
            _residual_a(w2, blocks[3], 256),
        ]
        self.layers = nn.Sequential(*layers)
        self.conv_sep = _conv_block(w2, 512)
        # GDC head; indices 0..3 as published: [dw 7x7 conv+BN, Flatten, Linear, BN1d]
        self.features = _Seq(_linear_block(512, 512, 7, 1, 0, groups=512), nn.Flatten(),
                             nn.Linear(512, embedding_size, bias=False), nn.BatchNorm1d(embedding_size))
        self.dropout = nn.Dropout(dropout)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_sep(self.layers(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        gdc, flatten, linear, bn = self.features.layers
        x = self.dropout(flatten(gdc(x)))
        return fp32(lambda t: bn(linear(t)), x)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)


@register_backbone("mobilefacenet", family="mobilefacenet", layout="InsightFace_Pytorch/mobilefacenet",
                   trained_channel_order="bgr")
def mobilefacenet(embedding_size: int = 512, dropout: float = 0.0, channel_order: str = "rgb",
                  **kwargs: Any) -> MobileFaceNet:
    """InsightFace_Pytorch MobileFaceNet (about 1.2M params, 0.23 GMACs at 112x112)."""
    return MobileFaceNet(embedding_size, dropout, channel_order, **kwargs)


@register_backbone("mbf", family="mobilefacenet", layout="arcface_torch/mbf", trained_channel_order="rgb")
def mbf(embedding_size: int = 512, dropout: float = 0.0, channel_order: str = "rgb",
        **kwargs: Any) -> MobileFaceNetArcface:
    """arcface_torch MobileFaceNet ``mbf`` (scale 2; published 0.45 GFLOPs at 112x112)."""
    return MobileFaceNetArcface(embedding_size, dropout, channel_order, **kwargs)
