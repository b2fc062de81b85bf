"""The training loop: one object that owns model, head, optimizer, scaler and state.

train.py builds the parts from the config and hands them here; this module
knows nothing of the command line. Everything that changes during training
(weights, optimizer, scheduler, scaler, head buffers, step, RNG) is in the
checkpoint, so `resume` continues exactly where the run stopped.

One code path for one process and for N (torchrun): the backbone (and a dense
head) run under DistributedDataParallel when there is a process group; a
Partial FC head (heads/partial_fc.py) shards its centres instead. Each rank
reads every W-th sample of one permutation, so the global batch of a step is
the same set of images whatever W is; flips are drawn for the global batch and
sliced; checkpoints hold full (gathered) centres. A run therefore resumes at
another world size on the same data stream when the global batch is kept.
Rank 0 logs, evaluates and writes; the others wait at a barrier.

A step whose loss or gradient norm (or lr) is not finite is skipped: no update, weights,
momentum and buffers (BatchNorm statistics) as before it; the learning-rate schedule
still advances (the step, its data and its flips are consumed, so a resumed run and an
uninterrupted one stay on the same schedule). ``max_bad_steps`` such steps in a row stop
the run. Nothing with non-finite weights is ever written or evaluated.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
import warnings
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn as nn
from tqdm import tqdm

from data.dataset import FaceDataset, ResumableBatchSampler
from data.sources import DataSourceError
from data.transforms import apply_flips, normalize
from engine import distributed as dist_utils
from engine.checkpoint import rng_state, save_training_checkpoint, set_rng_state
from engine.distributed import DistInfo
from engine.feeder import BatchFeeder, WaitInterrupted
from engine.schedule import make_lr_lambda
from utils.atomic import write_json
from utils.plots import plot_loss
from utils.precision import amp_dtype, needs_grad_scaler
from utils.torchfile import CheckpointError, check_finite

Evaluator = Callable[[nn.Module], Dict[str, Any]]


def _copy_all(dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
    """dst[i].copy_(src[i]) for all i: one fused kernel where torch has it (hundreds of BN buffers per step)."""
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None:
        foreach(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


class TrainingDivergedError(CheckpointError):
    """The run cannot go on to a usable checkpoint: too many non-finite steps in a row, or
    non-finite weights about to be saved. A CheckpointError, so scripts print it as one line."""


def param_groups(modules: List[nn.Module], weight_decay: float) -> List[Dict[str, Any]]:
    """Weight decay on weights (conv, linear, class centres), none on BN and biases (ndim <= 1)."""
    decay, no_decay = [], []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class StepModule(nn.Module):
    """What DDP wraps: the backbone and, unless Partial FC owns the centres, the dense head."""

    def __init__(self, model: nn.Module, head: nn.Module | None, amp_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model, self.head, self.amp_dtype = model, head, amp_dtype

    def forward(self, x: torch.Tensor, labels: torch.Tensor):
        autocast = (torch.autocast(x.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            emb = self.model(x)
        emb = emb.float()  # the head and the softmax run in fp32
        return emb, (None if self.head is None else self.head(emb, labels))


def _is_partial_fc(head: nn.Module) -> bool:
    return callable(getattr(head, "full_weight_state", None))


class Trainer:
    """Train `model` + `head` with `criterion` on `dataset`, per the duck-typed config `cfg`.

    `cfg` needs the optimisation/logging fields of config.Config. `evaluator`
    (optional) maps the backbone to {"mean_accuracy": float, "results": {...}}
    and is called every `cfg.eval_every` steps (or each epoch) and at the end.
    `save_backbone` writes the weights-only file (the caller knows the name).
    """

    def __init__(self, cfg: Any, model: nn.Module, head: nn.Module, criterion: nn.Module, dataset: FaceDataset,
                 device: torch.device, output_dir: str, evaluator: Evaluator | None = None,
                 save_backbone: Callable[[nn.Module, str], None] | None = None,
                 log: Callable[[str], None] = print, dist_info: DistInfo = DistInfo(),
                 data_parallel: bool = False) -> None:
        self.cfg, self.device, self.output_dir, self.dist = cfg, device, output_dir, dist_info
        self.model, self.head, self.criterion = model.to(device), head.to(device), criterion.to(device)
        if getattr(cfg, "channels_last", False):
            self.model.to(memory_format=torch.channels_last)
        self.dataset, self.evaluator, self.save_backbone_fn, self.log = dataset, evaluator, save_backbone, log
        self.sharded = _is_partial_fc(self.head)
        self.accum = max(1, int(getattr(cfg, "grad_accum", 1)))
        self.sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, seed=cfg.seed, rank=dist_info.rank,
                                             world_size=dist_info.world_size)
        self.global_batch = cfg.batch_size * dist_info.world_size * self.accum
        self.steps_per_epoch = self.sampler.batches_per_epoch() // self.accum
        if self.steps_per_epoch == 0:
            raise DataSourceError(f"{len(dataset)} images are fewer than one optimizer step of {self.global_batch} "
                                  f"(batch {cfg.batch_size} x {dist_info.world_size} processes x grad_accum "
                                  f"{self.accum})")
        total = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps > 0 else total
        self.optimizer = torch.optim.SGD(param_groups([self.model, self.head], cfg.weight_decay),
                                         lr=cfg.lr, momentum=cfg.momentum)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, make_lr_lambda(
            total_steps=self.total_steps, warmup_steps=int(round(cfg.warmup_epochs * self.steps_per_epoch)),
            kind=cfg.scheduler, milestones=[int(round(m * self.steps_per_epoch)) for m in cfg.milestones],
            gamma=cfg.lr_gamma, power=cfg.poly_power))
        self.amp_dtype = amp_dtype(getattr(cfg, "amp_dtype", "auto"), device) if cfg.amp else None
        self.use_scaler = self.amp_dtype is not None and needs_grad_scaler(self.amp_dtype, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_scaler)
        self.step_module = self._wrap(data_parallel)
        self.step = 0
        self.best = -math.inf
        self.history: Dict[str, List[Any]] = {"step": [], "loss": [], "lr": [], "eval": [], "bad_steps": []}
        self.bad_steps = 0  # optimizer steps skipped for a non-finite loss/gradient/lr (kept in the checkpoint)
        self.last_bad: str | None = None  # why the latest step was skipped; None: it updated the weights
        self.step_lr = float(cfg.lr)  # the lr of the latest step
        self._bad_run = 0
        self._saved_at: Tuple[int, str | None] | None = None  # (step, path) of the last checkpoint written or loaded
        self._buffers = [b for m in (self.model, self.head, self.criterion) for b in m.buffers()]
        self._buffer_copy = [b.detach().clone() for b in self._buffers]
        self._tb = None
        self._signal: int | None = None
        self.feeder = BatchFeeder(dataset, self.sampler, cfg.num_workers, device, dist_info, self.accum, log,
                                  max_bad_fraction=cfg.max_bad_fraction,
                                  stop_requested=lambda: self._signal is not None)

    @property
    def skipped(self) -> int:
        """Undecodable images dropped so far (kept in the checkpoint)."""
        return self.feeder.skipped

    @skipped.setter
    def skipped(self, value: int) -> None:
        self.feeder.skipped = int(value)

    def _wrap(self, data_parallel: bool) -> nn.Module:
        """The module the step calls: compiled backbone, dense head inside, DDP or DataParallel around."""
        backbone = self.model
        if getattr(self.cfg, "compile", False):
            backbone = torch.compile(backbone)
        module = StepModule(backbone, None if self.sharded else self.head,
                            self.amp_dtype)
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DDP(module, device_ids=ids)  # BN statistics follow rank 0 (buffers broadcast each forward)
        if data_parallel:
            return nn.DataParallel(module)
        return module

    # ------------------------------------------------------------------ state
    def _centre_index(self) -> int | None:
        """Position of Partial FC's sharded centres in the optimizer's state numbering."""
        if not self.sharded:
            return None
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return next(i for i, p in enumerate(params) if p is self.head.weight)

    def state_dict(self) -> Dict[str, Any]:
        """Everything to resume, independent of the world size.

        Collective under Partial FC (all ranks call it); only rank 0's copy is complete
        (the full centre matrix is gathered there alone, through host memory, never on a GPU).
        """
        head = self.head.state_dict()
        optimizer = self.optimizer.state_dict()
        if self.sharded:  # the sharded centres and their momentum as full matrices, in rank 0's host memory
            group = dist_utils.cpu_group() if self.dist.distributed else None
            head["weight"] = self.head.full_weight_state(dst=0, group=group)
            idx = self._centre_index()
            buf = optimizer["state"].get(idx, {}).get("momentum_buffer")
            if buf is not None:
                optimizer["state"][idx] = dict(optimizer["state"][idx],
                                               momentum_buffer=self.head.gather_rows(buf, dst=0, group=group))
        return {"step": self.step, "model": self.model.state_dict(), "head": head,
                "criterion": self.criterion.state_dict(), "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "best": self.best, "skipped": self.skipped, "bad_steps": self.bad_steps, "history": self.history,
                "rng": rng_state(),
                "world_size": self.dist.world_size, "global_batch": self.global_batch}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a checkpoint written at any world size (full centres are re-sharded)."""
        self.model.load_state_dict(state["model"])
        self.head.load_state_dict(state["head"])
        self.criterion.load_state_dict(state.get("criterion", {}))
        optimizer = state["optimizer"]
        if self.sharded:
            idx = self._centre_index()
            entry = optimizer["state"].get(idx, {})
            buf = entry.get("momentum_buffer")
            if buf is not None and buf.shape != self.head.weight.shape:
                optimizer = dict(optimizer, state=dict(optimizer["state"]))
                optimizer["state"][idx] = dict(entry, momentum_buffer=self.head.shard_rows(buf))
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] or not self.use_scaler:  # empty: saved without loss scaling (CPU, bf16): start afresh
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.best, self.skipped = int(state["step"]), float(state["best"]), int(state["skipped"])
        self.bad_steps = int(state.get("bad_steps", 0))
        self.history = state.get("history", self.history)
        self.history.setdefault("bad_steps", [])
        self._saved_at = (self.step, None)
        set_rng_state(state["rng"])

    def save(self, config: Dict[str, Any]) -> None:
        """checkpoint.pt (resume) + backbone.pt (weights) + history.json/loss.png, written by rank 0.

        Every rank calls it (gathering sharded centres is collective); the others wait
        until rank 0 has written, so nobody runs ahead of (or exits before) the files.
        Weights holding NaN/inf are not written: TrainingDivergedError instead.
        """
        self._ensure_finite("a checkpoint")
        state = self.state_dict()
        if self.dist.is_main:
            self._write(config, state)
        dist_utils.barrier(self.dist, self.device)
        self._saved_at = (self.step, os.path.join(self.output_dir, "checkpoint.pt"))

    def _write(self, config: Dict[str, Any], state: Dict[str, Any]) -> None:
        save_training_checkpoint(os.path.join(self.output_dir, "checkpoint.pt"), keep=self.cfg.keep,
                                      config=config, **state)
        if self.save_backbone_fn is not None:
            self.save_backbone_fn(self.model, os.path.join(self.output_dir, "backbone.pt"))
        self._write_history()

    def _write_history(self) -> None:
        """history.json and loss.png (rank 0): at each save, and after each evaluation (which
        follows the save of its step, so the checkpoint's copy lacks that one evaluation)."""
        write_json(os.path.join(self.output_dir, "history.json"), self.history)


        plot_loss(self.history, os.path.join(self.output_dir, "loss.png"))

    # ------------------------------------------------------------------- loop
    def _flip_masks(self) -> torch.Tensor:
        """(K, B) flip coins of this rank's micro-batches, sliced from the global batch's coins.

        Drawn for the whole optimizer step (K*B*W images, generator seeded by (seed, step)) in
        the sampler's order, where this rank's micro-batch m holds the images at positions
        W*(B*m + j) + rank: so the flips do not depend on how the batch is split.
        """
        b, w = self.cfg.batch_size, self.dist.world_size
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.step)
        coins = torch.rand(self.accum * b * w, generator=g) < 0.5
        return coins.view(self.accum, b, w)[:, :, self.dist.rank]

    def train_step(self, micro_batches: List[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step over K uint8 micro-batches; returns the loss (detached, on the device).

        Each micro-batch's loss is divided by K, so the gradient is that of the mean over the
        K*B images; DDP synchronises gradients on the last micro-step only. When the loss, the
        gradient norm or the lr is not finite the update is skipped (``last_bad`` says why):
        weights and momentum are untouched and the buffers the forward pass changed (BatchNorm
        statistics, head counters) are put back; the scheduler still advances.
        """
        self.step_module.train()
        self.head.train()
        masks = self._flip_masks()
        self.optimizer.zero_grad(set_to_none=True)
        if self._buffers:
            _copy_all(self._buffer_copy, self._buffers)
        total = torch.zeros((), device=self.device)
        channels_last = getattr(self.cfg, "channels_last", False)
        for m, (images, labels) in enumerate(micro_batches):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            x = normalize(apply_flips(images, masks[m, :len(images)]), channels_last=channels_last)
            last = m == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not self.dist.distributed else self.step_module.no_sync()
            with sync:
                emb, out = self.step_module(x, labels)
                if self.sharded:
                    loss = self.head(emb, labels)
                else:
                    loss = self.criterion(out.logits, labels)
                    if out.extra_loss is not None:  # DataParallel gathers one per GPU
                        loss = loss + out.extra_loss.mean()
                self.scaler.scale(loss / len(micro_batches)).backward()
            total += loss.detach() / len(micro_batches)
        if self.use_scaler and self.sharded and self.dist.distributed:
            self._agree_on_overflow()
        self.scaler.unscale_(self.optimizer)  # (a no-op without loss scaling) the norm in true units
        norm = self._clip_gradients(self.cfg.grad_clip)
        self.last_bad = self._judge_step(total, norm)
        if self.last_bad is None:
            self.scaler.step(self.optimizer)
        elif self._buffers:
            _copy_all(self._buffers, self._buffer_copy)
        self.scaler.update()  # after a skipped step too: unscale_ recorded its overflow check
        with warnings.catch_warnings():  # a skipped first step is not the misuse torch warns about
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        return total

    def _judge_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> str | None:
        """Why this step must not update the weights (identical on every rank), or None.

        The one host synchronisation of a step (two floats; with loss scaling, GradScaler's own
        check then finds the queue drained). Under loss scaling an overflowing gradient is
        GradScaler's business (it skips the step and lowers the scale), so only the loss counts.
        Under several processes the verdict is agreed (the loss is per rank; Partial FC's
        centre gradients are per shard): one CPU all-reduce of one flag.
        """
        lr = self.step_lr = self.optimizer.param_groups[0]["lr"]
        loss_v, norm_v = torch.stack([loss.detach().float(), grad_norm.detach().float()]).tolist()
        why = [f"loss {loss_v}"] if not math.isfinite(loss_v) else []
        if not math.isfinite(norm_v) and not self.use_scaler:
            why.append(f"gradient norm {norm_v}")
        if not math.isfinite(lr):
            why.append(f"lr {lr}")
        reason = ", ".join(why) or None
        if self.dist.distributed and dist_utils.any_rank(reason is not None, self.dist, self.device):
            reason = reason or "a non-finite loss or gradient on another rank"
        return reason

    def _agree_on_overflow(self) -> None:
        """fp16: every rank must skip a step whose gradients overflowed on any rank.

        DDP gives all ranks the same backbone gradients, but Partial FC's centre shards are
        local: an inf in one shard would make only that rank skip the step (and lower its
        loss scale). Spreading the inf to every shard makes GradScaler decide alike everywhere.
        """
        grad = self.head.weight.grad
        if grad is not None and dist_utils.any_rank(not bool(torch.isfinite(grad).all()), self.dist, self.device):
            grad.fill_(float("inf"))

    def _clip_gradients(self, max_norm: float) -> torch.Tensor:
        """The norm of the whole gradient (on the device), clipped to `max_norm` when that is > 0.

        Replicated parameters have the same gradient on every rank; Partial FC's centre shards
        each hold a different part, so their squared norms are summed over ranks when clipping
        (without clipping, this rank's norm is enough: it only has to be finite or not).
        """
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        if max_norm <= 0:  # (torch.nn.utils.get_total_norm is newer than the torch we support)
            return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach().float())
                                                         for p in params]))
        shard = [p for p in params if self.sharded and p is self.head.weight]
        rest = [p for p in params if not (self.sharded and p is self.head.weight)]
        if not shard or not self.dist.distributed:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        sq_rest = sum((p.grad.detach().float().pow(2).sum() for p in rest), torch.zeros((), device=self.device))
        sq_shard = shard[0].grad.detach().float().pow(2).sum()
        torch.distributed.all_reduce(sq_shard)
        total = (sq_rest + sq_shard).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.detach().mul_(coef.to(p.grad.dtype))
        return total

    def evaluate(self) -> Dict[str, Any] | None:
        """Verification on rank 0 (the others wait at a barrier); best.pt when the mean improves."""
        if self.cfg.eval_every < 0:
            return None
        self._ensure_finite("an evaluation (and best.pt)")
        report = self._evaluate_main() if self.dist.is_main else None
        dist_utils.barrier(self.dist, self.device)
        return report

    def _evaluate_main(self) -> Dict[str, Any] | None:
        if self.evaluator is None:
            return None
        report = self.evaluator(self.model)
        report["step"] = self.step
        acc = report.get("mean_accuracy", float("nan"))
        self.history["eval"].append({"step": self.step, "mean_accuracy": acc,
                                     "accuracy": {k: v["accuracy"] for k, v in report.get("results", {}).items()}})
        if self._tb is not None:
            for name, res in report.get("results", {}).items():
                scalars = {k: v for k, v in res.items() if isinstance(v, (int, float)) and k != "num_pairs"}
                scalars.update({f"tar@far={k}": v for k, v in res.get("tar_at_far", {}).items() if v is not None})
                for metric, value in scalars.items():
                    self._tb.add_scalar(f"{name}/{metric}", value, self.step)
            self._tb.add_scalar("eval/mean_accuracy", acc, self.step)
        write_json(os.path.join(self.output_dir, "eval.json"), report)
        if acc == acc and acc > self.best:  # not NaN, improved
            self.best = acc
            if self.save_backbone_fn is not None:
                self.save_backbone_fn(self.model, os.path.join(self.output_dir, "best.pt"))
        self._write_history()
        return report

    def _log_window(self, losses: List[torch.Tensor], seconds: float, epoch: int, bar: tqdm) -> None:
        """Record the mean loss (over good steps and ranks), lr and global throughput of the last steps.

        ``losses`` holds the steps that updated the weights (finite by construction; the same
        number on every rank); none (all skipped): nothing to record.
        """
        if not losses:
            return
        mean_loss = dist_utils.mean_over_ranks(float(torch.stack(losses).mean()), self.dist, self.device)
        if not self.dist.is_main:
            return
        ips = len(losses) * self.global_batch / max(seconds, 1e-9)
        lr = self.optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.4g}", img_s=f"{ips:.0f}", epoch=epoch)
        if not self.cfg.progress:  # logs and pipes get plain lines instead of a bar
            self.log(f"step {self.step}/{self.total_steps} epoch {epoch} loss {mean_loss:.4f} lr {lr:.5g} "
                     f"{ips:.1f} img/s")
        for k, v in (("step", self.step), ("loss", mean_loss), ("lr", lr)):
            self.history[k].append(v)
        for k, v in (("loss", mean_loss), ("lr", lr), ("img_per_s", ips)):
            self._tb.add_scalar(f"train/{k}", v, self.step)

    def _count_bad_step(self) -> None:
        """Count a skipped step (log, history, TensorBoard); stop after ``max_bad_steps`` in a row."""
        if self.last_bad is None:
            self._bad_run = 0
            return
        self.bad_steps += 1
        self._bad_run += 1
        self.history["bad_steps"].append(self.step)
        if self._tb is not None:
            self._tb.add_scalar("train/bad_steps", self.bad_steps, self.step)
        if self._bad_run >= max(1, int(self.cfg.max_bad_steps)):
            raise TrainingDivergedError(
                f"step {self.step}: {self._bad_run} steps in a row skipped for a non-finite value ({self.last_bad}; "
                f"lr {self.step_lr:.5g}); stopped without saving: {self._last_good()}; lower --lr or "
                f"set --grad-clip, then resume from it")
        if self.dist.is_main:
            self.log(f"warning: step {self.step}: {self.last_bad} (lr {self.step_lr:.5g}): update skipped "
                     f"({self._bad_run} in a row, {self.bad_steps} in all)")

    def _last_good(self) -> str:
        """Where the run can be resumed from, for error messages."""
        if self._saved_at is None:
            return "no checkpoint was written by this run"
        step, path = self._saved_at
        return f"the last good checkpoint is {path} (step {step})" if path else \
            f"the last good checkpoint is the one resumed from (step {step})"

    def _ensure_finite(self, what: str) -> None:
        """Refuse, on every rank at once, to write or evaluate weights holding NaN/inf."""
        problem = None
        for name, module in (("backbone", self.model), ("head", self.head)):
            try:
                check_finite(module.state_dict(), f"{name} at step {self.step}")
            except CheckpointError as exc:
                problem = str(exc)
                break
        if dist_utils.any_rank(problem is not None, self.dist, self.device):
            raise TrainingDivergedError(f"not writing {what}: {problem or 'non-finite weights on another rank'}; "
                                        f"{self._last_good()}")

    def _due(self, every: int) -> bool:
        """every > 0: each `every` steps; 0: at the end of each epoch; < 0: never."""
        if every > 0:
            return self.step % every == 0
        return every == 0 and self.step % self.steps_per_epoch == 0

    def _on_signal(self, signum: int, _frame: Any) -> None:
        """Acted on at the next step boundary, on every rank at once. A single process blocked
        on the loader (a slow or stuck worker, a run of undecodable batches) stops waiting now."""
        self._signal = signum
        if self.feeder.waiting and not self.dist.distributed:
            raise WaitInterrupted(signal.Signals(signum).name)

    @contextlib.contextmanager
    def _stop_signals(self):
        """SIGTERM / SIGINT (what schedulers and Ctrl-C send) ask for a clean stop with a checkpoint."""
        previous = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # not the main thread: no handlers, no clean stop
            pass
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def fit(self, config: Dict[str, Any], stop_at: int | None = None) -> int | None:
        """Train to `total_steps`, evaluating and checkpointing on the way.

        `stop_at` ends the run early at that step with a checkpoint written (what
        an interruption does); resuming from it continues on the same schedule.
        Returns None when the run ended normally, or the number of the signal
        (SIGTERM/SIGINT) that stopped it at a step boundary after a checkpoint.
        """
        cfg = self.cfg
        end = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        main = self.dist.is_main
        if main:
            os.makedirs(self.output_dir, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter  # local: heavy import

            self._tb = SummaryWriter(os.path.join(self.output_dir, "tb"))
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                   disable=not (cfg.progress and main), dynamic_ncols=True)
        window: List[torch.Tensor] = []
        t0 = time.perf_counter()
        last_eval = last_save = -1
        stopped = None
        try:
            with self._stop_signals():
                while self.step < end and stopped is None:
                    epoch, start = divmod(self.step, self.steps_per_epoch)
                    self.sampler.set_epoch(epoch, start * self.accum)
                    before = self.step
                    try:
                        for micro in self.feeder.steps():
                            loss = self.train_step(micro)
                            self.step += 1
                            bar.update(1)
                            self._count_bad_step()
                            if self.last_bad is None:
                                window.append(loss)
                            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                                self._log_window(window, time.perf_counter() - t0, epoch, bar)
                                window, t0 = [], time.perf_counter()
                            if dist_utils.any_rank(self._signal is not None, self.dist, self.device):
                                stopped = self._signal or signal.SIGTERM
                                break
                            if self._due(cfg.save_every):  # before evaluating: a failing evaluation keeps it
                                self.save(config)
                                last_save = self.step
                            if self._due(cfg.eval_every):
                                self._log_eval(self.evaluate())
                                last_eval = self.step
                            if self.step >= end or self.step % self.steps_per_epoch == 0:
                                break
                    except WaitInterrupted:  # a signal while waiting for a batch (one process): stop now
                        pass
                    if stopped is None and dist_utils.any_rank(self._signal is not None, self.dist, self.device):
                        stopped = self._signal or signal.SIGTERM  # it came while the feeder skipped or waited
                    elif stopped is None and self.step == before:
                        raise DataSourceError(f"epoch {epoch} gave no complete optimizer step of "
                                              f"{self.global_batch} images (undecodable images?)")
                if last_save != self.step:
                    self.save(config)
                if stopped is None and self.step >= self.total_steps and last_eval != self.step:
                    self._log_eval(self.evaluate())
        finally:
            bar.close()
            self.feeder.close()
            if self._tb is not None:
                self._tb.close()
        if stopped is not None and main:
            self.log(f"stopped by signal {signal.Signals(stopped).name} at step {self.step}: checkpoint written; "
                     f"continue with --resume {self.output_dir}")
        return stopped

    def _log_eval(self, report: Dict[str, Any] | None) -> None:
        if not report or not self.dist.is_main:
            return
        results = report.get("results", {})
        parts = [f"{k} {100 * v['accuracy']:.2f}" for k, v in results.items()]
        norms = [v["xnorm"] for v in results.values() if v.get("xnorm") is not None]
        xnorm = f", XNorm {sum(norms) / len(norms):.3g}" if norms else ""
        self.log(f"step {self.step}: verification " + ", ".join(parts)
                 + f" | mean {100 * report['mean_accuracy']:.2f}%{xnorm}")
