"""Partial FC: class centres sharded across ranks, the softmax cross-entropy computed across shards.

After An et al., "Partial FC: Training 10 Million Identities on a Single Machine" (ICCVW 2021)
and insightface's ``partial_fc_v2``. Each of W ranks owns the centres of about C/W classes
(:func:`shard_range`), all-gathers the embeddings and labels of the global batch (W*B rows),
computes the margin logits of its own classes only, and the softmax maximum, denominator and
target logit are combined across ranks; no rank holds the (C, D) matrix or (W*B, C) logits.
With ``sample_rate`` R < 1 each rank keeps, per training step, the classes of its shard present
in the global batch (positives) plus random negatives, max(ceil(R*n), #positives) of its n
classes, and the softmax runs over the sampled classes. At R = 1 it is the full softmax. W = 1
is the same code with every collective skipped (no process group needed).

Gradient convention (the trainer relies on it). L is the loss of the global batch: the
criterion over all W*B samples (a mean) plus the head's extra loss. ``forward`` returns L on
every rank, and after ``L.backward()`` on every rank:

- ``weight.grad`` on rank r is exactly dL/d(shard r) (the shard is not synchronised by DDP);
- the gradient reaching rank r's local embeddings is W * dL/d(local embeddings), so that a
  backbone under DDP, which averages gradients over ranks, gets exactly the dL/dtheta of one
  process running the global batch.

How: the max / sum / target all-reduces pass gradients through unchanged (every rank
computes the same L from their results, so its upstream gradient already is the global
one); the all-gather's backward sums over ranks the partial gradients each shard gives every
gathered row, keeps this rank's rows and multiplies them by W; the head's extra loss (a
function of the gathered norms, computed on every rank) lets gradient into the rows this
rank owns only, so it is counted once.

Requirements: the same local batch size on every rank (drop_last), num_classes >= W, and a
head whose only parameter is ``weight`` (``softmax`` with a bias is refused).

Where we differ from insightface ``partial_fc_v2.PartialFC_V2`` (and why):

* loss cap: theirs clamps the target probability at 1e-30 (``DistCrossEntropy``), so one
  sample's loss is at most -log(1e-30) = 69.08 and a hopeless sample's gradient is cut off;
  we compute -log p exactly from the log-sum-exp (the loss of the published softmax). The
  cap binds only for badly misclassified samples (log p < -69.08: at s = 64, a target cosine
  about 1.08 below the best one), mostly early in training.
* sampled classes: theirs keeps int(R*n) classes per shard (floor), ours ceil(R*n) (at
  least one negative for any R > 0, and never fewer than R asks for); both keep every
  positive, i.e. max(that count, #positives). The difference is at most one class per shard.
* the margin itself: see :mod:`heads.arcface` (straight-through gradient, no fallback past
  pi, m1/m2 ignored when m3 > 0 in arcface_torch); ``grad_mode="arcface_torch"`` on the head
  reproduces their margin.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .base import MarginHead, centre_rows, gather_target


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Classes [start, end) owned by ``rank``: contiguous, the first C % W ranks one class more."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_range: need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, "
                         f"world_size={world_size}")
    if num_classes < world_size:
        raise ValueError(f"shard_range: num_classes ({num_classes}) must be >= world_size ({world_size}): "
                         f"every rank needs at least one class")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit generator seed from (seed, step, rank): distinct streams per rank and per step."""
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class _GatherRows(torch.autograd.Function):
    """all_gather (B, D) -> (W*B, D); backward: the gathered gradient summed over ranks, this rank's rows, times W."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, rank: int, world_size: int, group: Any) -> Tensor:
        ctx.rank, ctx.world_size, ctx.group, ctx.rows = rank, world_size, group, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        own = grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]
        return own * ctx.world_size, None, None, None


class _SumOverRanks(torch.autograd.Function):
    """all_reduce SUM whose backward is the identity: every rank computes the same loss from the sum."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        return grad, None


