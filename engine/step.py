"""The pieces of one optimizer step: what DDP wraps, the flips of a global batch, the
forward and backward passes of its micro-batches, gradient clipping across shards, and
the verdict on a non-finite step (engine/update.py puts the end of a step together).

Every function treats all heads alike: a head's sharded parameters (Partial FC's centres
under several ranks; none for a dense head) are the only thing that differs, and they are
passed in as a list (``Objective.sharded_parameters()``).
"""

from __future__ import annotations

import contextlib
import math
from typing import List, Tuple

import torch
import torch.nn as nn

from data.transforms import flip_normalize
from engine import distributed as dist_utils
from engine.distributed import DistInfo
from engine.feeder import MicroBatch
from engine.objective import Objective
from engine.teacher import Distillation


class StepModule(nn.Module):
    """What DDP (or DataParallel) wraps: the backbone and the objective's replica (a dense head), if any."""

    def __init__(self, model: nn.Module, replica: nn.Module | None, amp_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model, self.head, self.amp_dtype = model, replica, amp_dtype

    def forward(self, x: torch.Tensor, labels: torch.Tensor):
        """(embeddings in fp32, the replica's output or None)."""
        autocast = (torch.autocast(x.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            emb = self.model(x)
        emb = emb.float()  # the head and the softmax run in fp32
        return emb, (None if self.head is None else self.head(emb, labels))


def wrap(module: StepModule, info: DistInfo, device: torch.device, data_parallel: bool) -> nn.Module:
    """``module`` under DDP when there is a process group, else DataParallel if asked, else itself."""
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(module, device_ids=ids)  # BN statistics follow rank 0 (buffers broadcast each forward)
    if data_parallel:
        return nn.DataParallel(module)
    return module


def wants_data_parallel(enabled: bool, info: DistInfo, device: torch.device) -> bool:
    """DataParallel over all visible GPUs: one process, CUDA without an index, more than one GPU, ``enabled``."""
    return (enabled and not info.distributed and device.type == "cuda" and device.index is None
            and torch.cuda.device_count() > 1)


def copy_all(dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
    """dst[i].copy_(src[i]) for all i: one fused kernel where torch has it (hundreds of BN buffers per step)."""
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None:
        foreach(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


def flip_masks(seed: int, step: int, accum: int, batch: int, info: DistInfo) -> torch.Tensor:
    """(K, B) flip coins of this rank's micro-batches, sliced from the global batch's coins.

    Drawn for the whole optimizer step (K*B*W images, generator seeded by (seed, step)) in
    the sampler's order, where this rank's micro-batch m holds the images at positions
    W*(B*m + j) + rank: so the flips do not depend on how the batch is split.
    """
    w = info.world_size
    g = torch.Generator().manual_seed(seed * 7919 + step)
    coins = torch.rand(accum * batch * w, generator=g) < 0.5
    return coins.view(accum, batch, w)[:, :, info.rank]


def accumulate_gradients(module: nn.Module, objective: Objective, distill: Distillation | None,
                         scaler: torch.amp.GradScaler, micro_batches: List[MicroBatch], masks: torch.Tensor,
                         info: DistInfo, device: torch.device,
                         channels_last: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward passes over one step's K uint8 micro-batches through ``module`` (the
    step module, maybe under DDP); (the step's loss, its distillation term), detached, on the device.

    Micro-batch m is flipped by ``masks[m]`` (:func:`flip_masks`) and normalised on the device. Each
    micro-batch's loss is divided by K, so the gradient is that of the mean over the K*B images;
    DDP synchronises gradients on the last micro-step only. ``distill`` (a teacher) adds its term
    to each micro-batch's loss.
    """
    total = torch.zeros((), device=device)
    distill_total = torch.zeros((), device=device)
    for m, (images, labels) in enumerate(micro_batches):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        x = flip_normalize(images, masks[m, :len(images)], channels_last=channels_last)
        last = m == len(micro_batches) - 1
        sync = (contextlib.nullcontext() if last or not info.distributed
                or not hasattr(module, "no_sync") else module.no_sync())
        with sync:
            emb, out = module(x, labels)
            loss = objective.loss(emb, out, labels)
            if distill is not None:
                loss, term = distill.add_term(loss, x, emb)
                distill_total += term / len(micro_batches)
            scaler.scale(loss / len(micro_batches)).backward()
        total += loss.detach() / len(micro_batches)
    return total, distill_total


def agree_on_overflow(sharded: List[nn.Parameter], info: DistInfo, device: torch.device) -> None:
    """fp16: every rank must skip a step whose gradients overflowed on any rank.

    DDP gives all ranks the same replicated gradients, but sharded parameters are local: an
    inf in one shard would make only that rank skip the step (and lower its loss scale).
    Spreading the inf to every shard makes GradScaler decide alike everywhere.
    """
    for p in sharded:
        if p.grad is not None and dist_utils.any_rank(not bool(torch.isfinite(p.grad).all()), info, device):
            p.grad.fill_(float("inf"))


def clip_gradients(params: List[nn.Parameter], sharded: List[nn.Parameter], max_norm: float,
                   device: torch.device) -> torch.Tensor:
    """The norm of the whole gradient (on the device), clipped to ``max_norm`` when that is > 0.

    Replicated parameters have the same gradient on every rank; ``sharded`` ones each hold a
    different part, so their squared norms are summed over ranks when clipping (without
    clipping, this rank's norm is enough: it only has to be finite or not).
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros((), device=device)
    if max_norm <= 0:  # (torch.nn.utils.get_total_norm is newer than the torch we support)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach().float())
                                                     for p in params]))
    split = {id(p) for p in sharded}
    shard = [p for p in params if id(p) in split]
    if not shard:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    rest = [p for p in params if id(p) not in split]
    sq_rest = sum((p.grad.detach().float().pow(2).sum() for p in rest), torch.zeros((), device=device))
    sq_shard = sum((p.grad.detach().float().pow(2).sum() for p in shard), torch.zeros((), device=device))
    torch.distributed.all_reduce(sq_shard)
    total = (sq_rest + sq_shard).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.detach().mul_(coef.to(p.grad.dtype))
    return total


def non_finite(loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, scaled: bool, info: DistInfo,
               device: torch.device) -> str | None:
    """Why this step must not update the weights (identical on every rank), or None.

    The one host synchronisation of a step (two floats; with loss scaling, GradScaler's own
    check then finds the queue drained). Under loss scaling (``scaled``) an overflowing
    gradient is GradScaler's business (it skips the step and lowers the scale), so only the
    loss counts. Under several processes the verdict is agreed (the loss is per rank; sharded
    gradients are per shard): one CPU all-reduce of one flag.
    """
    loss_v, norm_v = torch.stack([loss.detach().float(), grad_norm.detach().float()]).tolist()
    why = [f"loss {loss_v}"] if not math.isfinite(loss_v) else []
    if not math.isfinite(norm_v) and not scaled:
        why.append(f"gradient norm {norm_v}")
    if not math.isfinite(lr):
        why.append(f"lr {lr}")
    reason = ", ".join(why) or None
    if info.distributed and dist_utils.any_rank(reason is not None, info, device):
        reason = reason or "a non-finite loss or gradient on another rank"
    return reason
