"""The divergence guard: skipped steps counted, N in a row stop the run, non-finite weights are never
written, and every refusal names the checkpoint to resume from."""

import pytest
import torch
from torch import nn

from engine.distributed import DistInfo
from engine.divergence import DivergenceGuard, TrainingDivergedError
from engine.runlog import RunLog
from utils.torchfile import CheckpointError


def _guard(tmp_path, max_bad_steps=3):
    return DivergenceGuard(max_bad_steps, RunLog(str(tmp_path), progress=False), DistInfo(), torch.device("cpu"))


def test_a_good_step_resets_the_run_of_skipped_steps_but_not_the_total(tmp_path):
    guard = _guard(tmp_path)
    for step, bad in enumerate(["loss nan", "loss nan", None, "loss inf", "loss nan"], start=1):
        guard.count(step, bad, lr=0.1)
    assert guard.bad_steps == 4 and guard.log.history["bad_steps"] == [1, 2, 4, 5]
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert lines[-1] == "warning: step 5: loss nan (lr 0.1): update skipped (2 in a row, 4 in all)"


def test_max_bad_steps_in_a_row_stop_naming_the_last_good_checkpoint(tmp_path):
    guard = _guard(tmp_path, max_bad_steps=2)
    guard.saved(4, "run/checkpoint.pt")
    guard.count(5, "gradient norm inf", lr=0.5)
    with pytest.raises(TrainingDivergedError, match=r"step 6: 2 steps in a row .* "
                                                    r"the last good checkpoint is run/checkpoint.pt \(step 4\)"):
        guard.count(6, "loss nan", lr=0.5)
    assert issubclass(TrainingDivergedError, CheckpointError)  # scripts print it as one line


def test_non_finite_weights_are_refused_naming_the_module(tmp_path):
    guard = _guard(tmp_path)
    good, bad = nn.Linear(2, 2), nn.Linear(2, 2)
    guard.ensure_finite([("backbone", good), ("head", good)], 3, "a checkpoint")  # finite: nothing raised
    with torch.no_grad():
        bad.weight[0, 1] = float("nan")
    with pytest.raises(TrainingDivergedError, match=r"not writing a checkpoint: head at step 3.*"
                                                    r"no checkpoint was written by this run"):
        guard.ensure_finite([("backbone", good), ("head", bad)], 3, "a checkpoint")
    guard.saved(2, None)
    assert guard.last_good() == "the last good checkpoint is the one resumed from (step 2)"