class PartialFC(nn.Module):
    """A margin head's class centres, sharded, with the loss computed across shards (see the module docstring).

    Takes ownership of ``head.weight``: keeps rows [start*K, end*K) (K = ``head.rows_per_class``,
    [start, end) = ``shard_range(C, rank, world_size)``) as its own Parameter ``weight``, and sets
    the head's ``weight`` to None, so the head stays a parameter-free helper (its ``cosine``,
    ``margin_logits``, ``extra_loss`` and buffers, e.g. CurricularFace's t, are used; calling the
    head itself no longer works). Build the head with the same seed on every rank: every world
    size then starts from the same full matrix.

    ``state_dict`` holds this rank's shard as ``weight``, the head's buffers under ``head.``
    (identical on every rank: save from rank 0) and ``counter``, the number of sampled training
    steps so far (it seeds the sampling, so a resumed run draws what the uninterrupted one
    would). For world-size independent checkpoints save :meth:`full_weight_state` instead of
    the shard; ``load_state_dict`` accepts either the shard or the full (C*K, D) matrix, and
    :meth:`load_full_weight`, :meth:`shard_rows` and :meth:`gather_rows` do the same for the
    optimizer's momentum of ``weight``.

    ``seed`` seeds the negative sampling (with the step counter and the rank); sampling happens
    in training mode only, an eval-mode forward is over all classes. ``group`` is the process
    group (None: the default one); ``rank`` / ``world_size`` must be this process's rank and the
    group's size.

    Building the head allocates the full matrix (C*K*D*4 bytes) on every rank for a moment. To
    avoid that, build it under ``with torch.device("meta"):``, then ``pfc.to_empty(device=...)``,
    fill ``weight`` (e.g. :meth:`load_full_weight`) and zero ``counter`` and the head's buffers.
    """

    def __init__(self, head: MarginHead, criterion: nn.Module, sample_rate: float = 1.0, rank: int = 0,
                 world_size: int = 1, seed: int = 0, group: Any = None) -> None:
        super().__init__()
        if not isinstance(head, MarginHead) or not isinstance(getattr(head, "weight", None), nn.Parameter):
            raise TypeError(f"partial_fc: head must be a MarginHead that owns its weight, got {type(head).__name__} "
                            f"(already wrapped by another PartialFC?)")
        others = [name for name, _ in head.named_parameters() if name != "weight"]
        if others:
            raise ValueError(f"partial_fc: head {type(head).__name__} has parameters besides weight "
                             f"({', '.join(others)}); Partial FC shards only the class centres "
                             f"(use softmax with bias=False or a margin head)")
        if not callable(getattr(criterion, "from_sample_ce", None)):
            raise TypeError(f"partial_fc: criterion {type(criterion).__name__} has no from_sample_ce(ce, uniform_ce); "
                            f"use a loss of the per-sample cross-entropy (cross_entropy, focal)")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"partial_fc: sample_rate must be in (0, 1], got {sample_rate}")
        self.start, self.end = shard_range(head.num_classes, rank, world_size)
        if world_size > 1:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(f"partial_fc: world_size={world_size} needs an initialised process group "
                                   f"(torch.distributed.init_process_group), none is")
            if (dist.get_world_size(group), dist.get_rank(group)) != (world_size, rank):
                raise ValueError(f"partial_fc: rank={rank}, world_size={world_size} disagree with the process "
                                 f"group (rank {dist.get_rank(group)} of {dist.get_world_size(group)})")
        self.num_classes, self.rows_per_class = head.num_classes, head.rows_per_class
        self.sample_rate, self.rank, self.world_size, self.seed, self.group = (float(sample_rate), int(rank),
                                                                               int(world_size), int(seed), group)
        k = self.rows_per_class
        if head.weight.is_meta:  # built under deferred_centres(): draw this shard's rows only
            shard = centre_rows(self.start * k, self.end * k, head.embedding_size, head.init_seed)
        else:
            shard = head.weight.detach()[self.start * k:self.end * k].clone()
        self.weight = nn.Parameter(shard)
        head.register_parameter("weight", None)
        self.head, self.criterion = head, criterion
        self.register_buffer("counter", torch.zeros((), dtype=torch.int64))
        self.sampled: Tensor | None = None  # global class ids this rank sampled in the last step (None: all)
        self._target_cos = "target_cos" in inspect.signature(head.margin_logits).parameters

    # ------------------------------------------------------------------ the loss
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The loss L of the global batch from this rank's ``embeddings`` (B, D), un-normalised, and
        ``labels`` (B,) int64 in [0, C); computed in float32 (float64 if converted) with autocast off."""
        d = self.head.embedding_size
        if embeddings.dim() != 2 or embeddings.shape[1] != d:
            raise ValueError(f"partial_fc: embeddings must be (B, {d}), got {tuple(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"partial_fc: labels must be ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        dtype = torch.promote_types(torch.promote_types(embeddings.dtype, self.weight.dtype), torch.float32)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x, y = embeddings.to(dtype), labels
            if self.world_size > 1:
                x = _GatherRows.apply(x, self.rank, self.world_size, self.group)
                y = self._all_gather(labels)
            self._check_labels(y)
            norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
            index, local = self._select(y)
            cos = self.head.cosine(x, (self.weight if index is None else self._rows(index)).to(dtype))
            if self._target_cos:  # CurricularFace: every row's target cosine, from the shard that has it
                with torch.no_grad():
                    target_cos = self._sum(torch.where(local >= 0, gather_target(cos, local).squeeze(1), 0.0))
                logits = self.head.margin_logits(cos, local, norms, target_cos=target_cos)
            else:
                logits = self.head.margin_logits(cos, local, norms)
            ce, uniform = self._cross_entropy(logits, local)
            loss = self.criterion.from_sample_ce(ce, uniform)
            extra = self.head.extra_loss(self._own_rows(norms))
            return loss if extra is None else loss + extra

    def _check_labels(self, labels: Tensor) -> None:
        """Labels outside [0, C) would silently count as "in no shard": refuse them.

        On the CPU with the range in the message; on an accelerator without making the host
        wait for the device every step (an asynchronous device assert, which ends the process
        when it fires: the training loop's own labels were already checked against the data).
        """
        inside = (labels.min() >= 0) & (labels.max() < self.num_classes)
        if labels.device.type != "cpu":
            torch._assert_async(inside, f"partial_fc: labels must be in [0, {self.num_classes})")
        elif not bool(inside):
            raise ValueError(f"partial_fc: labels must be in [0, {self.num_classes}), "
                             f"got {int(labels.min())}..{int(labels.max())}")

    def _select(self, labels: Tensor) -> tuple[Tensor | None, Tensor]:
        """(sampled local class indices or None for all, labels as column indices of this shard or -1)."""
        n = self.end - self.start
        local = labels - self.start
        inside = (local >= 0) & (local < n)
        if not (self.training and self.sample_rate < 1.0):
            self.sampled = None
            return None, torch.where(inside, local, -1)
        index = self.sample_classes(labels, int(self.counter))
        self.counter += 1
        self.sampled = index + self.start
        return index, torch.where(inside, torch.searchsorted(index, local.clamp(0, n - 1)), -1)

    def sample_classes(self, labels: Tensor, step: int) -> Tensor:
        """Sorted local class indices (0..n-1) this rank keeps at training step ``step`` for the global
        ``labels``: every positive, plus uniformly random negatives up to max(ceil(R*n), #positives).
        A function of (seed, step, rank, labels) only."""
        n = self.end - self.start
        local = labels - self.start
        positives = torch.unique(local[(local >= 0) & (local < n)])
        k = min(n, max(math.ceil(self.sample_rate * n * (1 - 1e-12)), positives.numel()))  # 1e-12: 0.1*30 -> 3
        generator = torch.Generator(device=labels.device).manual_seed(step_seed(self.seed, step, self.rank))
        score = torch.rand(n, generator=generator, device=labels.device)
        score[positives] = 2.0  # above every random score: positives are always kept
        return torch.topk(score, k, sorted=False).indices.sort().values

    def _rows(self, index: Tensor) -> Tensor:
        """Rows of ``weight`` belonging to the local classes ``index`` (all K sub-centres of each)."""
        k = self.rows_per_class
        return self.weight.view(-1, k, self.weight.shape[1])[index].flatten(0, 1)

    def _cross_entropy(self, logits: Tensor, local: Tensor) -> tuple[Tensor, Tensor | None]:
        """Per-sample -log p_target over all shards' (sampled) classes, and -mean_j log p_j when the
        criterion smooths labels (else None)."""
        with torch.no_grad():
            row_max = logits.amax(dim=1)
            if self.world_size > 1:
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=self.group)
        shifted = logits - row_max.unsqueeze(1)
        log_sum = self._sum(shifted.exp().sum(dim=1)).log()
        target = self._sum(torch.where(local >= 0, gather_target(shifted, local).squeeze(1), 0.0))
        ce = log_sum - target
        if not getattr(self.criterion, "label_smoothing", 0.0) > 0:
            return ce, None
        columns = torch.tensor(float(logits.shape[1]), dtype=logits.dtype, device=logits.device)
        if self.world_size > 1:
            dist.all_reduce(columns, group=self.group)
        return ce, log_sum - self._sum(shifted.sum(dim=1)) / columns

    def _sum(self, x: Tensor) -> Tensor:
        return _SumOverRanks.apply(x, self.group) if self.world_size > 1 else x

    def _all_gather(self, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts)

    def _own_rows(self, norms: Tensor) -> Tensor:
        """``norms`` with gradient only through this rank's rows of the gathered batch."""
        if self.world_size == 1:
            return norms
        rows = norms.shape[0] // self.world_size
        own = torch.zeros_like(norms, dtype=torch.bool)
        own[self.rank * rows:(self.rank + 1) * rows] = True
        return torch.where(own, norms, norms.detach())

    # ------------------------------------------------------------------ world-size independent state
    def shard_rows(self, full: Tensor) -> Tensor:
        """This rank's rows (a copy) of a full (C*K, ...) tensor: the centres or their momentum."""
        k, rows = self.rows_per_class, self.num_classes * self.rows_per_class
        if full.shape[0] != rows:
            raise ValueError(f"partial_fc: a full tensor has {rows} rows (num_classes {self.num_classes} x "
                             f"{k} per class), got {tuple(full.shape)}")
        return full[self.start * k:self.end * k].clone()

    def gather_rows(self, shard: Tensor, dst: int | None = None, group: Any = None) -> Tensor | None:
        """The full (C*K, ...) tensor from every rank's shard (e.g. the momentum of ``weight``).

        Collective: every rank of the group must call it. ``dst`` None: every rank gets the full
        tensor; ``dst`` = r: group rank r gets it, the others None. The receiving ranks briefly
        hold it twice. ``group`` (default: the head's) may be a gloo group over the same ranks:
        the rows then travel through host memory and arrive on the CPU, so no GPU ever holds
        the full matrix (2M classes x 512 floats is 4 GB, twice over while gathering), which
        is how checkpoints gather. Otherwise the result is on the device of ``shard``. At
        W = 1 returns ``shard`` itself (detached).
        """
        k = self.rows_per_class
        if shard.shape[0] != (self.end - self.start) * k:
            raise ValueError(f"partial_fc: rank {self.rank}'s shard has {(self.end - self.start) * k} rows, "
                             f"got {tuple(shard.shape)}")
        shard = shard.detach()
        if self.world_size == 1:
            return shard
        if group is None:
            group = self.group
        elif (dist.get_world_size(group), dist.get_rank(group)) != (self.world_size, self.rank):
            raise ValueError(f"partial_fc: gather group (rank {dist.get_rank(group)} of {dist.get_world_size(group)}) "
                             f"does not hold the head's ranks in order (rank {self.rank} of {self.world_size})")
        if dist.get_backend(group) == "gloo":
            shard = shard.cpu()
        sizes = [(end - start) * k for start, end in
                 (shard_range(self.num_classes, r, self.world_size) for r in range(self.world_size))]
        padded = shard.new_zeros((sizes[0],) + tuple(shard.shape[1:]))  # rank 0's shard is the largest
        padded[:shard.shape[0]] = shard
        parts = [torch.empty_like(padded) for _ in sizes] if dst is None or dst == self.rank else None
        if dst is None:
            dist.all_gather(parts, padded, group=group)
        else:
            dist.gather(padded, parts, group=group, group_dst=dst)
        return None if parts is None else torch.cat([p[:n] for p, n in zip(parts, sizes)])

    def full_weight_state(self, dst: int | None = None, group: Any = None) -> Tensor | None:
        """The full (C*K, D) centre matrix, as :meth:`gather_rows` (collective; ``dst``, ``group`` as there)."""
        return self.gather_rows(self.weight, dst, group)

    @torch.no_grad()
    def load_full_weight(self, full: Tensor) -> None:
        """Set this rank's shard from a full (C*K, D) centre matrix saved at any world size."""
        shard = self.shard_rows(full)
        if shard.shape != self.weight.shape:
            raise ValueError(f"partial_fc: the full matrix gives a {tuple(shard.shape)} shard, weight is "
                             f"{tuple(self.weight.shape)} (embedding size differs?)")
        self.weight.copy_(shard)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """Accept the full (C*K, D) matrix under ``weight`` as well as this rank's shard."""
        full = state_dict.get(prefix + "weight")
        if full is not None and full.shape[0] == self.num_classes * self.rows_per_class != self.weight.shape[0]:
            state_dict[prefix + "weight"] = self.shard_rows(full)
        super()._load_from_state_dict(state_dict, prefix, *args)

    # ------------------------------------------------------------------ the trainer's surface
    # (the same methods as engine/objective.py's DenseLoss: the training loop treats every head alike)
    replica = None  # nothing runs under DDP: the centres are sharded, not replicated

    def loss(self, embeddings: Tensor, out: Any, labels: Tensor) -> Tensor:
        """The loss of the global batch (``out``, a replica's output, is unused: there is no replica)."""
        return self(embeddings, labels)

    def sharded_parameters(self) -> list[nn.Parameter]:
        """``weight`` when it is split over several ranks (its gradient and momentum differ per rank)."""
        return [self.weight] if self.world_size > 1 else []

    def checkpoint_state(self, group: Any = None) -> dict:
        """{"head": state_dict with the full centre matrix, "criterion": ...}: world-size independent.

        Collective (every rank calls it); under several ranks only rank 0's ``weight`` is the
        full matrix (gathered through ``group``, e.g. a gloo group: host memory, not a GPU).
        """
        head = self.state_dict()
        if self.world_size > 1:
            head["weight"] = self.full_weight_state(dst=0, group=group)
        return {"head": head, "criterion": self.criterion.state_dict()}

    def load_checkpoint_state(self, state: dict) -> None:
        """Restore :meth:`checkpoint_state` written at any world size (full centres are re-sharded)."""
        self.load_state_dict(state["head"])
        self.criterion.load_state_dict(state.get("criterion", {}))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, classes=[{self.start}, {self.end}), sample_rate={self.sample_rate}, "
                f"rank={self.rank}, world_size={self.world_size}, seed={self.seed}")
