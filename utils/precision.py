"""Which half precision ``--amp`` means on a device, and whether it needs a GradScaler.

bf16 has fp32's exponent range, so it needs no loss scaling and cannot overflow where
fp32 would not; it is the choice wherever the hardware computes it natively (CPUs, NVIDIA
Ampere and newer: A100, H100). fp16 with a GradScaler remains for older GPUs (V100, T4),
as arcface_torch trains.
"""

from __future__ import annotations

import torch

AMP_DTYPES = ("auto", "bf16", "fp16")


def amp_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for ``name`` (auto, bf16, fp16) on ``device``; ValueError when it cannot run there."""
    if name not in AMP_DTYPES:
        raise ValueError(f"amp dtype must be one of {', '.join(AMP_DTYPES)}, got {name!r}")
    cuda = device.type == "cuda"
    if name == "fp16":
        if not cuda:
            raise ValueError(f"--amp-dtype fp16 is for CUDA (fp16 autocast with loss scaling); on {device.type} "
                             f"use bf16 or auto")
        return torch.float16
    bf16_ok = not cuda or torch.cuda.is_bf16_supported()
    if name == "bf16" and not bf16_ok:
        raise ValueError(f"--amp-dtype bf16: {torch.cuda.get_device_name(device)} does not compute bf16 "
                         f"natively; use fp16 or auto")
    return torch.bfloat16 if bf16_ok else torch.float16


def needs_grad_scaler(dtype: torch.dtype, device: torch.device) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 ones do not."""
    return dtype == torch.float16 and device.type == "cuda"
