"""Parameter and FLOP counts measured on the model itself (no hand-kept tables).

Two numbers per model, both for ONE 112x112 RGB image, in units of 1e9:

* ``gmacs``: multiply-accumulates of Conv2d and Linear layers only;
* ``gflops``: the convention of the published face-recognition tables (arcface_torch counts
  with ptflops): those MACs plus bias adds, plus one op per element for PReLU/ReLU and pooling
  inputs, and two per element for affine BatchNorm. With it our models reproduce the published
  r18 2.6, r34 4.5, r50 6.3, r100 12.1, r200 23.4 and mbf 0.45 GFLOPs; MACs alone give mbf 0.44.

Matmuls that are not layers (a transformer's q k^T and attn v) are counted as MACs by the module
that does them, through an ``extra_macs(inputs, output) -> int`` method (one sample); LayerNorm
counts like BatchNorm. ViT: arcface_torch's ptflops MACs plus its ``extra_gflops`` = ViT-T 1.5G,
ViT-B 11G as published.

Counting runs on the ``meta`` device, so even the largest backbones cost no compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

_ACTIVATIONS = (nn.PReLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass(frozen=True)
class Profile:
    params_m: float  # all parameters (frozen ones too), millions
    gflops: float  # published (ptflops) convention, per image, 1e9
    gmacs: float  # conv + linear multiply-accumulates only, per image, 1e9


def count_params(model: nn.Module) -> int:
    """All parameters (frozen ones too, e.g. arcface_torch's fixed BN1d weight)."""
    return sum(p.numel() for p in model.parameters())


def count_ops(model: nn.Module, input_size: Tuple[int, int] = (112, 112),
              device: torch.device | str | None = None) -> Dict[str, int]:
    """``{'macs': conv+linear MACs, 'flops': published convention}`` for one image of ``input_size`` (H, W)."""
    macs = [0]
    other = [0]

    def conv_hook(m: nn.Conv2d, inp: Tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        kh, kw = m.kernel_size
        macs[0] += out[0].numel() * (m.in_channels // m.groups) * kh * kw  # out[0]: one image
        if m.bias is not None:
            other[0] += out[0].numel()

    def linear_hook(m: nn.Linear, inp: Tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        rows = out[0].numel() // m.out_features
        macs[0] += m.in_features * m.out_features * rows
        if m.bias is not None:
            other[0] += out[0].numel()

    def bn_hook(m: nn.modules.batchnorm._BatchNorm, inp: Tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        other[0] += inp[0][0].numel() * (2 if m.affine else 1)

    def layernorm_hook(m: nn.LayerNorm, inp: Tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        other[0] += inp[0][0].numel() * (2 if m.elementwise_affine else 1)

    def extra_hook(m: nn.Module, inp: Tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        macs[0] += m.extra_macs(inp, out)

    def elementwise_out(m: nn.Module, inp: Tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        other[0] += out[0].numel()

    def elementwise_in(m: nn.Module, inp: Tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        other[0] += inp[0][0].numel()

    hooks = []
    for m in model.modules():
        hook: Callable[..., None] | None = None
        if isinstance(m, nn.Conv2d):
            hook = conv_hook
        elif isinstance(m, nn.Linear):
            hook = linear_hook
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            hook = bn_hook
        elif isinstance(m, _ACTIVATIONS):
            hook = elementwise_out
        elif isinstance(m, _POOLS):
            hook = elementwise_in
        elif isinstance(m, nn.LayerNorm):
            hook = layernorm_hook
        elif callable(getattr(m, "extra_macs", None)):
            hook = extra_hook
        if hook is not None:
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    dev = device if device is not None else next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, *input_size, device=dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {"macs": macs[0], "flops": macs[0] + other[0]}


def profile(builder: Callable[[], nn.Module], input_size: Tuple[int, int] = (112, 112)) -> Profile:
    """Build with ``builder()`` on the meta device and measure params (M), GFLOPs and GMACs."""
    with torch.device("meta"):
        model = builder()
    ops = count_ops(model, input_size, device="meta")
    return Profile(count_params(model) / 1e6, ops["flops"] / 1e9, ops["macs"] / 1e9)


def profile_table(names: List[str] | None = None) -> List[Tuple[str, Profile, str, str]]:
    """(name, profile, compatible layout or '-', published channel order) for registered backbones."""
    from . import build, spec
    from . import names as all_names

    rows = []
    for name in names or all_names():
        s = spec(name)
        rows.append((name, profile(lambda n=name: build(n)), s.layout or "-", s.trained_channel_order))
    return rows
