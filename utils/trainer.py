"""The training loop: one object that owns model, head, optimizer, scaler and state.

train.py builds the parts from the config and hands them here; this module
knows nothing of the command line. Everything that changes during training
(weights, optimizer, scheduler, scaler, head buffers, step, RNG) is in the
checkpoint, so `resume` continues exactly where the run stopped.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any, Callable, Dict, List

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.dataset import FaceDataset, ResumableBatchSampler, collate, worker_init
from data.sources import DataSourceError
from utils import checkpoint as ckpt
from utils.atomic import write_json
from utils.preprocess import normalize, random_flip
from utils.schedule import make_lr_lambda

Evaluator = Callable[[nn.Module], Dict[str, Any]]


def param_groups(modules: List[nn.Module], weight_decay: float) -> List[Dict[str, Any]]:
    """Weight decay on weights (conv, linear, class centres), none on BN and biases (ndim <= 1)."""
    decay, no_decay = [], []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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
                 log: Callable[[str], None] = print) -> None:
        self.cfg, self.device, self.output_dir = cfg, device, output_dir
        self.model, self.head, self.criterion = model.to(device), head.to(device), criterion.to(device)
        if getattr(cfg, "channels_last", False):
            self.model.to(memory_format=torch.channels_last)
        self.dataset, self.evaluator, self.save_backbone_fn, self.log = dataset, evaluator, save_backbone, log
        self.sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, seed=cfg.seed)
        self.steps_per_epoch = self.sampler.batches_per_epoch()
        total = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps > 0 else total
        self.optimizer = torch.optim.SGD(param_groups([self.model, self.head], cfg.weight_decay),
                                         lr=cfg.lr, momentum=cfg.momentum)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, make_lr_lambda(
            total_steps=self.total_steps, warmup_steps=int(round(cfg.warmup_epochs * self.steps_per_epoch)),
            kind=cfg.scheduler, milestones=[int(round(m * self.steps_per_epoch)) for m in cfg.milestones],
            gamma=cfg.lr_gamma, power=cfg.poly_power))
        self.use_scaler = bool(cfg.amp and device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_scaler)
        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.step = 0
        self.skipped = 0
        self.best = -math.inf
        self.history: Dict[str, List[Any]] = {"step": [], "loss": [], "lr": [], "eval": []}
        self._tb = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "model": self.model.state_dict(), "head": self.head.state_dict(),
                "criterion": self.criterion.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "best": self.best, "skipped": self.skipped, "history": self.history, "rng": ckpt.rng_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.head.load_state_dict(state["head"])
        self.criterion.load_state_dict(state.get("criterion", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.best, self.skipped = int(state["step"]), float(state["best"]), int(state["skipped"])
        self.history = state.get("history", self.history)
        ckpt.set_rng_state(state["rng"])

    def save(self, config: Dict[str, Any]) -> None:
        """checkpoint.pt (resume) + backbone.pt (weights) + history.json/loss.png."""
        ckpt.save_training_checkpoint(os.path.join(self.output_dir, "checkpoint.pt"), config=config,
                                      **self.state_dict())
        if self.save_backbone_fn is not None:
            self.save_backbone_fn(self.model, os.path.join(self.output_dir, "backbone.pt"))
        write_json(os.path.join(self.output_dir, "history.json"), self.history)
        from utils.plots import plot_loss  # local: matplotlib only when writing

        plot_loss(self.history, os.path.join(self.output_dir, "loss.png"))

    # ------------------------------------------------------------------- loop
    def _loader(self) -> DataLoader:
        nw = self.cfg.num_workers
        return DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=nw, collate_fn=collate,
                          pin_memory=self.device.type == "cuda", worker_init_fn=worker_init if nw else None,
                          persistent_workers=False, prefetch_factor=4 if nw else None)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One optimizer step on a uint8 batch; returns the loss."""
        self.model.train()
        self.head.train()
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        flips = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.step)
        x = normalize(random_flip(images, flips), channels_last=getattr(self.cfg, "channels_last", False))
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.cfg.amp else contextlib.nullcontext()
        with autocast:
            emb = self.model(x)
        out = self.head(emb.float(), labels)
        loss = self.criterion(out.logits, labels)
        if out.extra_loss is not None:
            loss = loss + out.extra_loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step}: lower --lr or enable --grad-clip")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(loss.detach())

    def evaluate(self) -> Dict[str, Any] | None:
        if self.evaluator is None or self.cfg.eval_every < 0:
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
        return report

    def _check_bad(self, bad: List[Any]) -> None:
        """Stop on an unreadable record; count and report undecodable images."""
        unreadable = [b for b in bad if isinstance(b, str)]
        if unreadable:  # a damaged data file: stop with its one-line message
            raise DataSourceError(unreadable[0])
        if bad:
            self.skipped += len(bad)
            names = ", ".join(self.dataset.describe(i) for i in bad[:3])
            self.log(f"warning: skipped undecodable image(s) {names} ({self.skipped} skipped so far)")

    def _log_window(self, losses: List[float], seconds: float, epoch: int, bar: tqdm) -> None:
        """Record the mean loss, lr and throughput of the last `log_every` steps."""
        mean_loss = sum(losses) / len(losses)
        ips = len(losses) * self.cfg.batch_size / max(seconds, 1e-9)
        lr = self.optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.4g}", img_s=f"{ips:.0f}", epoch=epoch)
        if not self.cfg.progress:  # logs and pipes get plain lines instead of a bar
            self.log(f"step {self.step}/{self.total_steps} epoch {epoch} loss {mean_loss:.4f} lr {lr:.5g} "
                     f"{ips:.1f} img/s")
        for k, v in (("step", self.step), ("loss", mean_loss), ("lr", lr)):
            self.history[k].append(v)
        for k, v in (("loss", mean_loss), ("lr", lr), ("img_per_s", ips)):
            self._tb.add_scalar(f"train/{k}", v, self.step)

    def _due(self, every: int) -> bool:
        """every > 0: each `every` steps; 0: at the end of each epoch; < 0: never."""
        if every > 0:
            return self.step % every == 0
        return every == 0 and self.step % self.steps_per_epoch == 0

    def fit(self, config: Dict[str, Any], stop_at: int | None = None) -> None:
        """Train to `total_steps`, evaluating and checkpointing on the way.

        `stop_at` ends the run early at that step with a checkpoint written (what
        an interruption does); resuming from it continues on the same schedule.
        """
        cfg = self.cfg
        end = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        os.makedirs(self.output_dir, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter  # local: heavy import

        self._tb = SummaryWriter(os.path.join(self.output_dir, "tb"))
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                   disable=not cfg.progress, dynamic_ncols=True)
        window: List[float] = []
        t0 = time.perf_counter()
        last_eval = last_save = -1
        try:
            while self.step < end:
                epoch, start = divmod(self.step, self.steps_per_epoch)
                self.sampler.set_epoch(epoch, start)
                for images, labels, bad in self._loader():
                    self._check_bad(bad)
                    if len(labels) == 0:
                        continue
                    window.append(self.train_step(images, labels))
                    self.step += 1
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        self._log_window(window, time.perf_counter() - t0, epoch, bar)
                        window, t0 = [], time.perf_counter()
                    if self._due(cfg.eval_every):
                        self._log_eval(self.evaluate())
                        last_eval = self.step
                    if self._due(cfg.save_every):
                        self.save(config)
                        last_save = self.step
                    if self.step >= end:
                        break
            if self.step >= self.total_steps and last_eval != self.step:
                self._log_eval(self.evaluate())
            if last_save != self.step:
                self.save(config)
        finally:
            bar.close()
            self._tb.close()

    def _log_eval(self, report: Dict[str, Any] | None) -> None:
        if not report:
            return
        results = report.get("results", {})
        parts = [f"{k} {100 * v['accuracy']:.2f}" for k, v in results.items()]
        norms = [v["xnorm"] for v in results.values() if v.get("xnorm") is not None]
        xnorm = f", XNorm {sum(norms) / len(norms):.3g}" if norms else ""
        self.log(f"step {self.step}: verification " + ", ".join(parts)
                 + f" | mean {100 * report['mean_accuracy']:.2f}%{xnorm}")
