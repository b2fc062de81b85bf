"""Decode a batch of JPEGs where the model runs (nvJPEG on CUDA), so the CPU is not the bottleneck.

The DataLoader workers then only read bytes; this module turns a list of encoded
images into one uint8 (B, 3, H, W) RGB tensor on the device with
torchvision.io.decode_jpeg (batched on CUDA). Payloads that are not JPEG (PNG in
some packs) or that fail in the batch are decoded one by one, on the CPU if need
be; an undecodable one is reported by position, as the CPU path reports it.
(torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they
still work, and this is the one module to change when they go.)
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

from data.imageformat import image_format


def _is_jpeg(payload: torch.Tensor) -> bool:
    return image_format(bytes(payload[:16].tolist())) == "jpeg"


def _one(payload: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    try:
        if _is_jpeg(payload):
            return decode_jpeg(payload, mode=ImageReadMode.RGB, device=device)
        return decode_image(payload, mode=ImageReadMode.RGB).to(device)
    except RuntimeError:
        return None


def decode_batch(payloads: List[torch.Tensor], device: torch.device,
                 size: Tuple[int, int] = (112, 112)) -> Tuple[torch.Tensor, List[int]]:
    """(uint8 (B', 3, H, W) RGB on `device`, positions of the undecodable payloads) from 1-D uint8 payloads.

    Images of another size are resized (area-like, antialiased) to `size` (H, W).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    images: List[torch.Tensor | None]
    try:
        if not all(_is_jpeg(p) for p in payloads):
            raise RuntimeError("not all JPEG")
        images = list(decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # a PNG or a damaged payload in the batch: one by one
        images = [_one(p, device) for p in payloads]
    bad = [i for i, img in enumerate(images) if img is None]
    good = [img if img.shape[1:] == size else _resize(img, size) for img in images if img is not None]
    if not good:
        return torch.zeros(0, 3, *size, dtype=torch.uint8, device=device), bad
    return torch.stack(good), bad


def _resize(img: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    x = F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)[0]
