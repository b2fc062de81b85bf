"""Partial FC against the dense head + loss of one process on the whole batch, in float64.

The reference is ``heads.build(...)`` (checked against the papers' formulas in
test_heads.py) on the global batch, with ``F.cross_entropy`` / the focal formula written
here. Two-rank checks run once in two spawned gloo processes (``two_ranks`` fixture,
tests/distributed.py) and are asserted in the parent. What is asserted at W = 2 (the
module's gradient convention): every rank's loss equals the dense loss; rank r's centre
gradient equals the dense centre gradient's rows of r's classes; rank r's local embedding
gradient equals W x the dense embedding gradient of r's rows (DDP then averages over ranks).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import heads
import losses
from heads.base import centre_rows, deferred_centres
from heads.partial_fc import PartialFC, shard_range
from tests.distributed import RankError, run_ranks

D, C, B, W = 8, 11, 6, 2  # embedding size, classes (uneven shards at W = 2: 6 + 5), local batch, ranks
TOL = dict(rtol=1e-9, atol=1e-11)

# case -> (head name, build params, buffer values set before the step)
CASES = {
    "arcface": ("arcface", {}, {}),
    "cosface": ("cosface", {}, {}),
    "combined": ("combined", heads.COMBINED_PRESETS["combined"], {}),
    "sphereface": ("sphereface", {"m": 3}, {"iter": 10}),
    "curricularface": ("curricularface", {}, {"t": 0.4}),
    "adaface": ("adaface", {}, {"batch_mean": 15.0, "batch_std": 8.0}),
    "magface": ("magface", {}, {}),
    "subcenter_arcface": ("subcenter_arcface", {"K": 3}, {}),
    "elasticface_arc": ("elasticface_arc", {}, {}),
    "norm_softmax": ("norm_softmax", {}, {}),
    "softmax_no_bias": ("softmax", {"bias": False}, {}),
}
TWO_RANK_CASES = ["arcface", "cosface", "combined", "curricularface", "magface", "sphereface", "adaface",
                  "subcenter_arcface"]
BUFFERS = {"sphereface": "iter", "curricularface": "t", "adaface": "batch_mean"}


def make_head(case: str, seed: int = 0) -> heads.MarginHead:
    """The case's head in float64, train mode, centres N(0, 1) from ``seed``, buffers set."""
    name, params, state = CASES[case]
    if name.startswith("elasticface"):
        params = dict(params, generator=torch.Generator().manual_seed(5))
    head = heads.build(name, D, C, **params).double().train()
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(seed),
                                      dtype=torch.float64))
        for key, value in state.items():
            getattr(head, key).fill_(value)
    return head


