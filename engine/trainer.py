"""The training loop: one object that owns model, objective, optimizer, scaler and state.

train.py builds the parts from a Config and hands them here; this module knows nothing
of the command line. Everything that changes during training (weights, optimizer,
scheduler, scaler, head buffers, step, RNG) is in the checkpoint, so a resumed run
continues exactly where it stopped (engine/train_state.py: what the parts put into it).

One code path for one process and for N (torchrun), and for every head: the backbone and
the objective's replica (a dense head) run under DistributedDataParallel when there is a
process group; a sharded head (Partial FC) offers the same surface (engine/objective.py)
and its sharded parameters are the only thing the step treats apart (engine/step.py).
Each rank reads every W-th sample of one permutation, so the global batch of a step is
the same set of images whatever W is; flips are drawn for the global batch and sliced;
checkpoints hold full (gathered) centres. A run therefore resumes at another world size
on the same data stream when the global batch is kept. Rank 0 logs, evaluates and
writes (engine/runlog.py, engine/periodic_eval.py); the others wait at a barrier.

A step whose loss or gradient norm (or lr) is not finite is skipped, the schedule still
advancing (engine/update.py); ``max_bad_steps`` such steps in a row stop the run, and
nothing with non-finite weights is ever written or evaluated (engine/divergence.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from typing import Any, Dict, Iterator, List, Tuple

import torch
import torch.nn as nn

from backbones.weights import save_backbone
from config import Config, to_dict
from data.dataset import FaceDataset
from data.mixing import build_sampler
from data.sources import DataSourceError
from engine import distributed as dist_utils
from engine import step as steps
from engine import train_state
from engine.checkpoint import rng_state, save_training_checkpoint, set_rng_state
from engine.distributed import DistInfo
from engine.divergence import DivergenceGuard
from engine.ema import BackboneEMA
from engine.feeder import BatchFeeder, MicroBatch, WaitInterrupted
from engine.objective import Objective
from engine.optim import base_lr, build_optimizer
from engine.periodic_eval import Evaluator, evaluate_weights
from engine.runlog import LossWindow, RunLog
from engine.schedule import build_scheduler
from engine.stopping import StopSignals
from engine.teacher import Distillation, Teacher, check_same_teacher
from engine.update import GuardedUpdate
from utils.precision import amp_dtype, needs_grad_scaler


class Trainer:
    """Train ``model`` with ``objective`` (engine/objective.py) on ``dataset``, as ``cfg`` says.

    ``evaluator`` (optional, rank 0) maps the backbone to {"mean_accuracy": float, "results": {...}}
    and is called every ``cfg.eval_every`` steps (or each epoch) and at the end. ``run_log``
    (default: one over ``cfg.output``) gets every line, the progress and the history. The run
    directory is ``cfg.output``; the checkpoints' config is ``cfg``.
    """

    def __init__(self, cfg: Config, model: nn.Module, objective: Objective, dataset: FaceDataset,
                 device: torch.device, evaluator: Evaluator | None = None, run_log: RunLog | None = None,
                 dist_info: DistInfo = DistInfo(), teacher: Teacher | None = None) -> None:
        self.cfg, self.device, self.dist, self.dataset, self.evaluator = cfg, device, dist_info, dataset, evaluator
        self.output_dir = cfg.output
        self.model, self.objective = model.to(device), objective.to(device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.log = run_log if run_log is not None else RunLog(cfg.output, dist_info.is_main, cfg.progress)
        self.accum = cfg.grad_accum
        sizes = [len(s) for s in dataset.sources] if cfg.data_weights else [len(dataset)]  # per source if mixed
        self.sampler = build_sampler(sizes, cfg.batch_size, seed=cfg.seed,
                                     rank=dist_info.rank, world_size=dist_info.world_size, weights=cfg.data_weights)
        if cfg.data_weights:
            self.log(self.sampler.describe([s.path for s in dataset.sources]))
        self.global_batch = cfg.batch_size * dist_info.world_size * self.accum
        self.steps_per_epoch = self.sampler.batches_per_epoch() // self.accum
        if self.steps_per_epoch == 0:
            raise DataSourceError(f"{len(dataset)} images are fewer than one optimizer step of {self.global_batch} "
                                  f"(batch {cfg.batch_size} x {dist_info.world_size} processes x grad_accum "
                                  f"{self.accum})")
        total = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps > 0 else total
        self.optimizer = build_optimizer(cfg, self.model, self.objective)  # engine/optim.py: --optimizer, groups
        self.ema = BackboneEMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None  # engine/ema.py
        self.scheduler = build_scheduler(cfg, self.optimizer, self.total_steps, self.steps_per_epoch)
        self.amp_dtype = amp_dtype(cfg.amp_dtype, device) if cfg.amp else None
        self.use_scaler = self.amp_dtype is not None and needs_grad_scaler(self.amp_dtype, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_scaler)
        # knowledge distillation (engine/teacher.py): a frozen teacher outside model, optimizer and checkpoint
        self.distill = None if teacher is None else Distillation(
            teacher.to(device, cfg.channels_last), cfg.distill_loss, cfg.distill_weight, cfg.margin_loss_weight,
            self.amp_dtype)
        self.distill_term = torch.zeros(())  # the latest step's distillation term (mean over its micro-batches)
        self.data_parallel = steps.wants_data_parallel(cfg.data_parallel, dist_info, device)
        self._backbone = torch.compile(self.model) if cfg.compile else self.model
        self.step_module = steps.wrap(steps.StepModule(self._backbone, objective.replica, self.amp_dtype), dist_info,
                                      device, self.data_parallel)
        self.freeze_steps = cfg.freeze_backbone_epochs * self.steps_per_epoch  # steps 0..freeze_steps-1: frozen
        self.frozen = False
        self.step = 0
        self.best = -math.inf
        self.last_bad: str | None = None  # why the latest step was skipped; None: it updated the weights
        self.step_lr = float(cfg.lr)  # the lr of the latest step
        self.update = GuardedUpdate(self.model, self.objective, self.optimizer, self.scheduler, self.scaler,
                                    self.use_scaler, self.ema, cfg.grad_clip, dist_info, device)
        self.guard = DivergenceGuard(cfg.max_bad_steps, self.log, dist_info, device)
        self.stops = StopSignals(dist_info, device, waiting=lambda: self.feeder.waiting)
        self.feeder = BatchFeeder(dataset, self.sampler, cfg.num_workers, device, dist_info, self.accum, self.log,
                                  max_bad_fraction=cfg.max_bad_fraction,
                                  stop_requested=lambda: self.stops.received is not None)

    @property
    def history(self) -> Dict[str, List[Any]]:
        """Logged losses, learning rates, evaluations and skipped steps (engine/runlog.py)."""
        return self.log.history

    @property
    def skipped(self) -> int:
        """Undecodable images dropped so far (kept in the checkpoint)."""
        return self.feeder.skipped

    @property
    def bad_steps(self) -> int:
        """Optimizer steps skipped for a non-finite loss, gradient or lr (kept in the checkpoint)."""
        return self.guard.bad_steps

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Everything to resume, independent of the world size (engine/train_state.py).

        Collective (all ranks call it): a sharded head's parameters and their momentum are
        gathered as full matrices in rank 0's host memory; only rank 0's copy is complete.
        """
        group = dist_utils.cpu_group() if self.dist.distributed else None
        parts = train_state.parts_state(self.model, self.objective, self.optimizer, self.scheduler, self.scaler,
                                        self.ema, group)
        return {"step": self.step, **parts, "best": self.best, "skipped": self.skipped, "bad_steps": self.bad_steps,
                "history": self.history, "rng": rng_state(), "world_size": self.dist.world_size,
                "global_batch": self.global_batch,
                **({"teacher": self.distill.teacher.identity()} if self.distill is not None else {})}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a checkpoint written at any world size (full sharded matrices are re-sharded)."""
        check_same_teacher(state.get("teacher"), self.distill.teacher if self.distill is not None else None,
                           self.cfg.resume or "the checkpoint")
        train_state.load_parts_state(state, self.model, self.objective, self.optimizer, self.scheduler, self.scaler,
                                     self.ema, self.use_scaler)
        self.step, self.best, self.feeder.skipped = int(state["step"]), float(state["best"]), int(state["skipped"])
        self.guard.bad_steps = int(state.get("bad_steps", 0))
        self.log.restore(state.get("history"))
        self.guard.saved(self.step, None)
        set_rng_state(state["rng"])

    def save(self) -> None:
        """checkpoint.pt (resume) + backbone.pt (weights) + history.json/loss.png, written by rank 0.

        Every rank calls it (gathering sharded centres is collective); the others wait
        until rank 0 has written, so nobody runs ahead of (or exits before) the files.
        Weights holding NaN/inf are not written: TrainingDivergedError instead.
        """
        self._ensure_finite("a checkpoint")
        state = self.state_dict()
        path = os.path.join(self.output_dir, "checkpoint.pt")
        if self.dist.is_main:
            save_training_checkpoint(path, keep=self.cfg.keep, config=to_dict(self.cfg), **state)
            self.save_backbone("backbone.pt")
            if self.ema is not None:
                self.save_backbone("backbone_ema.pt", self.ema.module)
            self.log.write_history()
        dist_utils.barrier(self.dist, self.device)
        self.guard.saved(self.step, path)

    def save_backbone(self, name: str, model: nn.Module | None = None) -> None:
        """The weights-only file evaluate.py reads (backbone.pt, best.pt, backbone_init.pt, backbone_ema.pt:
        ``model``, default the live backbone) in the run directory."""
        cfg, model = self.cfg, self.model if model is None else model
        save_backbone(os.path.join(self.output_dir, name), model.state_dict(), cfg.backbone,
                      cfg.embedding_size, cfg.input_order, to_dict(cfg))

    # ------------------------------------------------------------------ one step
    def train_step(self, micro_batches: List[MicroBatch]) -> torch.Tensor:
        """One optimizer step over K uint8 micro-batches (engine/step.py); returns the loss (detached,
        on the device). When the loss, the gradient norm or the lr is not finite the update is
        skipped (engine/update.py; ``last_bad`` says why); the scheduler still advances.
        """
        self._set_frozen(self.step < self.freeze_steps)
        self.step_module.train()
        self.objective.train()
        if self.frozen:
            self.model.eval()  # BatchNorm statistics fixed, dropout off
        masks = steps.flip_masks(self.cfg.seed, self.step, self.accum, self.cfg.batch_size, self.dist)
        self.update.begin()
        total, self.distill_term = steps.accumulate_gradients(
            self.step_module, self.objective, self.distill, self.scaler, micro_batches, masks, self.dist, self.device,
            self.cfg.channels_last)
        self.last_bad, self.step_lr = self.update.finish(total)
        return total

    def _set_frozen(self, frozen: bool) -> None:
        """Freeze (or unfreeze) the backbone: requires_grad off, so it gets no gradient, no momentum and
        no weight decay (SGD skips parameters without a gradient) and its weights stay bit-identical.

        DDP registers the parameters that need gradients when it wraps, so the step module is wrapped
        again at each change (on every rank at the same step); a step module with nothing to train
        (frozen backbone, sharded head) is not wrapped in DDP at all.
        """
        if frozen == self.frozen:
            return
        self.frozen = frozen
        for p in self.model.parameters():
            p.requires_grad_(not frozen)
        module = steps.StepModule(self._backbone, self.objective.replica, self.amp_dtype)
        trains = any(p.requires_grad for p in module.parameters())
        self.step_module = steps.wrap(module, self.dist, self.device, self.data_parallel) if trains else module
        if frozen:
            self.log(f"backbone frozen (no gradient, BatchNorm statistics fixed) until step {self.freeze_steps} "
                     f"(--freeze-backbone-epochs {self.cfg.freeze_backbone_epochs})")
        else:
            self.log(f"backbone unfrozen at step {self.step}")

    # ------------------------------------------------------------------ the loop
    def fit(self, stop_at: int | None = None) -> int | None:
        """Train to ``total_steps``: step, log, stop, save, evaluate (saved first: a failing
        evaluation keeps the checkpoint of its step).

        ``stop_at`` ends the run early at that step with a checkpoint written (what an
        interruption does); resuming from it continues on the same schedule. Returns None when
        the run ended normally, or the number of the signal (SIGTERM/SIGINT) that stopped it at a
        step boundary after a checkpoint.
        """
        end = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        saved = evaluated = -1
        window = LossWindow(self.log, self.dist, self.device, self.global_batch, self.distill is not None)
        self.log.open(self.total_steps, self.step)
        try:
            with self.stops.installed():
                for epoch, micro in self._optimizer_steps(end):
                    loss = self.train_step(micro)
                    self.step += 1
                    self.log.stepped()
                    self.guard.count(self.step, self.last_bad, self.step_lr)
                    if self.last_bad is None:
                        window.add(loss, self.distill_term)
                    if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                        window.flush(self.step, self.total_steps, epoch, base_lr(self.optimizer),
                                     self.scaler.get_scale() if self.use_scaler else None)
                    if self.stops.agreed():
                        break
                    if self._due(self.cfg.save_every):
                        self.save()
                        saved = self.step
                    if self._due(self.cfg.eval_every):
                        self.evaluate()
                        evaluated = self.step
                if saved != self.step:
                    self.save()
                if self.stops.stopped is None and self.step >= self.total_steps and evaluated != self.step:
                    self.evaluate()
        finally:
            self.log.close()
            self.feeder.close()
        if self.stops.stopped is not None:
            self.log(f"stopped by signal {signal.Signals(self.stops.stopped).name} at step {self.step}: checkpoint "
                     f"written; continue with --resume {self.output_dir}")
        return self.stops.stopped

    def _optimizer_steps(self, end: int) -> Iterator[Tuple[int, List[MicroBatch]]]:
        """(epoch, micro-batches) of each optimizer step until step ``end`` or an agreed stop signal.

        Each epoch restarts the sampler where the step count says; an epoch that gave no step
        (undecodable images) is an error. A signal while waiting for a batch (one process) ends
        the epoch at once.
        """
        while self.step < end:
            epoch, start = divmod(self.step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch, start * self.accum)
            before = self.step
            with contextlib.suppress(WaitInterrupted):
                for micro in self.feeder.steps():
                    yield epoch, micro
                    if self.step >= end or self.step % self.steps_per_epoch == 0:
                        break
            if self.stops.agreed():  # it came while the feeder skipped or waited
                return
            if self.step == before:
                raise DataSourceError(f"epoch {epoch} gave no complete optimizer step of {self.global_batch} "
                                      f"images (undecodable images?)")

    def _due(self, every: int) -> bool:
        """every > 0: each ``every`` steps; 0: at the end of each epoch; < 0: never."""
        if every > 0:
            return self.step % every == 0
        return every == 0 and self.step % self.steps_per_epoch == 0

    # ------------------------------------------------------------------ verification
    def evaluate(self) -> Dict[str, Any] | None:
        """Verification on rank 0 (engine/periodic_eval.py; the others wait at a barrier); best.pt when
        the mean improves."""
        if self.cfg.eval_every < 0:
            return None
        self._ensure_finite("an evaluation (and best.pt)")
        report = None
        if self.dist.is_main and self.evaluator is not None:
            report, self.best = evaluate_weights(self.evaluator, self.model, self.ema, self.step, self.best, self.log,
                                                 lambda: self.save_backbone("best.pt"))
        dist_utils.barrier(self.dist, self.device)
        return report

    def _ensure_finite(self, what: str) -> None:
        """Refuse, on every rank at once, to write or evaluate weights holding NaN/inf."""
        self.guard.ensure_finite((("backbone", self.model), ("head", self.objective)), self.step, what)
