"""Margin heads against float64 references written here from the papers' formulas.

Nothing below imports heads' helpers: the references compute theta = arccos(cos) and
the margined target directly, and autograd through them gives the reference gradients.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

import heads
import losses

D, C, B = 16, 10, 12
S = 64.0

# case id -> (head name, build params, buffer values set before the test, eval mode)
CASES = {
    "arcface": ("arcface", {}, {}),
    "arcface_easy": ("arcface", {"easy_margin": True, "m": 0.6}, {}),
    "cosface": ("cosface", {}, {}),
    "sphereface_psi": ("sphereface", {"base": 1e-9, "lambda_min": 0.0}, {}),
    "sphereface_m3": ("sphereface", {"m": 3}, {"iter": 10}),
    "combined": ("combined", {}, {}),
    "combined_preset": ("combined", heads.COMBINED_PRESETS["combined"], {}),
    "combined_m1": ("combined", {"m1": 1.5, "m2": 0.2, "m3": 0.1}, {}),
    "combined_m4": ("combined", {"m1": 4.0, "m2": 0.0, "m3": 0.0}, {}),
    "softmax": ("softmax", {}, {}),
    "norm_softmax": ("norm_softmax", {}, {}),
    "curricularface": ("curricularface", {}, {"t": 0.4}),
    "adaface": ("adaface", {}, {"batch_mean": 15.0, "batch_std": 8.0}),
    "magface": ("magface", {}, {}),  # easy_margin=True by default, as the official MagLinear
    "magface_hard": ("magface", {"easy_margin": False}, {}),
    "subcenter_arcface": ("subcenter_arcface", {"K": 3}, {}),
    "elasticface_arc": ("elasticface_arc", {}, {}),
    "elasticface_cos": ("elasticface_cos", {}, {}),
}


# ---------------------------------------------------------------- references (float64)

def arc(c, m):
    """cos(theta + m), and the ArcFace fallback c - m*sin(m) once theta + m reaches pi."""
    theta = torch.acos(c)
    return torch.where(theta + m < math.pi, torch.cos(theta + m), c - m * math.sin(m))


def with_target(cos, y, target):
    hot = F.one_hot(y, cos.shape[1]).bool()
    return torch.where(hot, target.unsqueeze(1), cos)


def reference(case, x, w, y, bias=None, state=None):
    """float64 (logits, extra_loss) of ``case`` for embeddings x (B, D), centres w, labels y;
    ``state`` overrides the case's buffer values."""
    name, p, case_state = CASES[case]
    state = case_state if state is None else state
    a = x.norm(dim=1)
    if name == "softmax":
        return x @ w.T + bias, None
    cos = ((x / a[:, None]) @ (w / w.norm(dim=1, keepdim=True)).T).clamp(-1, 1)  # rounding can leave [-1, 1]
    if name == "subcenter_arcface":
        cos = cos.reshape(len(x), C, p["K"]).amax(dim=2)
    ct = cos[torch.arange(len(y)), y]
    theta = torch.acos(ct)
    if case == "arcface_easy":
        return S * with_target(cos, y, torch.where(ct > 0, torch.cos(theta + 0.6), ct)), None
    if name in ("arcface", "subcenter_arcface", "elasticface_arc"):
        return S * with_target(cos, y, arc(ct, 0.5)), None
    if name in ("cosface", "elasticface_cos"):
        return S * with_target(cos, y, ct - 0.35), None
    if name == "norm_softmax":
        return S * cos, None
    if name == "sphereface":
        m = p.get("m", 4)
        lam = max(p.get("lambda_min", 5.0), p.get("base", 1000.0) / (1 + 0.12 * state.get("iter", 0)))
        k = torch.floor(m * theta.detach() / math.pi)
        psi = (-1.0) ** k * torch.cos(m * theta) - 2 * k
        return a[:, None] * with_target(cos, y, (lam * ct + psi) / (1 + lam)), None
    if name == "combined":
        m1, m2, m3 = (p.get(k, d) for k, d in (("m1", 1.0), ("m2", 0.5), ("m3", 0.0)))
        tmax = (math.pi - m2) / m1
        mm = max((math.pi - tmax) * math.sin(tmax), 1 + math.cos(tmax))
        target = torch.where(m1 * theta + m2 <= math.pi, torch.cos(m1 * theta + m2), ct - mm) - m3
        return S * with_target(cos, y, target), None
    if name == "curricularface":
        t = state["t"]
        ctm = torch.cos(theta + 0.5)
        hard = cos > ctm.detach()[:, None]
        return S * with_target(torch.where(hard, cos * (t + cos), cos), y, arc(ct, 0.5)), None
    if name == "adaface":
        eps, m = 1e-3, 0.4
        an = a.detach().clamp(0.001, 100)
        scaler = ((an - state["batch_mean"]) / (state["batch_std"] + eps) * 0.333).clamp(-1, 1)
        th = torch.acos(ct.clamp(-1 + eps, 1 - eps))
        target = torch.cos((th - m * scaler).clamp(eps, math.pi - eps)) - (m + m * scaler)
        return S * with_target(cos, y, target), None
    if name == "magface":
        ac = a.clamp(10, 110)
        m = (0.8 - 0.45) / 100 * (ac - 10) + 0.45
        if p.get("easy_margin", True):  # official MagLinear: margin only where cos(theta) > 0
            target = torch.where(ct > 0, torch.cos(theta + m), ct)
        else:  # official non-easy branch: cos - sin(pi - m)*m once theta + m passes pi
            target = torch.where(theta + m < math.pi, torch.cos(theta + m), ct - m * torch.sin(m))
        return S * with_target(cos, y, target), 20 * (1 / ac + ac / 110 ** 2).mean()
    raise AssertionError(case)