def make_batch(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, D) float64 embeddings with norms 5..120 (inside and outside MagFace's [10, 110]), labels
    over a subset of the classes (class 3 and the last class never appear)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    norms = torch.linspace(5, 120, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    x = x / x.norm(dim=1, keepdim=True) * norms[:, None]
    present = torch.tensor([c for c in range(C - 1) if c != 3])
    return x, present[torch.randint(0, len(present), (n,), generator=g)]


def dense(case: str, x: torch.Tensor, y: torch.Tensor, seed: int = 0):
    """(loss, embedding grad, centre grad, head) of the dense head + float64 cross-entropy."""
    head = make_head(case, seed)
    x = x.clone().requires_grad_(True)
    logits, extra = head(x, y)
    loss = F.cross_entropy(logits, y) + (0 if extra is None else extra)
    loss.backward()
    return loss.detach(), x.grad, head.weight.grad, head


def partial(case: str, sample_rate: float = 1.0, criterion: str = "cross_entropy", seed: int = 0,
            rank: int = 0, world_size: int = 1, **loss_params) -> PartialFC:
    return PartialFC(make_head(case, seed), losses.build(criterion, **loss_params), sample_rate=sample_rate,
                     rank=rank, world_size=world_size, seed=7).train()


def run_partial(pfc: PartialFC, x: torch.Tensor, y: torch.Tensor):
    x = x.clone().requires_grad_(True)
    loss = pfc(x, y)
    loss.backward()
    return loss.detach(), x.grad, pfc.weight.grad


# ---------------------------------------------------------------- sharding


@pytest.mark.parametrize("classes,world", [(11, 2), (10, 4), (7, 7), (1000, 3), (5, 1)])
def test_shard_range_covers_all_classes_with_sizes_within_one(classes, world):
    ranges = [shard_range(classes, r, world) for r in range(world)]
    assert [c for start, end in ranges for c in range(start, end)] == list(range(classes))
    sizes = [end - start for start, end in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_range_rejects_fewer_classes_than_ranks():
    with pytest.raises(ValueError, match=r"num_classes \(3\) must be >= world_size \(4\)"):
        shard_range(3, 0, 4)


# ---------------------------------------------------------------- one rank, full softmax


@pytest.mark.parametrize("case", CASES)
def test_single_rank_full_rate_matches_dense_loss_and_grads(case):
    x, y = make_batch(2 * B)
    want_loss, want_x, want_w, _ = dense(case, x, y)
    loss, grad_x, grad_w = run_partial(partial(case), x, y)
    torch.testing.assert_close(loss, want_loss, **TOL)
    torch.testing.assert_close(grad_x, want_x, **TOL)
    torch.testing.assert_close(grad_w, want_w, **TOL)


@pytest.mark.parametrize("case", BUFFERS)
def test_single_rank_head_buffers_follow_dense(case):
    x, y = make_batch(2 * B)
    *_, head = dense(case, x, y)
    pfc = partial(case)
    run_partial(pfc, x, y)
    torch.testing.assert_close(getattr(pfc.head, BUFFERS[case]), getattr(head, BUFFERS[case]), **TOL)


@pytest.mark.parametrize("eps", [0.1, 0.4])
def test_label_smoothing_matches_dense_cross_entropy(eps):
    x, y = make_batch(2 * B)
    head = make_head("arcface")
    xr = x.clone().requires_grad_(True)
    want = F.cross_entropy(head(xr, y).logits, y, label_smoothing=eps)
    want.backward()
    loss, grad_x, _ = run_partial(partial("arcface", label_smoothing=eps), x, y)
    torch.testing.assert_close(loss, want.detach(), **TOL)
    torch.testing.assert_close(grad_x, xr.grad, **TOL)


@pytest.mark.parametrize("reduction", ["mean", "batch"])
def test_focal_matches_dense_focal_formula(reduction):
    x, y = make_batch(2 * B)
    head = make_head("cosface")
    xr = x.clone().requires_grad_(True)
    ce = F.cross_entropy(head(xr, y).logits, y, reduction="none")
    if reduction == "batch":
        ce = ce.mean()
    want = ((1 - torch.exp(-ce)) ** 2.0 * ce).mean()
    want.backward()
    loss, grad_x, _ = run_partial(partial("cosface", criterion="focal", gamma=2.0, reduction=reduction), x, y)
    torch.testing.assert_close(loss, want.detach(), **TOL)
    torch.testing.assert_close(grad_x, xr.grad, **TOL)


# ---------------------------------------------------------------- negative sampling


def positives_of(y: torch.Tensor) -> set[int]:
    return set(y.tolist())


def test_sampling_keeps_every_positive_and_the_requested_count():
    pfc = partial("arcface", sample_rate=0.3)
    for step in range(4):
        x, y = make_batch(3 if step < 2 else 2 * B, seed=10 + step)
        loss = pfc(x, y)
        sampled = set(pfc.sampled.tolist())
        assert positives_of(y) <= sampled
        assert len(sampled) == max(math.ceil(0.3 * C), len(positives_of(y)))
        assert torch.isfinite(loss)
    assert int(pfc.counter) == 4


def test_sampled_loss_is_dense_softmax_over_the_sampled_classes():
    x, y = make_batch(3, seed=4)
    pfc = partial("arcface", sample_rate=0.5)
    loss, grad_x, grad_w = run_partial(pfc, x, y)
    keep = pfc.sampled
    head = make_head("arcface")
    xr = x.clone().requires_grad_(True)
    logits = head(xr, y).logits[:, keep]
    want = F.cross_entropy(logits, torch.searchsorted(keep, y))
    want.backward()
    torch.testing.assert_close(loss, want.detach(), **TOL)
    torch.testing.assert_close(grad_x, xr.grad, **TOL)
    torch.testing.assert_close(grad_w, head.weight.grad, **TOL)  # zero rows for the classes left out
    assert (grad_w[[c for c in range(C) if c not in keep]] == 0).all()


def test_sampling_is_deterministic_given_seed_and_counter_and_resumes():
    batches = [make_batch(3, seed=20 + i) for i in range(3)]
    runs = [[], []]
    for run in runs:
        pfc = partial("arcface", sample_rate=0.3)
        for x, y in batches:
            pfc(x, y)
            run.append(pfc.sampled.tolist())
    assert runs[0] == runs[1]
    assert len({tuple(s) for s in runs[0]}) > 1  # the draw changes from step to step
    resumed = partial("arcface", sample_rate=0.3)
    first = partial("arcface", sample_rate=0.3)
    first(*batches[0])
    resumed.load_state_dict(first.state_dict())
    resumed(*batches[1])
    assert resumed.sampled.tolist() == runs[0][1]


def test_eval_mode_uses_every_class():
    x, y = make_batch(3)
    pfc = partial("arcface", sample_rate=0.2).eval()
    want, *_ = dense("arcface", x, y)
    torch.testing.assert_close(pfc(x, y), want, **TOL)
    assert pfc.sampled is None and int(pfc.counter) == 0


# ---------------------------------------------------------------- ownership and errors


def test_owns_the_centres_and_the_head_keeps_none():
    full = make_head("subcenter_arcface").weight.detach()
    pfc = partial("subcenter_arcface")
    assert [name for name, _ in pfc.named_parameters()] == ["weight"]
    assert pfc.head.weight is None and "head.weight" not in pfc.state_dict()
    torch.testing.assert_close(pfc.weight.detach(), full, rtol=0, atol=0)


class NoSampleCE(torch.nn.Module):
    def forward(self, logits, labels):
        return F.cross_entropy(logits, labels)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(criterion=NoSampleCE()), TypeError, "NoSampleCE has no from_sample_ce"),
    (dict(sample_rate=0.0), ValueError, r"sample_rate must be in \(0, 1\], got 0.0"),
    (dict(sample_rate=1.5), ValueError, r"sample_rate must be in \(0, 1\], got 1.5"),
    (dict(head="softmax"), ValueError, r"parameters besides weight \(bias\)"),
    (dict(world_size=2), RuntimeError, "world_size=2 needs an initialised process group"),
])
def test_construction_errors_name_the_problem(kwargs, error, match):
    head = heads.build(kwargs.pop("head", "arcface"), D, C)
    criterion = kwargs.pop("criterion", losses.build("cross_entropy"))
    with pytest.raises(error, match=match):
        PartialFC(head, criterion, **kwargs)


