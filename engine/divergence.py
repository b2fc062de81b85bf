"""Stop a diverging run before it writes anything unusable.

Steps skipped for a non-finite loss, gradient or lr (engine/update.py) are counted (the count
is kept in the checkpoint); ``max_bad_steps`` of them in a row stop the run. Nothing with
non-finite weights is ever written or evaluated. Either error names the last good checkpoint,
the one to resume from.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn as nn

from engine import distributed as dist_utils
from engine.distributed import DistInfo
from engine.runlog import RunLog
from utils.torchfile import CheckpointError, check_finite


class TrainingDivergedError(CheckpointError):
    """The run cannot go on to a usable checkpoint: too many non-finite steps in a row, or
    non-finite weights about to be saved. A CheckpointError, so scripts print it as one line."""


class DivergenceGuard:
    """Skipped steps (``bad_steps`` in all), and the latest checkpoint written or loaded (:meth:`saved`).

    ``log`` records each skipped step (history, TensorBoard) with a warning line.
    """

    def __init__(self, max_bad_steps: int, log: RunLog, dist: DistInfo, device: torch.device) -> None:
        self.max_bad_steps, self.log, self.dist, self.device = max_bad_steps, log, dist, device
        self.bad_steps = 0  # optimizer steps skipped for a non-finite loss/gradient/lr (kept in the checkpoint)
        self._bad_run = 0
        self._saved_at: Tuple[int, str | None] | None = None  # (step, path) of the last checkpoint written or loaded

    def count(self, step: int, bad: str | None, lr: float) -> None:
        """Count step ``step`` (``bad``: why it was skipped, None when it updated the weights; ``lr``:
        its lr); TrainingDivergedError after ``max_bad_steps`` skipped in a row."""
        if bad is None:
            self._bad_run = 0
            return
        self.bad_steps += 1
        self._bad_run += 1
        self.log.bad_step(step, self.bad_steps)
        if self._bad_run >= self.max_bad_steps:
            raise TrainingDivergedError(
                f"step {step}: {self._bad_run} steps in a row skipped for a non-finite value ({bad}; "
                f"lr {lr:.5g}); stopped without saving: {self.last_good()}; lower --lr or "
                f"set --grad-clip, then resume from it")
        self.log(f"warning: step {step}: {bad} (lr {lr:.5g}): update skipped "
                 f"({self._bad_run} in a row, {self.bad_steps} in all)")

    def saved(self, step: int, path: str | None) -> None:
        """A checkpoint of step ``step`` was written to ``path`` (None: the one resumed from was loaded)."""
        self._saved_at = (step, path)

    def ensure_finite(self, modules: Sequence[Tuple[str, nn.Module]], step: int, what: str) -> None:
        """Refuse, on every rank at once, to write or evaluate (``what``) weights holding NaN/inf."""
        problem = None
        for name, module in modules:
            try:
                check_finite(module.state_dict(), f"{name} at step {step}")
            except CheckpointError as exc:
                problem = str(exc)
                break
        if dist_utils.any_rank(problem is not None, self.dist, self.device):
            raise TrainingDivergedError(f"not writing {what}: {problem or 'non-finite weights on another rank'}; "
                                        f"{self.last_good()}")

    def last_good(self) -> str:
        """Where the run can be resumed from, for error messages."""
        if self._saved_at is None:
            return "no checkpoint was written by this run"
        step, path = self._saved_at
        return f"the last good checkpoint is {path} (step {step})" if path else \
            f"the last good checkpoint is the one resumed from (step {step})"