# ---------------------------------------------------------------- fixtures

def make_head(case, dtype=torch.float32):
    name, params, state = CASES[case]
    head = heads.build(name, D, C, **params).to(dtype).eval()
    with torch.no_grad():
        head.weight.normal_()
        if getattr(head, "bias", None) is not None:
            head.bias.normal_()
        for key, value in state.items():
            getattr(head, key).fill_(value)
    return head


def make_batch(head, dtype=torch.float64, exact=True):
    """Embeddings with norms 0.5..150. Rows 0, 1: exactly along / opposite their target
    centre (cos = +1 / -1); row 2: cos ~ -0.97 (theta + m past pi); the rest random."""
    g = torch.Generator().manual_seed(1)
    w = head.weight.detach().to(dtype)
    k = head.rows_per_class
    y = torch.randint(0, C, (B,), generator=g)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    x = x / x.norm(dim=1, keepdim=True) * torch.exp(torch.empty(B, 1, dtype=dtype).uniform_(math.log(0.5),
                                                                                                math.log(150),
                                                                                                generator=g))
    centre = w[y * k]
    x[0], x[1] = 3 * centre[0], -40 * centre[1]
    x[2] = -centre[2] + 0.2 * centre[2].norm() * torch.randn(D, generator=g, dtype=dtype) / math.sqrt(D)
    if not exact:
        x, y = x[2:], y[2:]
    return x, y


def run(head, x, y):
    out = head(x, y)
    return out.logits, out.extra_loss


# ---------------------------------------------------------------- reference agreement

@pytest.mark.parametrize("case", CASES)
def test_logits_match_reference_float64_with_exact_pm1_rows(case):
    head = make_head(case, torch.float64)
    x, y = make_batch(head)
    w64 = head.weight.detach()
    logits, extra = run(head, x, y)
    ref, ref_extra = reference(case, x, w64, y, getattr(head, "bias", None))
    # atol: the heads floor 1 - cos^2 at 1e-12, i.e. sin(theta) >= 1e-6 at cos = +-1
    torch.testing.assert_close(logits, ref.detach(), rtol=1e-7, atol=1e-4)
    assert (logits[0] != logits[1]).any()
    if ref_extra is not None:
        torch.testing.assert_close(extra, ref_extra)
    else:
        assert extra is None


