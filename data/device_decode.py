"""Decode a batch of JPEGs where the model runs (nvJPEG on CUDA), so the CPU is not the bottleneck.

The DataLoader workers then only read bytes; this module turns a list of encoded
images into one uint8 (B, 3, H, W) RGB tensor on the device. Payloads that are not
JPEG (PNG in some packs) or that fail in the batch are decoded one by one, on the
CPU if need be; an undecodable one is reported by position, as the CPU path reports it.

Two codecs, one registry: TorchCodec (``torchcodec.decoders``, where the package is
installed: the home of PyTorch's image codecs from torchvision 0.29 on, which deprecates
its own) and torchvision.io as the fallback while it exists. ``codec()`` picks the first
that loads and decodes a small JPEG on the device asked for (a CPU-only TorchCodec build,
or one built for another torch, falls back to torchvision rather than reporting every image
undecodable); ``decode_batch(..., codec_name=...)`` forces one (benchmarks, tests). No codec
that works there is CodecError, one line. Both give the pixels cv2 gives for the same bytes on
the CPU (tests/test_device_decode.py).
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from data.imageformat import image_format
from utils.errors import UserError


class CodecError(UserError, ImportError):
    """No codec decodes JPEGs on the device asked for (none loads, or none reaches the device): one line."""


class Codec(NamedTuple):
    """How one library decodes: a batch of JPEGs onto a device, and any one image (RGB, uint8, CHW)."""

    name: str
    jpegs: Callable[[List[torch.Tensor], torch.device], Sequence[torch.Tensor]]
    image: Callable[[torch.Tensor], torch.Tensor]


def _torchcodec() -> Codec:
    from torchcodec.decoders import decode_image, decode_jpeg

    return Codec("torchcodec", lambda payloads, device: decode_jpeg(list(payloads), mode="RGB", device=device),
                 lambda payload: decode_image(payload, mode="RGB"))


def _torchvision() -> Codec:
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    return Codec("torchvision", lambda payloads, device: decode_jpeg(list(payloads), mode=ImageReadMode.RGB,
                                                                      device=device),
                 lambda payload: decode_image(payload, mode=ImageReadMode.RGB))


#: Preference order: the first that loads and decodes on the device is used.
CODECS: Dict[str, Callable[[], Codec]] = {"torchcodec": _torchcodec, "torchvision": _torchvision}
_CHOSEN: Dict[Tuple[str, str], Codec] = {}
# what a codec may raise when it cannot load (a missing package; a library built for another torch or
# without CUDA: OSError, RuntimeError) or cannot decode on the device (RuntimeError, NotImplementedError)
_UNUSABLE = (ImportError, OSError, RuntimeError, ValueError, AttributeError)


def _probe(c: Codec, device: torch.device) -> None:
    """Raise RuntimeError unless ``c`` decodes a batch of two small JPEGs onto ``device`` as (3, 16, 16) uint8."""
    jpeg = torch.from_numpy(cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))[1].copy())
    out = list(c.jpegs([jpeg, jpeg.clone()], device))
    if len(out) != 2 or any(t.shape != (3, 16, 16) or t.dtype != torch.uint8 or t.device.type != device.type
                            for t in out):
        raise RuntimeError(f"a test JPEG came back as {[(tuple(t.shape), t.dtype, str(t.device)) for t in out]}")


def codec(name: str | None = None, device: torch.device | str = "cpu") -> Codec:
    """The codec called ``name``, or the first of CODECS that loads and decodes on ``device`` (cached
    per process and device); CodecError naming each codec's failure when none does."""
    device = torch.device(device)
    key = (name or "auto", str(device))
    if key not in _CHOSEN:
        names = [name] if name else list(CODECS)
        errors = []
        for n in names:
            try:
                c = CODECS[n]()
                _probe(c, device)
            except _UNUSABLE as exc:
                errors.append(f"{n}: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}")
                continue
            _CHOSEN[key] = c
            break
        else:
            raise CodecError(f"--decode-on-device: no image codec decodes JPEGs on {device} ({'; '.join(errors)})")
    return _CHOSEN[key]


def _is_jpeg(payload: torch.Tensor) -> bool:
    return image_format(bytes(payload[:16].tolist())) == "jpeg"


def _one(c: Codec, payload: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        if _is_jpeg(payload):
            return c.jpegs([payload], device)[0]
        return c.image(payload).to(device)
    except (RuntimeError, ValueError):
        return None


def decode_batch(payloads: List[torch.Tensor], device: torch.device, size: Tuple[int, int] = (112, 112),
                 codec_name: str | None = None) -> Tuple[torch.Tensor, List[int]]:
    """(uint8 (B', 3, H, W) RGB on `device`, positions of the undecodable payloads) from 1-D uint8 payloads.

    Images of another size are resized (area-like, antialiased) to `size` (H, W).
    """
    c = codec(codec_name, device)
    images: List[torch.Tensor | None]
    try:
        if not all(_is_jpeg(p) for p in payloads):
            raise RuntimeError("not all JPEG")
        images = list(c.jpegs(payloads, device))
    except (RuntimeError, ValueError):  # a PNG or a damaged payload in the batch: one by one
        images = [_one(c, p, device) for p in payloads]
    bad = [i for i, img in enumerate(images) if img is None]
    good = [img if img.shape[1:] == size else _resize(img, size) for img in images if img is not None]
    if not good:
        return torch.zeros(0, 3, *size, dtype=torch.uint8, device=device), bad
    return torch.stack(good), bad


def _resize(img: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    x = F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)[0]
