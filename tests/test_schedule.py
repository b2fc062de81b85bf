"""Learning-rate schedules against their closed forms."""

import math

import pytest
import torch

from config import Config
from engine.schedule import build_scheduler, lr_factor


def test_warmup_is_linear_then_cosine():
    total, warm = 100, 10
    assert lr_factor(0, total, warm) == pytest.approx(0.1)
    assert lr_factor(9, total, warm) == pytest.approx(1.0)
    assert lr_factor(10, total, warm) == pytest.approx(1.0)
    assert lr_factor(55, total, warm) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_factor(100, total, warm) == pytest.approx(0.0)


def test_step_schedule():
    f = [lr_factor(s, 100, 0, "step", milestones=(30, 60), gamma=0.1) for s in (0, 29, 30, 59, 60, 99)]
    assert f == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_poly_schedule():
    assert lr_factor(50, 100, 0, "poly", power=2.0) == pytest.approx(0.25)


def test_unknown_schedule_names_it():
    with pytest.raises(KeyError, match="cosine"):
        lr_factor(5, 10, 0, "cosin")


def test_the_config_schedule_counts_warmup_and_milestones_in_epochs():
    """--warmup-epochs 0.5 and --milestones 1,2 at 10 steps/epoch: warmup over 5 steps, lr x0.1 from
    step 10 and x0.01 from step 20 (lr 0.1; hand-computed)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    cfg = Config(lr=0.1, scheduler="step", warmup_epochs=0.5, milestones=(1, 2), lr_gamma=0.1)
    sched = build_scheduler(cfg, opt, total_steps=30, steps_per_epoch=10)
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert (lrs[9], lrs[10], lrs[19], lrs[20], lrs[29]) == pytest.approx((0.1, 0.01, 0.01, 0.001, 0.001))