@pytest.mark.parametrize("case", CASES)
def test_float32_logits_and_gradients_match_reference(case):
    head = make_head(case)
    x, y = make_batch(head, torch.float32, exact=False)
    x.requires_grad_(True)
    probe = torch.randn(len(y), C, dtype=torch.float64)
    logits, extra = run(head, x, y)
    assert logits.dtype == torch.float32
    ((logits.double() * probe).sum() + (extra if extra is not None else 0)).backward()

    x64 = x.detach().double().requires_grad_(True)
    w64 = head.weight.detach().double().requires_grad_(True)
    bias = head.bias.detach().double() if getattr(head, "bias", None) is not None else None
    ref, ref_extra = reference(case, x64, w64, y, bias)
    ((ref * probe).sum() + (ref_extra if ref_extra is not None else 0)).backward()

    torch.testing.assert_close(logits.double(), ref.detach(), rtol=1e-5, atol=1e-3)
    for got, want in ((x.grad, x64.grad), (head.weight.grad, w64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("case", CASES)
def test_gradcheck_float64(case):
    head = make_head(case, torch.float64)
    g = torch.Generator().manual_seed(2)
    n, d = 4, D
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * torch.tensor([[20.0], [45.0], [70.0], [95.0]], dtype=torch.float64)
    y = torch.tensor([0, 3, 3, 9])
    w = head.weight.detach().clone().requires_grad_(True)
    x.requires_grad_(True)

    def f(x, w):
        out = torch.func.functional_call(head, {"weight": w}, (x, y))
        return out.logits if out.extra_loss is None else (out.logits, out.extra_loss)

    if case == "adaface":  # AdaFace detaches the norms (official): check the margin at fixed norms
        norms = x.detach().norm(dim=1, keepdim=True)
        f = lambda x, w: head.margin_logits(head.cosine(x, w), y, norms)
    assert torch.autograd.gradcheck(f, (x, w), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_margin_logits_exact_pm1_cosines_are_finite_and_exact():
    # cos exactly +1 and -1 on the target (float32): values match arccos-based formulas, gradients finite
    for case in ("arcface", "combined", "curricularface", "magface", "elasticface_arc", "sphereface_psi", "adaface"):
        head = make_head(case)
        cos = torch.tensor([[1.0, 0.2, -0.3], [-1.0, 0.1, 0.5]], requires_grad=True)
        y = torch.tensor([0, 0])
        norms = torch.tensor([[30.0], [60.0]])
        logits = head.margin_logits(cos, y, norms)
        logits.sum().backward()
        assert torch.isfinite(logits).all() and torch.isfinite(cos.grad).all(), case
    a = make_head("arcface").margin_logits(torch.tensor([[1.0], [-1.0]]), torch.tensor([0, 0]), torch.ones(2, 1))
    torch.testing.assert_close(a[:, 0], torch.tensor([S * math.cos(0.5), S * (-1 - 0.5 * math.sin(0.5))]))


@pytest.mark.parametrize("name,params", [("arcface", {}), ("curricularface", {}), ("magface", {"easy_margin": False}),
                                         ("combined", {"m1": 1.5, "m2": 0.2, "m3": 0.1}),
                                         ("combined", {"m1": 4.0, "m2": 0.0, "m3": 0.0}),
                                         ("combined", {"m1": 1.0, "m2": 1.2, "m3": 0.0})])
def test_target_logit_decreases_monotonically_in_theta(name, params):
    head = heads.build(name, D, C, **params).eval()
    theta = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
    cos = torch.cos(theta).unsqueeze(1)
    target = head.double().margin_logits(cos, torch.zeros(len(theta), dtype=torch.long),
                                         torch.full_like(cos, 50.0))[:, 0]
    assert (target[1:] <= target[:-1] + 1e-9).all()


# ---------------------------------------------------------------- precision and magnitudes

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["autocast_bf16", "float16_inputs"])
def test_finite_under_low_precision_and_extreme_norms(case, mode):
    head = make_head(case).train()
    x, y = make_batch(head, torch.float32)
    norms = torch.logspace(-3, 3, len(y)).unsqueeze(1)
    x = (x / x.norm(dim=1, keepdim=True) * norms).detach()
    if mode == "float16_inputs":
        x = x.half()
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast_bf16"):
        logits, extra = run(head, x, y)
        loss = F.cross_entropy(logits, y) + (extra if extra is not None else 0)
    assert logits.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(logits).all()
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


# ---------------------------------------------------------------- sharding contract

@pytest.mark.parametrize("case", [c for c in CASES if c != "softmax"])
def test_unlabelled_rows_are_only_scaled(case):
    head = make_head(case)
    cos = torch.rand(6, C) * 2 - 1
    y = torch.tensor([-1, 2, -1, 5, -1, 0])
    norms = torch.full((6, 1), 30.0)
    logits = head.margin_logits(cos, y, norms)
    scale = 30.0 if CASES[case][0] == "sphereface" else S
    free = y < 0
    torch.testing.assert_close(logits[free], scale * cos[free])
    if case != "norm_softmax":  # the labelled rows do get a margin (easy_margin: only where cos > 0)
        easy = case in ("arcface_easy", "magface")
        rows = torch.nonzero(~free & ((cos[torch.arange(6), y.clamp(min=0)] > 0) | (not easy)))
        rows = rows.squeeze(1)
        assert len(rows) and (logits[rows, y[rows]] < scale * cos[rows, y[rows]]).all()


@pytest.mark.parametrize("case", CASES)
def test_two_shards_reproduce_the_full_softmax(case):
    head = make_head(case)
    g = torch.Generator().manual_seed(3)
    cos = torch.rand(8, C, generator=g) * 2 - 1
    y = torch.randint(0, C, (8,), generator=g)
    norms = torch.rand(8, 1, generator=g) * 100 + 5
    full = head.margin_logits(cos, y, norms)
    parts = []
    for lo, hi in ((0, 4), (4, C)):
        local = torch.where((y >= lo) & (y < hi), y - lo, -1)
        kwargs = {"target_cos": cos[torch.arange(8), y]} if case == "curricularface" else {}
        parts.append(head.margin_logits(cos[:, lo:hi], local, norms, **kwargs))
    torch.testing.assert_close(torch.cat(parts, 1), full)


# ---------------------------------------------------------------- running statistics

def roundtrip(head, case):
    fresh = heads.build(CASES[case][0], D, C, **CASES[case][1])
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    return fresh.train()


def check_resume(head, case, x, y):
    fresh = roundtrip(head, case)
    torch.testing.assert_close(fresh(x, y).logits, head(x, y).logits)
    for (k, v), (_, u) in zip(head.state_dict().items(), fresh.state_dict().items()):
        torch.testing.assert_close(v, u, msg=k)


def caffe_lambdas(steps, base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0):
    """The lambda of training steps 1..steps as the Caffe MarginInnerProductLayer (and Face_Pytorch's
    SphereMarginProduct) compute it: the iteration counter is incremented first, then
    lambda = max(lambda_min, base * (1 + gamma * iter) ** -power)."""
    it, out = 0, []
    for _ in range(steps):
        it += 1
        out.append(max(lambda_min, base * (1.0 + gamma * it) ** -power))
    return out


def sphereface_target(x64, w64, y, m, lam):
    """float64 A-Softmax target logit ||x|| * (lam*cos + psi) / (1 + lam), from theta = arccos(cos)."""
    cos = F.normalize(x64) @ F.normalize(w64).T
    theta = torch.acos(cos[torch.arange(len(y)), y])
    k = torch.floor(m * theta / math.pi)
    psi = (-1.0) ** k * torch.cos(m * theta) - 2 * k
    return x64.norm(dim=1) * (lam * torch.cos(theta) + psi) / (1 + lam)


@pytest.mark.parametrize("schedule", [{}, {"base": 50.0, "gamma": 0.5, "power": 2.0, "lambda_min": 0.1}])
def test_sphereface_lambda_follows_the_caffe_schedule_and_resumes(schedule):
    head = heads.build("sphereface", D, C, m=3, **schedule).train()
    with torch.no_grad():
        head.weight.normal_()
    w64 = head.weight.detach().double()
    lams = caffe_lambdas(3, **schedule)
    if not schedule:
        assert lams[0] == pytest.approx(1000.0 / 1.12)  # 892.857..., the first step of the references
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(B, D, generator=g) * 20, torch.randint(0, C, (B,), generator=g)) for _ in range(3)]
    for step, (x, y) in enumerate(batches[:2], start=1):
        logits = head(x, y).logits
        assert int(head.iter) == step and head.lambda_ == pytest.approx(lams[step - 1], rel=1e-12)
        want = sphereface_target(x.double(), w64, y, 3, lams[step - 1])
        torch.testing.assert_close(logits[torch.arange(B), y].double(), want, rtol=1e-5, atol=1e-4)

    head.eval()
    x, y = batches[2]
    eval_logits = head(x, y).logits  # eval: uses lambda(2), the last training step's, and does not advance
    assert int(head.iter) == 2
    torch.testing.assert_close(eval_logits[torch.arange(B), y].double(),
                               sphereface_target(x.double(), w64, y, 3, lams[1]), rtol=1e-5, atol=1e-4)

    head.train()
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)
    buf.seek(0)
    fresh = heads.build("sphereface", D, C, m=3, **schedule).train()
    fresh.load_state_dict(torch.load(buf))
    want = sphereface_target(x.double(), w64, y, 3, lams[2])
    for h in (head, fresh):  # the resumed head takes step 3 exactly as the uninterrupted one
        torch.testing.assert_close(h(x, y).logits[torch.arange(B), y].double(), want, rtol=1e-5, atol=1e-4)
        assert int(h.iter) == 3


