"""Training on several processes (gloo, CPU) is training on one with the global batch.

Each multi-process check runs the real code path: engine.distributed.init from torchrun's
environment (set by tests/distributed.py), DDP around the backbone, per-rank data shards,
rank-0 checkpoints. The backbone has no BatchNorm (NoBNNet), so equal global batches must give
equal weights up to float summation order.
"""

import os
import signal
import subprocess
import sys

import pytest
import torch

import heads
import losses
from config import build_config
from data.dataset import build_dataset
from engine import distributed as dist_utils
from engine.checkpoint import load_training_checkpoint
from engine.objective import DenseLoss
from engine.trainer import Trainer
from heads.partial_fc import PartialFC
from tests.distributed import run_ranks
from tests.small_nets import NoBNNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 2e-5


def make_trainer(pack, out, partial_fc=False, world_size=1, rank=0, timeout_minutes=2.0, **over):
    """A trainer as train.py wires it, on NoBNNet; same seed -> same initial weights everywhere."""
    cfg = build_config(overrides=dict(dict(batch_size=8, lr=0.2, epochs=4, num_workers=0, progress=False,
                                           log_every=1, seed=3, eval_every=-1, save_every=-1, grad_clip=0.0,
                                           channels_last=False, weight_decay=5e-4, output=str(out)), **over))
    info, device = dist_utils.init("cpu", timeout_minutes)
    assert (info.rank, info.world_size) == (rank, world_size)
    torch.manual_seed(0)
    ds = build_dataset(pack)
    model = NoBNNet(32)
    head = heads.build("arcface", 32, ds.num_classes, s=16.0, m=0.3)
    criterion = losses.build("cross_entropy")
    objective = (PartialFC(head, criterion, rank=info.rank, world_size=info.world_size, seed=cfg.seed)
                 if partial_fc else DenseLoss(head, criterion))
    return Trainer(cfg, model, objective, ds, device, dist_info=info), cfg


def weights(tr):
    return {k: v.detach().clone() for k, v in tr.model.state_dict().items()}


def assert_same(a, b):
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def _ddp_steps(rank, world_size, pack, out, batch, steps, partial_fc):
    tr, _ = make_trainer(pack, out, partial_fc, world_size, rank, batch_size=batch, max_steps=steps)
    tr.fit()
    return weights(tr), tr.history["loss"]


@pytest.mark.parametrize("partial_fc", [False, True], ids=["dense", "partial_fc"])
def test_two_ranks_equal_one_process_with_twice_the_batch(tiny_pack, tmp_path, partial_fc):
    (w2, loss2), _ = run_ranks(_ddp_steps, 2, tiny_pack, str(tmp_path / "ddp"), 6, 3, partial_fc, init_group=False)
    tr, _ = make_trainer(tiny_pack, tmp_path / "one", partial_fc, batch_size=12, max_steps=3)
    tr.fit()
    assert_same(w2, weights(tr))
    torch.testing.assert_close(torch.tensor(loss2), torch.tensor(tr.history["loss"]), atol=1e-5, rtol=1e-5)


def test_accumulating_two_micro_batches_equals_one_double_batch(tiny_pack, tmp_path):
    acc, _ = make_trainer(tiny_pack, tmp_path / "acc", batch_size=6, grad_accum=2, max_steps=3)
    acc.fit()
    one, _ = make_trainer(tiny_pack, tmp_path / "one", batch_size=12, max_steps=3)
    one.fit()
    assert acc.total_steps == one.total_steps and acc.steps_per_epoch == one.steps_per_epoch
    assert_same(weights(acc), weights(one))
    assert acc.optimizer.param_groups[0]["lr"] == one.optimizer.param_groups[0]["lr"]


def _save_at(rank, world_size, pack, out, batch, stop_at):
    tr, _ = make_trainer(pack, out, True, world_size, rank, batch_size=batch, max_steps=3)
    tr.fit(stop_at=stop_at)


