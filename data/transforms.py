"""Image tensors from uint8 to what backbones expect, done on the device.

Batches travel as uint8 (4x less host->device traffic than float) and are
normalised where they are used: (x/255 - 0.5)/0.5, RGB, NCHW.
"""

from __future__ import annotations

import torch


def normalize(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B,3,H,W) or (B,H,W,3) RGB -> float32 (B,3,H,W) in [-1, 1]."""
    if images.dim() != 4:
        raise ValueError(f"expected a 4-d image batch, got shape {tuple(images.shape)}")
    if images.shape[1] != 3 and images.shape[-1] == 3:
        images = images.permute(0, 3, 1, 2)
    x = images.float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def apply_flips(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flip (along the width of a (B,C,H,W) batch) the images where the bool `mask` (B,) is True."""
    mask = mask.to(images.device, non_blocking=True).view(-1, 1, 1, 1)
    return torch.where(mask, images.flip(3), images)