def test_sphereface_lambda_property_and_floor():
    head = heads.build("sphereface", D, C)
    assert head.lambda_ == 1000.0  # before any training step
    for it, lam in ((10, 1000.0 / 2.2), (1000, 1000.0 / 121.0), (10_000, 5.0), (10**7, 5.0)):
        head.iter.fill_(it)
        assert head.lambda_ == pytest.approx(lam)


def test_curricularface_t_updates_over_two_steps_and_resumes():
    head = make_head("curricularface").train()
    head.t.zero_()
    w64 = head.weight.detach().double()
    t = 0.0
    for step in range(2):
        x, y = make_batch(head, torch.float32, exact=False)
        x = x + step  # a different batch each step
        logits = head(x, y).logits
        cos = F.normalize(x.double()) @ F.normalize(w64).T
        t = 0.99 * t + 0.01 * cos[torch.arange(len(y)), y].mean().item()
        assert head.t.item() == pytest.approx(t, rel=1e-5)
        ref, _ = reference("curricularface", x.double(), w64, y, state={"t": t})
        torch.testing.assert_close(logits.double(), ref, rtol=1e-5, atol=1e-3)
    check_resume(head, "curricularface", x, y)


def test_adaface_batch_statistics_update_over_two_steps_and_resume():
    head = make_head("adaface").train()
    head.batch_mean.fill_(20.0)
    head.batch_std.fill_(100.0)
    w64 = head.weight.detach().double()
    mean, std = 20.0, 100.0
    for step in range(2):
        x, y = make_batch(head, torch.float32, exact=False)
        x = x * (1 + step)
        logits = head(x, y).logits
        a = x.double().norm(dim=1).clamp(0.001, 100)
        mean = 0.99 * mean + 0.01 * a.mean().item()
        std = 0.99 * std + 0.01 * a.std().item()
        assert head.batch_mean.item() == pytest.approx(mean, rel=1e-5)
        assert head.batch_std.item() == pytest.approx(std, rel=1e-5)
        ref, _ = reference("adaface", x.double(), w64, y, state={"batch_mean": mean, "batch_std": std})
        torch.testing.assert_close(logits.double(), ref, rtol=1e-5, atol=1e-3)
    check_resume(head, "adaface", x, y)


