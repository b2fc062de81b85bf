"""Losses against float64 formulas written out here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import losses


def batch(n=16, c=7, spread=4.0):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, c, generator=g) * spread
    labels = torch.randint(0, c, (n,), generator=g)
    return logits, labels


def ce_per_sample(logits, labels):
    """-log softmax(logits)[label], float64, from the definition."""
    z = logits.double()
    return torch.log(torch.exp(z).sum(1)) - z[torch.arange(len(labels)), labels]


@pytest.mark.parametrize("gamma", [0.5, 2.0, 5.0])
def test_focal_per_sample_matches_formula(gamma):
    logits, labels = batch()
    ce = ce_per_sample(logits, labels)
    p = torch.exp(-ce)
    want = ((1 - p) ** gamma * ce).mean()
    got = losses.build("focal", gamma=gamma)(logits, labels)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_focal_down_weights_per_sample_not_per_batch():
    logits, labels = batch()
    per_sample = losses.build("focal")(logits, labels)
    per_batch = losses.build("focal", reduction="batch")(logits, labels)
    assert not torch.isclose(per_sample, per_batch, rtol=1e-3)


@pytest.mark.parametrize("reduction", ["mean", "batch"])
def test_focal_gamma_zero_is_cross_entropy(reduction):
    logits, labels = batch()
    got = losses.build("focal", gamma=0.0, reduction=reduction)(logits, labels)
    torch.testing.assert_close(got.double(), ce_per_sample(logits, labels).mean(), rtol=1e-5, atol=1e-7)


def test_focal_batch_reduction_is_the_seeds_formula():
    logits, labels = batch()
    ce_mean = ce_per_sample(logits, labels).mean()
    want = (1 - math.exp(-ce_mean.item())) ** 2.0 * ce_mean
    got = losses.build("focal", gamma=2.0, reduction="batch")(logits, labels)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_focal_gradients_finite_for_confident_and_hopeless_samples():
    logits = torch.tensor([[60.0, 0.0, 0.0], [0.0, 60.0, 0.0]], requires_grad=True)  # p_t = 1 and p_t ~ 0
    for gamma in (0.5, 2.0):
        logits.grad = None
        losses.build("focal", gamma=gamma)(logits, torch.tensor([0, 0])).backward()
        assert torch.isfinite(logits.grad).all()


def smoothed_ce_reference(logits, labels, smoothing):
    """Mean cross-entropy against the smoothed target (1 - eps) one-hot + eps / C, float64, by definition."""
    logp = torch.log_softmax(logits.double(), dim=1)
    target = torch.full_like(logp, smoothing / logits.shape[1])
    target[torch.arange(len(labels)), labels] += 1 - smoothing
    return -(target * logp).sum(1).mean()


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_cross_entropy_with_label_smoothing(smoothing):
    logits, labels = batch()
    want = smoothed_ce_reference(logits, labels, smoothing)
    got = losses.build("cross_entropy", label_smoothing=smoothing)(logits, labels)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got, F.cross_entropy(logits, labels, label_smoothing=smoothing))


def test_registry_aliases_and_errors():
    assert {"cross_entropy", "ce", "softmax", "focal"} <= set(losses.names())
    assert type(losses.build("ce")) is type(losses.build("softmax")) is type(losses.build("cross_entropy"))
    with pytest.raises(TypeError, match=r"loss 'focal'.*'alpha'.*valid: gamma, reduction"):
        losses.build("focal", alpha=0.25)
    with pytest.raises(KeyError, match="did you mean 'focal'"):
        losses.build("focall")
    with pytest.raises(ValueError, match="reduction"):
        losses.build("focal", reduction="sum")


# ---------------------------------------------------------------- from per-sample cross-entropy (Partial FC's path)

def uniform_per_sample(logits):
    """-mean_j log softmax(logits)_j, float64, from the definition."""
    z = logits.double()
    return torch.log(torch.exp(z).sum(1)) - z.mean(1)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_from_sample_ce_matches_smoothed_target_definition(smoothing):
    logits, labels = batch()
    want = smoothed_ce_reference(logits, labels, smoothing)
    got = losses.build("cross_entropy", label_smoothing=smoothing).from_sample_ce(
        ce_per_sample(logits, labels), uniform_per_sample(logits))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_cross_entropy_from_sample_ce_needs_uniform_term_when_smoothing():
    logits, labels = batch()
    with pytest.raises(ValueError, match=r"label_smoothing=0.1 needs uniform_ce"):
        losses.build("cross_entropy", label_smoothing=0.1).from_sample_ce(ce_per_sample(logits, labels))


@pytest.mark.parametrize("reduction", ["mean", "batch"])
def test_focal_from_sample_ce_matches_formula(reduction):
    logits, labels = batch()
    ce = ce_per_sample(logits, labels)
    c = ce.mean() if reduction == "batch" else ce
    want = ((1 - torch.exp(-c)) ** 2.0 * c).mean()
    got = losses.build("focal", gamma=2.0, reduction=reduction).from_sample_ce(ce)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- precision

LOSS_CASES = [("cross_entropy", {}), ("cross_entropy", {"label_smoothing": 0.2}), ("focal", {"gamma": 2.0}),
              ("focal", {"gamma": 0.5, "reduction": "batch"})]


def reference_loss(name, params, logits, labels):
    """float64 loss from the definitions written out above."""
    if name == "cross_entropy":
        return smoothed_ce_reference(logits, labels, params.get("label_smoothing", 0.0))
    ce = ce_per_sample(logits, labels)
    if params.get("reduction") == "batch":
        ce = ce.mean()
    return ((1 - torch.exp(-ce)) ** params["gamma"] * ce).mean()


@pytest.mark.parametrize("name,params", LOSS_CASES)
def test_float64_logits_give_a_float64_loss_exactly(name, params):
    logits, labels = batch()
    logits = logits.double().requires_grad_(True)
    got = losses.build(name, **params)(logits, labels)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference_loss(name, params, logits.detach(), labels), rtol=1e-13, atol=1e-14)
    assert torch.autograd.gradcheck(lambda z: losses.build(name, **params)(z, labels), (logits,))


@pytest.mark.parametrize("name,params", LOSS_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_logits_are_computed_in_float32(name, params, dtype):
    logits, labels = batch()
    got = losses.build(name, **params)(logits.to(dtype), labels)
    assert got.dtype == torch.float32
    want = reference_loss(name, params, logits.to(dtype).double(), labels)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,params,error,match", [
    ("cross_entropy", {"label_smoothing": 1.0}, ValueError, r"cross_entropy: label_smoothing must be a finite number"),
    ("cross_entropy", {"label_smoothing": float("nan")}, ValueError, "label_smoothing"),
    ("cross_entropy", {"label_smoothing": "0.1"}, TypeError, "label_smoothing must be a number"),
    ("focal", {"gamma": -1.0}, ValueError, r"focal: gamma must be a finite number >= 0"),
    ("focal", {"gamma": float("nan")}, ValueError, "focal: gamma"),
    ("focal", {"gamma": float("inf")}, ValueError, "focal: gamma"),
])
def test_out_of_range_parameters_raise_one_clear_error(name, params, error, match):
    with pytest.raises(error, match=match):
        losses.build(name, **params)
