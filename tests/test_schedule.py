"""Learning-rate schedules against their closed forms."""

import math

import pytest

from engine.schedule import lr_factor


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