# ---------------------------------------------------------------- elastic margins

def test_elasticface_margins_are_seeded_normal_draws():
    n = 4000
    cos = torch.rand(n, 3) * 1.2 - 0.6
    y = torch.zeros(n, dtype=torch.long)
    ones = torch.ones(n, 1)
    m_cos = []
    for _ in range(2):
        head = heads.build("elasticface_cos", D, 3, generator=torch.Generator().manual_seed(7)).train()
        m_cos.append(cos[:, 0] - head.margin_logits(cos, y, ones)[:, 0] / S)
    torch.testing.assert_close(m_cos[0], m_cos[1])  # same seed, same margins
    assert abs(m_cos[0].mean().item() - 0.35) < 0.005
    assert abs(m_cos[0].std().item() - 0.05) < 0.005

    arc = heads.build("elasticface_arc", D, 3, m=0.35, generator=torch.Generator().manual_seed(7)).train()
    m_arc = torch.acos(arc.margin_logits(cos, y, ones)[:, 0].double() / S) - torch.acos(cos[:, 0].double())
    torch.testing.assert_close(m_arc.float(), m_cos[0], atol=1e-4, rtol=0)  # same draws, angular use
    arc.eval()
    m_eval = torch.acos(arc.margin_logits(cos, y, ones)[:, 0].double() / S) - torch.acos(cos[:, 0].double())
    torch.testing.assert_close(m_eval, torch.full_like(m_eval, 0.35), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- registry and presets

def test_registry_names_aliases_and_errors():
    expected = {"arcface", "cosface", "am_softmax", "sphereface", "a_softmax", "combined", "softmax", "norm_softmax",
                "curricularface", "adaface", "magface", "subcenter_arcface", "elasticface_arc", "elasticface_cos"}
    assert expected <= set(heads.names())
    assert type(heads.build("am_softmax", D, C)) is type(heads.build("cosface", D, C))
    assert type(heads.build("a_softmax", D, C)) is type(heads.build("sphereface", D, C))
    with pytest.raises(TypeError, match=r"head 'arcface'.*'margin'.*valid: s, m, easy_margin"):
        heads.build("arcface", D, C, margin=0.5)
    with pytest.raises(KeyError, match="did you mean 'arcface'"):
        heads.build("arcfce", D, C)
    assert heads.build("subcenter_arcface", D, C, K=3).weight.shape == (3 * C, D)


@pytest.mark.parametrize("preset,other", [("arcface", {}), ("cosface", {})])
def test_combined_presets_reproduce_their_heads(preset, other):
    combined = heads.build("combined", D, C, **heads.COMBINED_PRESETS[preset]).eval()
    single = heads.build(preset, D, C, **other).eval()
    single.load_state_dict(combined.state_dict())
    x, y = make_batch(single, torch.float32, exact=False)
    torch.testing.assert_close(combined(x, y).logits, single(x, y).logits, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- float64 end to end

# adaface: its norms are detached (official), so a finite difference through x sees what autograd does not
FLOAT64_CASES = ([(c, "cross_entropy", {}) for c in CASES if c != "adaface"]
                 + [(c, loss, p) for c in ("arcface", "magface_hard")
                    for loss, p in (("cross_entropy", {"label_smoothing": 0.1}), ("focal", {"gamma": 2.0}))])


@pytest.mark.parametrize("case,loss_name,loss_params", FLOAT64_CASES)
def test_float64_head_and_loss_give_a_float64_loss_that_gradchecks(case, loss_name, loss_params):
    head = make_head(case, torch.float64)
    criterion = losses.build(loss_name, **loss_params)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, D, generator=g, dtype=torch.float64)
    x = (x / x.norm(dim=1, keepdim=True) * torch.tensor([[20.0], [45.0], [70.0], [95.0]], dtype=torch.float64))
    y = torch.tensor([0, 3, 3, 9])
    w = head.weight.detach().clone()

    def f(x, w):
        out = torch.func.functional_call(head, {"weight": w}, (x, y))
        loss = criterion(out.logits, y)
        return loss if out.extra_loss is None else loss + out.extra_loss

    loss = f(x, w)
    assert loss.dtype == torch.float64 and loss.shape == ()
    assert torch.autograd.gradcheck(f, (x.requires_grad_(True), w.requires_grad_(True)), eps=1e-6, atol=1e-6,
                                    rtol=1e-5)


# ---------------------------------------------------------------- arcface_torch compatibility

def arcface_torch_reference(x, w, y, m, s=S):
    """float64 loss and (dL/dx, dL/dw) of arcface_torch's ArcFace + mean cross-entropy, by its definition:
    the target logit's value is s*cos(arccos(cos) + m) (no fallback past pi), and the gradient reaches
    the cosines as if every logit were s*cos (the margin is applied under no_grad). The gradient is
    built by hand: dL/dlogits = (softmax(values) - onehot)/B, pulled back through s*cos only."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    cos = ((x / x.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T).clamp(-1, 1)
    ct = cos.detach()[torch.arange(len(y)), y]
    values = S * with_target(cos.detach(), y, torch.cos(torch.acos(ct) + m))
    loss = F.cross_entropy(values, y)
    upstream = (torch.softmax(values, dim=1) - F.one_hot(y, cos.shape[1]).double()) / len(y)
    (s * cos * upstream).sum().backward()
    return loss, x.grad, w.grad, values


@pytest.mark.parametrize("name,params", [("arcface", {"m": 0.5}), ("arcface", {"m": 0.3}),
                                         ("combined", {"m1": 1.0, "m2": 0.5, "m3": 0.0})])
def test_arcface_torch_grad_mode_is_straight_through_without_fallback(name, params):
    head = heads.build(name, D, C, grad_mode="arcface_torch", **params).double().eval()
    with torch.no_grad():
        head.weight.normal_()
    x, y = make_batch(head, exact=False)  # row 0 here has theta + m > pi: no fallback in arcface_torch
    m = params.get("m", params.get("m2"))
    loss_ref, gx_ref, gw_ref, values = arcface_torch_reference(x, head.weight, y, m)
    assert (torch.acos(F.normalize(x) @ F.normalize(head.weight.detach()).T)[0, y[0]] + m > math.pi)
    x = x.clone().requires_grad_(True)
    logits = head(x, y).logits
    loss = F.cross_entropy(logits, y)
    loss.backward()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(logits.detach(), values, rtol=1e-9, atol=1e-7)
    torch.testing.assert_close(loss.detach(), loss_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, gx_ref, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, gw_ref, rtol=1e-7, atol=1e-12)
    # and it is not the exact gradient: the exact mode differs on the same batch
    exact = heads.build(name, D, C, **params).double().eval()
    exact.load_state_dict(head.state_dict())
    x2 = x.detach().clone().requires_grad_(True)
    F.cross_entropy(exact(x2, y).logits, y).backward()
    assert not torch.allclose(x2.grad, gx_ref, rtol=1e-3)


def test_arcface_torch_combined_cosface_is_the_plain_cosine_margin():
    combined = heads.build("combined", D, C, m1=1.0, m2=0.0, m3=0.35, grad_mode="arcface_torch").double().eval()
    cosface = heads.build("cosface", D, C, m=0.35).double().eval()
    cosface.load_state_dict(combined.state_dict())
    x, y = make_batch(combined)
    torch.testing.assert_close(combined(x, y).logits, cosface(x, y).logits)


@pytest.mark.parametrize("name,params,match", [
    ("combined", {"m1": 1.0, "m2": 0.3, "m3": 0.2}, "ignores m2"),
    ("combined", {"m1": 1.5, "m2": 0.2, "m3": 0.0}, "needs m1=1"),
    ("arcface", {"easy_margin": True}, "easy_margin"),
])
def test_arcface_torch_grad_mode_refuses_what_arcface_torch_does_not_compute(name, params, match):
    with pytest.raises(ValueError, match=match):
        heads.build(name, D, C, grad_mode="arcface_torch", **params)


# ---------------------------------------------------------------- parameter validation

@pytest.mark.parametrize("name,params,error,match", [
    ("arcface", {"m": 5.0}, ValueError, r"arcface: m must be a finite number in \[0, pi\) radians, got 5.0"),
    ("arcface", {"m": -0.1}, ValueError, "arcface: m "),
    ("arcface", {"m": float("nan")}, ValueError, "arcface: m "),
    ("arcface", {"s": 0.0}, ValueError, "arcface: s must be a finite number > 0"),
    ("arcface", {"s": -64.0}, ValueError, "arcface: s "),
    ("arcface", {"s": float("nan")}, ValueError, "arcface: s "),
    ("arcface", {"s": float("inf")}, ValueError, "arcface: s "),
    ("arcface", {"s": "64"}, TypeError, "arcface: s must be a number"),
    ("arcface", {"easy_margin": "false"}, TypeError, "arcface: easy_margin must be true or false"),
    ("arcface", {"grad_mode": "straight"}, ValueError, "arcface: grad_mode must be one of 'exact', 'arcface_torch'"),
    ("subcenter_arcface", {"m": 4.0}, ValueError, "subcenter_arcface: m "),
    ("subcenter_arcface", {"K": 0}, ValueError, "subcenter_arcface: K "),
    ("subcenter_arcface", {"K": 2.5}, TypeError, "subcenter_arcface: K "),
    ("cosface", {"m": 5.0}, ValueError, r"cosface: m must be a finite number in \[0, 2\)"),
    ("cosface", {"m": -0.2}, ValueError, "cosface: m "),
    ("cosface", {"s": float("inf")}, ValueError, "cosface: s "),
    ("norm_softmax", {"s": 0}, ValueError, "norm_softmax: s "),
    ("softmax", {"bias": "yes"}, TypeError, "softmax: bias"),
    ("combined", {"m2": 5.0}, ValueError, "combined: m2 "),
    ("combined", {"m3": 3.0}, ValueError, "combined: m3 "),
    ("combined", {"m1": 0.0}, ValueError, "combined: m1 "),
    ("combined", {"m1": 1e6}, ValueError, "combined: m1 "),
    ("sphereface", {"m": 1000}, ValueError, "sphereface: m must be an integer in"),
    ("sphereface", {"m": 2.5}, TypeError, "sphereface: m "),
    ("sphereface", {"base": float("inf")}, ValueError, "sphereface: base "),
    ("sphereface", {"gamma": -1.0}, ValueError, "sphereface: gamma "),
    ("sphereface", {"lambda_min": float("nan")}, ValueError, "sphereface: lambda_min "),
    ("curricularface", {"m": 5.0}, ValueError, "curricularface: m "),
    ("curricularface", {"momentum": 1.5}, ValueError, "curricularface: momentum "),
    ("adaface", {"m": 5.0}, ValueError, "adaface: m "),
    ("adaface", {"h": float("nan")}, ValueError, "adaface: h "),
    ("adaface", {"t_alpha": 2.0}, ValueError, "adaface: t_alpha "),
    ("magface", {"u_m": 5.0}, ValueError, "magface: u_m "),
    ("magface", {"l_m": 0.9}, ValueError, "magface: u_m "),
    ("magface", {"u_a": 5.0}, ValueError, "magface: u_a "),
    ("magface", {"lambda_g": float("inf")}, ValueError, "magface: lambda_g "),
    ("magface", {"easy_margin": 1}, TypeError, "magface: easy_margin"),
    ("elasticface_arc", {"m": 5.0}, ValueError, "elasticface_arc: m "),
    ("elasticface_arc", {"sigma": -0.1}, ValueError, "elasticface_arc: sigma "),
    ("elasticface_cos", {"m": 5.0}, ValueError, "elasticface_cos: m "),
])
def test_out_of_range_parameters_raise_one_clear_error(name, params, error, match):
    with pytest.raises(error, match=match) as info:
        heads.build(name, D, C, **params)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("embedding_size,num_classes,error,match", [
    (0, C, ValueError, r"embedding_size must be an integer in \[1, 65536\], got 0"),
    (10**9, C, ValueError, "embedding_size must be an integer in"),
    (D, 0, ValueError, "num_classes must be an integer in"),
    (D, -5, ValueError, "num_classes "),
    (D, 10**12, ValueError, r"num_classes must be an integer in \[1, 100000000\]"),
    (D, 10.0, TypeError, "num_classes "),
])
def test_sizes_are_checked_before_the_centres_are_allocated(embedding_size, num_classes, error, match):
    # 10**12 classes x 16 would be 64 TB: a ValueError (not a RuntimeError from the allocator) shows the order
    with pytest.raises(error, match=match):
        heads.build("arcface", embedding_size, num_classes)