def test_out_of_range_labels_are_refused():
    x, y = make_batch(3)
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {C}\), got 0..{C}"):
        partial("arcface")(x, torch.tensor([0, 1, C]))


def test_full_weight_round_trip_on_one_rank():
    pfc = partial("arcface")
    full = torch.randn(C, D, dtype=torch.float64)
    pfc.load_full_weight(full)
    torch.testing.assert_close(pfc.full_weight_state(), full, rtol=0, atol=0)


# ---------------------------------------------------------------- two ranks (one spawn)


def _two_rank_checks(rank: int, world_size: int, x: torch.Tensor, y: torch.Tensor, sampled_batches: list,
                     full: torch.Tensor, next_batch: tuple) -> dict:
    """Everything the two-rank tests assert, computed on one rank (run by ``two_ranks``)."""
    initialised_at_entry = dist.is_initialized()
    dist.init_process_group("gloo")  # env:// from the variables run_ranks set (init_group=False), as the trainer will
    rows = slice(rank * B, (rank + 1) * B)
    out: dict = {"env": {k: os.environ[k] for k in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")},
                 "group": (initialised_at_entry, dist.get_rank(), dist.get_world_size())}
    for case in TWO_RANK_CASES:
        pfc = partial(case, rank=rank, world_size=world_size)
        loss, grad_x, grad_w = run_partial(pfc, x[rows], y[rows])
        buffer = getattr(pfc.head, BUFFERS[case]).clone() if case in BUFFERS else None
        out[case] = dict(loss=loss, grad_x=grad_x, grad_w=grad_w, range=(pfc.start, pfc.end), buffer=buffer)

    pfc = partial("arcface", sample_rate=0.3, rank=rank, world_size=world_size)
    out["sampled"] = []
    for xb, yb in sampled_batches:
        n = len(yb) // world_size
        loss, grad_x, grad_w = run_partial(pfc, xb[rank * n:(rank + 1) * n], yb[rank * n:(rank + 1) * n])
        out["sampled"].append(dict(loss=loss, classes=pfc.sampled.clone(), finite=bool(
            torch.isfinite(grad_x).all() and torch.isfinite(grad_w).all())))

    pfc = partial("arcface", rank=rank, world_size=world_size)
    out["init_full"], out["init_full_dst0"] = pfc.full_weight_state(), pfc.full_weight_state(dst=0)
    _, _, grad_w = run_partial(pfc, x[rows], y[rows])
    with torch.no_grad():
        pfc.weight -= 0.5 * grad_w  # one SGD step on the shard
    out["stepped_full"] = pfc.full_weight_state()
    out["next_loss"] = pfc(next_batch[0][rows], next_batch[1][rows]).detach()

    pfc.load_full_weight(full)
    out["loaded_shard"] = pfc.weight.detach().clone()
    out["gathered"] = pfc.gather_rows(pfc.shard_rows(full * 2))
    torch.manual_seed(11)
    with deferred_centres():  # as train.py builds it: this rank draws its own rows only
        deferred = PartialFC(heads.build("subcenter_arcface", D, C, K=3), losses.build("cross_entropy"),
                             rank=rank, world_size=world_size)
    out["deferred_shard"] = deferred.weight.detach().clone()
    host = dist.new_group(backend="gloo")  # as checkpoints gather: a separate CPU group, result on rank 1 only
    out["gathered_host"] = pfc.gather_rows(pfc.shard_rows(full * 3), dst=1, group=host)
    fresh = partial("arcface", rank=rank, world_size=world_size)
    fresh.load_state_dict({"weight": full, "counter": torch.tensor(3)})
    out["state_dict_shard"] = fresh.weight.detach().clone()
    return out


@pytest.fixture(scope="module")
def two_ranks():
    x, y = make_batch(W * B)
    sampled = [make_batch(W * n, seed=30 + n) for n in (1, 2, B)]
    full = torch.randn(C, D, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    next_batch = make_batch(W * B, seed=40)
    results = run_ranks(_two_rank_checks, W, x, y, sampled, full, next_batch, init_group=False, timeout=120)
    return dict(x=x, y=y, sampled=sampled, full=full, next_batch=next_batch, ranks=results)


def test_harness_sets_torchrun_environment(two_ranks):
    for rank, out in enumerate(two_ranks["ranks"]):
        assert out["env"] == dict(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(W), LOCAL_RANK=str(rank))


def test_harness_without_group_lets_the_code_init_from_env(two_ranks):
    for rank, out in enumerate(two_ranks["ranks"]):
        assert out["group"] == (False, rank, W)


@pytest.mark.parametrize("case", TWO_RANK_CASES)
def test_two_ranks_loss_equals_dense(case, two_ranks):
    want, *_ = dense(case, two_ranks["x"], two_ranks["y"])
    for out in two_ranks["ranks"]:
        torch.testing.assert_close(out[case]["loss"], want, **TOL)


@pytest.mark.parametrize("case", TWO_RANK_CASES)
def test_two_ranks_centre_grads_are_the_dense_rows_of_each_shard(case, two_ranks):
    *_, want_w, head = dense(case, two_ranks["x"], two_ranks["y"])
    k = head.rows_per_class
    for rank, out in enumerate(two_ranks["ranks"]):
        start, end = out[case]["range"]
        assert (start, end) == shard_range(C, rank, W)
        torch.testing.assert_close(out[case]["grad_w"], want_w[start * k:end * k], **TOL)


@pytest.mark.parametrize("case", TWO_RANK_CASES)
def test_two_ranks_embedding_grads_are_world_size_times_dense(case, two_ranks):
    _, want_x, *_ = dense(case, two_ranks["x"], two_ranks["y"])
    for rank, out in enumerate(two_ranks["ranks"]):
        torch.testing.assert_close(out[case]["grad_x"], W * want_x[rank * B:(rank + 1) * B], **TOL)


@pytest.mark.parametrize("case", BUFFERS)
def test_two_ranks_head_buffers_equal_dense_on_every_rank(case, two_ranks):
    *_, head = dense(case, two_ranks["x"], two_ranks["y"])
    for out in two_ranks["ranks"]:
        torch.testing.assert_close(out[case]["buffer"], getattr(head, BUFFERS[case]), **TOL)


def test_two_ranks_sampling_keeps_positives_with_finite_loss_and_grads(two_ranks):
    for step, (_, y) in enumerate(two_ranks["sampled"]):
        for rank, out in enumerate(two_ranks["ranks"]):
            start, end = shard_range(C, rank, W)
            got = out["sampled"][step]
            positives = {c for c in y.tolist() if start <= c < end}
            classes = set(got["classes"].tolist())
            assert positives <= classes <= set(range(start, end))
            assert len(classes) == max(math.ceil(0.3 * (end - start)), len(positives))
            assert torch.isfinite(got["loss"]) and got["finite"]
        torch.testing.assert_close(two_ranks["ranks"][0]["sampled"][step]["loss"],
                                   two_ranks["ranks"][1]["sampled"][step]["loss"], **TOL)


def test_two_ranks_gather_the_full_initial_matrix(two_ranks):
    want = make_head("arcface").weight.detach()
    for rank, out in enumerate(two_ranks["ranks"]):
        torch.testing.assert_close(out["init_full"], want, rtol=0, atol=0)
        if rank == 0:
            torch.testing.assert_close(out["init_full_dst0"], want, rtol=0, atol=0)
        else:
            assert out["init_full_dst0"] is None


def test_checkpoint_saved_on_two_ranks_resumes_on_one(two_ranks):
    full = two_ranks["ranks"][0]["stepped_full"]
    torch.testing.assert_close(two_ranks["ranks"][1]["stepped_full"], full, rtol=0, atol=0)
    pfc = partial("arcface")
    pfc.load_full_weight(full)
    torch.testing.assert_close(pfc.weight.detach(), full, rtol=0, atol=0)
    x, y = two_ranks["next_batch"]
    torch.testing.assert_close(pfc(x, y).detach(), two_ranks["ranks"][0]["next_loss"], **TOL)


def test_full_matrix_from_one_rank_loads_into_two_and_gathers_back(two_ranks):
    full = two_ranks["full"]
    for rank, out in enumerate(two_ranks["ranks"]):
        start, end = shard_range(C, rank, W)
        torch.testing.assert_close(out["loaded_shard"], full[start:end], rtol=0, atol=0)
        torch.testing.assert_close(out["state_dict_shard"], full[start:end], rtol=0, atol=0)
        torch.testing.assert_close(out["gathered"], full * 2, rtol=0, atol=0)


# ---------------------------------------------------------------- the harness itself


def _fail_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("deliberate failure on rank one")
    return rank


def test_run_ranks_reraises_a_rank_failure_with_its_traceback():
    with pytest.raises(RankError, match=r"(?s)rank 1 of 2 failed.*Traceback.*deliberate failure on rank one"):
        run_ranks(_fail_on_rank_one, 2, init_group=False, timeout=60)


def test_gather_over_a_separate_cpu_group_reaches_only_dst(two_ranks):
    out0, out1 = two_ranks["ranks"]
    assert out0["gathered_host"] is None
    torch.testing.assert_close(out1["gathered_host"], two_ranks["full"] * 3, rtol=0, atol=0)
    assert out1["gathered_host"].device.type == "cpu"


# ---------------------------------------------------------------- centres drawn per shard


def test_centre_rows_of_any_range_are_those_of_the_full_draw():
    full = centre_rows(0, 2500, 16, seed=3)
    for a, b in [(0, 1), (1023, 1025), (1024, 2048), (17, 2500), (2499, 2500), (5, 5)]:
        torch.testing.assert_close(centre_rows(a, b, 16, seed=3), full[a:b], rtol=0, atol=0)
    assert not torch.equal(centre_rows(0, 10, 16, seed=4), full[:10])
    assert abs(float(full.std()) - 0.01) < 5e-4 and abs(float(full.mean())) < 5e-4


@pytest.mark.parametrize("case", ["arcface", "subcenter_arcface", "curricularface", "adaface"])
def test_deferred_head_draws_no_centres_and_partial_fc_gets_the_dense_rows(case):
    name, params, _ = CASES[case]
    torch.manual_seed(5)
    dense_head = heads.build(name, D, C, **params)
    torch.manual_seed(5)
    with deferred_centres():
        head = heads.build(name, D, C, **params)
    assert head.weight.is_meta
    assert all(not b.is_meta for b in head.buffers())  # buffers are real: only the centres wait
    pfc = PartialFC(head, losses.build("cross_entropy"))
    torch.testing.assert_close(pfc.weight.detach(), dense_head.weight.detach(), rtol=0, atol=0)
    assert not heads.build(name, D, C, **params).weight.is_meta  # the context ended


def test_deferred_shards_on_two_ranks_are_the_dense_rows(two_ranks):
    torch.manual_seed(11)
    full = heads.build("subcenter_arcface", D, C, K=3).weight.detach()
    for rank, out in enumerate(two_ranks["ranks"]):
        start, end = shard_range(C, rank, W)
        torch.testing.assert_close(out["deferred_shard"], full[start * 3:end * 3], rtol=0, atol=0)
