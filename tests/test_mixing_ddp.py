"""Weighted sampling across sources (--data a,b --data-weights) on several processes is the same
training as on one process with the global batch: each rank takes its share of one weighted global
stream (gloo, CPU; NoBNNet so equal global batches give equal weights up to summation order)."""

import os

import pytest
import torch

from tests.distributed import run_ranks
from tests.test_ddp import assert_same, make_trainer, weights

WEIGHTS = (0.3, 0.7)


@pytest.fixture(scope="module")
def other_pack(tmp_path_factory):
    from prepare.synth import generate_dataset

    out = tmp_path_factory.mktemp("other_pack")
    generate_dataset(str(out), identities=3, images_per_id=4, pairs=0.001, seed=9, progress=False)
    return str(out)


def _mixed_steps(rank, world_size, data, out, batch, steps):
    os.makedirs(out, exist_ok=True)  # train.py makes the run folder before the trainer logs the mix into it
    tr, _ = make_trainer(data, out, False, world_size, rank, batch_size=batch, max_steps=steps, data_weights=WEIGHTS)
    tr.fit()
    return weights(tr), tr.history["loss"], tr.sampler.batches_per_epoch()


def test_two_ranks_with_data_weights_equal_one_process_with_twice_the_batch(tiny_pack, other_pack, tmp_path):
    data = f"{tiny_pack},{other_pack}"
    (w2, loss2, per_rank), _ = run_ranks(_mixed_steps, 2, data, str(tmp_path / "ddp"), 6, 5, init_group=False)
    w1, loss1, single = _mixed_steps(0, 1, data, str(tmp_path / "one"), 12, 5)
    assert per_rank == single  # the same number of global steps per epoch at both world sizes
    assert len(loss2) == len(loss1) == 5
    assert_same(w2, w1)
    torch.testing.assert_close(torch.tensor(loss2), torch.tensor(loss1), atol=1e-5, rtol=1e-5)
