"""The one function that turns images into embeddings.

Evaluation, training-time verification and (later) facebank identification
and ONNX parity checks all call `embed`, so a fix or speed-up lands everywhere.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data.transforms import normalize
from utils.precision import amp_dtype as precision_of
from utils.registry import UnknownNameError, unknown_name_message


class TTAMode(NamedTuple):
    """How the views of an image become one embedding: ``combine(e(x), e(flip x) or None)``.

    ``join`` is the raw (un-normalised) combination: IJB's face features keep the norm, which the
    protocol uses as a quality weight; ``combine`` is ``join`` L2-normalised (verification).
    """

    flip: bool  # whether the flipped view is computed at all
    join: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

    def combine(self, e: torch.Tensor, ef: torch.Tensor | None) -> torch.Tensor:
        return F.normalize(self.join(e, ef), dim=1)


# sum: the insightface protocol; concat: Face_Pytorch (twice the dimension); none: no flip
TTA_MODES: dict[str, TTAMode] = {
    "sum": TTAMode(True, lambda e, ef: e + ef),
    "concat": TTAMode(True, lambda e, ef: torch.cat([e, ef], dim=1)),
    "none": TTAMode(False, lambda e, ef: e),
}


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def _is_channels_last(model: nn.Module) -> bool:
    for p in model.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def embed(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    tta: str = "sum",
    amp: bool = False,
    amp_dtype: str = "auto",
    progress: bool = False,
    desc: str = "embed",
    return_norms: bool = False,
    normalize_rows: bool = True,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """L2-normalised float64 embeddings of uint8 RGB images (N,H,W,3) or (N,3,H,W).

    The flip views are added and normalised in float64, as the published
    protocol does (insightface sums float64 copies of the outputs), so pair
    distances near a threshold fall on the same side as theirs.

    The model is put in eval mode for the call and restored afterwards; inputs
    follow the model's memory format (convert the model to channels_last
    before the call to use it). With `amp` the backbone runs under autocast in
    the dtype training uses (utils.precision.amp_dtype of ``amp_dtype``: "auto"
    is bf16 where the device computes it natively, CPUs included, else fp16), so
    verification during training sees the training's precision; its outputs are
    cast to float64 before the views are combined and normalised.

    TTA modes (``tta``): ``sum`` normalise(e(x) + e(flip x)), the published protocol;
    ``concat`` normalise([e(x), e(flip x)]) (Face_Pytorch, twice the dimension);
    ``none`` normalise(e(x)). The views are combined in float64.

    With ``return_norms`` also returns the L2 norm of each raw, un-flipped e(x)
    (float64, shape (N,)): the per-image "XNorm" insightface reports. With ``normalize_rows`` False
    the combined views are returned un-normalised (float64): IJB's face features.
    """
    if tta not in TTA_MODES:
        raise UnknownNameError(unknown_name_message("tta mode", tta, list(TTA_MODES)))
    mode = TTA_MODES[tta]
    device = torch.device(device)
    autocast = (torch.autocast(device.type, dtype=precision_of(amp_dtype, device)) if amp
                else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    channels_last = _is_channels_last(model)
    n = len(images)
    out: list[np.ndarray] = []
    norms: list[np.ndarray] = []
    try:
        with torch.inference_mode(), autocast:
            bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False)
            for sl in _batches(n, batch_size):
                chunk = images[sl]
                if isinstance(chunk, np.ndarray):  # a read-only memmap (the decode cache) is copied, not wrapped
                    chunk = np.ascontiguousarray(chunk) if chunk.flags.writeable else np.array(chunk, order="C")
                t = torch.from_numpy(chunk) if isinstance(chunk, np.ndarray) else chunk
                x = normalize(t.to(device, non_blocking=True), channels_last=channels_last)
                e = model(x).double()
                ef = model(x.flip(3)).double() if mode.flip else None
                out.append((mode.combine(e, ef) if normalize_rows else mode.join(e, ef)).cpu().numpy())
                norms.append(torch.linalg.vector_norm(e, dim=1).cpu().numpy())
                bar.update(len(t))
            bar.close()
    finally:
        model.train(was_training)
    emb = np.concatenate(out, axis=0) if out else np.zeros((0, 0), np.float64)
    if return_norms:
        return emb, (np.concatenate(norms) if norms else np.zeros(0, np.float64))
    return emb
