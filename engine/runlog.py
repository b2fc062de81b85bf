"""One run log: what a training run tells people, and where.

Owns the run directory's record of training: train.log (every line, also printed above the
progress bar), the progress bar, TensorBoard scalars (tb/), history.json and loss.png (losses,
learning rates, skipped steps, per-evaluation summaries) and verification.json (the latest
verification report in full). Only rank 0 writes or prints; on the other ranks every method
still keeps ``history`` (it goes into the checkpoint) but shows and writes nothing.

The name eval.json belongs to evaluate.py (its schema, its report folder): training never
writes it. :class:`LossWindow` gathers what one logged line says (the mean over the steps since
the last line and over the ranks).
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List

import torch
from tqdm import tqdm

from engine import distributed as dist_utils
from engine.distributed import DistInfo
from utils.atomic import write_json
from utils.plots import plot_loss

VERIFICATION = "verification.json"


def new_history() -> Dict[str, List[Any]]:
    """Per logged step: ``step``, mean ``loss``, ``lr``; ``eval``: one summary per evaluation;
    ``bad_steps``: the steps skipped for a non-finite value."""
    return {"step": [], "loss": [], "lr": [], "eval": [], "bad_steps": []}


class RunLog:
    """The run's log lines, progress bar, TensorBoard and history files under ``output`` (rank 0: ``main``).

    ``progress`` False: plain lines instead of a bar (logs and pipes). TensorBoard and the bar
    exist between :meth:`open` and :meth:`close` (a run's ``fit``); lines and files work any time.
    """

    def __init__(self, output: str, main: bool = True, progress: bool = True) -> None:
        self.output, self.main, self.progress = output, main, progress
        self.history = new_history()
        self._bar: tqdm | None = None
        self._tb: Any = None

    def __call__(self, msg: str) -> None:
        """Print ``msg`` (above the bar) and append it to train.log (rank 0)."""
        if not self.main:
            return
        tqdm.write(msg)
        with open(os.path.join(self.output, "train.log"), "a", encoding="utf-8") as fh:
            fh.write(msg + "\n")

    def restore(self, history: Dict[str, List[Any]] | None) -> None:
        """Continue the history of a resumed run (a checkpoint's ``history``)."""
        if history is not None:
            self.history = history
        self.history.setdefault("bad_steps", [])

    # ------------------------------------------------------------------ the run
    def open(self, total_steps: int, step: int) -> None:
        """Start the bar at ``step`` of ``total_steps`` and open TensorBoard (rank 0)."""
        if self.main:
            os.makedirs(self.output, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter  # heavy: imported when a run starts

            self._tb = SummaryWriter(os.path.join(self.output, "tb"))
        self._bar = tqdm(total=total_steps, initial=step, desc="train", unit="step",
                         disable=not (self.progress and self.main), dynamic_ncols=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def stepped(self) -> None:
        """One optimizer step done (the bar moves)."""
        if self._bar is not None:
            self._bar.update(1)

    def window(self, step: int, total_steps: int, epoch: int, loss: float, lr: float, img_per_s: float,
               distill: float | None = None, scale: float | None = None) -> None:
        """The mean loss, lr and global throughput of the steps since the last window (rank 0 calls it).

        ``distill`` (with a teacher): the mean unweighted distillation term, also in ``loss``; logged
        as ``distill`` (history, train.log) and ``train/distill`` (TensorBoard). ``scale`` (fp16 with
        a GradScaler): the loss scale at the window's end, as ``scale`` and ``train/grad_scale``: a
        scale that keeps halving flags gradients that overflow fp16.
        """
        extra = {} if distill is None else {"distill": f"{distill:.4f}"}
        if scale is not None:
            extra["scale"] = f"{scale:g}"
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.3f}", **extra, lr=f"{lr:.4g}", img_s=f"{img_per_s:.0f}", epoch=epoch)
        if not self.progress:
            self(f"step {step}/{total_steps} epoch {epoch} loss {loss:.4f}"
                 + "".join(f" {k} {v}" for k, v in extra.items()) + f" lr {lr:.5g} {img_per_s:.1f} img/s")
        for k, v in (("step", step), ("loss", loss), ("lr", lr)):
            self.history[k].append(v)
        scalars = {"train/loss": loss, "train/lr": lr, "train/img_per_s": img_per_s}
        if distill is not None:
            self.history.setdefault("distill", []).append(distill)
            scalars["train/distill"] = distill
        if scale is not None:
            self.history.setdefault("scale", []).append(scale)
            scalars["train/grad_scale"] = scale
        self._scalars(step, scalars)

    def bad_step(self, step: int, count: int) -> None:
        """Step ``step`` was skipped; ``count`` skipped so far in the run."""
        self.history["bad_steps"].append(step)
        self._scalars(step, {"train/bad_steps": count})

    def evaluation(self, step: int, report: Dict[str, Any]) -> None:
        """Record a verification report: history's summary, TensorBoard, verification.json, one line."""
        results = report.get("results", {})
        acc = report.get("mean_accuracy", float("nan"))
        self.history["eval"].append({"step": step, "mean_accuracy": acc,
                                     "accuracy": {k: v["accuracy"] for k, v in results.items()}})
        scalars = {"eval/mean_accuracy": acc}
        for name, res in results.items():
            values = {k: v for k, v in res.items() if isinstance(v, (int, float)) and k != "num_pairs"}
            values.update({f"tar@far={k}": v for k, v in res.get("tar_at_far", {}).items() if v is not None})
            scalars.update({f"{name}/{metric}": value for metric, value in values.items()})
        self._scalars(step, scalars)
        if not self.main:
            return
        write_json(os.path.join(self.output, VERIFICATION), dict(report, step=step))
        norms = [v["xnorm"] for v in results.values() if v.get("xnorm") is not None]
        xnorm = f", XNorm {sum(norms) / len(norms):.3g}" if norms else ""
        self(f"step {step}: verification " + ", ".join(f"{k} {100 * v['accuracy']:.2f}" for k, v in results.items())
             + f" | mean {100 * acc:.2f}%{xnorm}")

    def write_history(self) -> None:
        """history.json and loss.png (rank 0): at each save and after each evaluation."""
        if not self.main:
            return
        write_json(os.path.join(self.output, "history.json"), self.history)
        plot_loss(self.history, os.path.join(self.output, "loss.png"))

    def _scalars(self, step: int, scalars: Dict[str, float]) -> None:
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, step)


class LossWindow:
    """The steps since the last logged line: the losses (and distillation terms) of those that updated
    the weights, and the time they took; :meth:`flush` logs their means and starts a new window.

    ``global_batch``: images per optimizer step over all ranks (the throughput's unit);
    ``distill``: a teacher adds a distillation term, logged apart.
    """

    def __init__(self, log: RunLog, info: DistInfo, device: torch.device, global_batch: int, distill: bool) -> None:
        self.log, self.info, self.device, self.global_batch, self.distill = log, info, device, global_batch, distill
        self.losses: List[torch.Tensor] = []
        self.distill_terms: List[torch.Tensor] = []
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, distill_term: torch.Tensor) -> None:
        """A step that updated the weights (finite by construction; the same number on every rank)."""
        self.losses.append(loss)
        self.distill_terms.append(distill_term)

    def flush(self, step: int, total_steps: int, epoch: int, lr: float, scale: float | None) -> None:
        """Log the mean loss (over the window's steps and the ranks), ``lr`` and the global throughput
        (collective; nothing when every step of the window was skipped), then start a new window."""
        if self.losses:
            seconds = time.perf_counter() - self.t0
            mean_loss = dist_utils.mean_over_ranks(float(torch.stack(self.losses).mean()), self.info, self.device)
            mean_distill = None
            if self.distill:
                mean_distill = dist_utils.mean_over_ranks(float(torch.stack(self.distill_terms).mean()), self.info,
                                                          self.device)
            if self.info.is_main:
                ips = len(self.losses) * self.global_batch / max(seconds, 1e-9)
                self.log.window(step, total_steps, epoch, mean_loss, lr, ips, distill=mean_distill, scale=scale)
        self.losses, self.distill_terms, self.t0 = [], [], time.perf_counter()