def _resume_then_step(rank, world_size, pack, out, batch):
    tr, _ = make_trainer(pack, out, True, world_size, rank, batch_size=batch, max_steps=3)
    tr.load_state_dict(load_training_checkpoint(out))
    tr.fit()
    return tr.history["loss"][-1], weights(tr)


def test_checkpoints_move_between_world_sizes(tiny_pack, tmp_path):
    """Partial FC centres saved by 2 ranks resume in 1 process, and the other way round."""
    ref, _ = make_trainer(tiny_pack, tmp_path / "ref", True, batch_size=12, max_steps=3)
    ref.fit()
    run_ranks(_save_at, 2, tiny_pack, str(tmp_path / "two"), 6, 2, init_group=False)
    loss, w = _resume_then_step(0, 1, tiny_pack, str(tmp_path / "two"), 12)
    assert abs(loss - ref.history["loss"][-1]) < 1e-5
    assert_same(w, weights(ref))

    _save_at(0, 1, tiny_pack, str(tmp_path / "one"), 12, 2)
    (loss2, w2), _ = run_ranks(_resume_then_step, 2, tiny_pack, str(tmp_path / "one"), 6, init_group=False)
    assert abs(loss2 - ref.history["loss"][-1]) < 1e-5
    assert_same(w2, weights(ref))


def _sigterm_at_step_2(rank, world_size, pack, out):
    tr, _ = make_trainer(pack, out, True, world_size, rank, batch_size=6, max_steps=5)
    step = tr.train_step

    def train_step(micro):  # the scheduler's SIGTERM reaches rank 1 during step 2
        if tr.step == 1 and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(micro)

    tr.train_step = train_step
    return tr.fit(), tr.step


def test_sigterm_stops_every_rank_with_a_checkpoint_that_resumes_exactly(tiny_pack, tmp_path):
    results = run_ranks(_sigterm_at_step_2, 2, tiny_pack, str(tmp_path / "run"), init_group=False)
    assert results == [(signal.SIGTERM, 2), (signal.SIGTERM, 2)]
    assert load_training_checkpoint(str(tmp_path / "run"))["step"] == 2
    resumed, _ = make_trainer(tiny_pack, tmp_path / "run", True, batch_size=12, max_steps=5)
    resumed.load_state_dict(load_training_checkpoint(str(tmp_path / "run")))
    resumed.fit()
    straight, _ = make_trainer(tiny_pack, tmp_path / "straight", True, batch_size=12, max_steps=5)
    straight.fit()
    assert_same(weights(resumed), weights(straight))


def _slow_evaluation(rank, world_size, pack, out):
    import time

    calls = []

    def evaluator(model):  # a long evaluation on rank 0: the other rank must wait, not time out or run ahead
        calls.append(rank)
        time.sleep(3)
        return {"mean_accuracy": 0.5 + 0.1 * len(calls), "results": {}}

    # the process group's timeout (1.5 s) is shorter than the evaluation (3 s)
    tr, _ = make_trainer(pack, out, False, world_size, rank, 0.025, batch_size=6, max_steps=2, eval_every=1)
    tr.evaluator = evaluator if rank == 0 else None  # as train.py builds it: on rank 0 only
    tr.fit()
    return calls, tr.step


def test_rank0_evaluates_while_the_others_wait(tiny_pack, tmp_path):
    results = run_ranks(_slow_evaluation, 2, tiny_pack, str(tmp_path / "run"), init_group=False)
    assert results == [([0, 0], 2), ([], 2)]
    assert os.path.isfile(tmp_path / "run" / "verification.json")


def test_torchrun_cli_two_processes(tiny_pack, tmp_path):
    """The documented command: torchrun starts train.py twice; rank 0 writes the run."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), "--data", tiny_pack, "--output", str(out), "--backbone", "mobilefacenet",
           "--batch-size", "6", "--max-steps", "2", "--num-workers", "0", "--no-progress", "--device", "cpu",
           "--partial-fc", "--eval-every", "-1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (out / "train.log").read_text()
    assert "batch 6 per process x 2 process(es) = 12 images/step" in log
    assert load_training_checkpoint(str(out))["world_size"] == 2
