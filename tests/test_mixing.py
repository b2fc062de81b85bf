"""Weighted sampling across several data sources (data/mixing.py, --data-weights)."""

import json
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch

import heads
import losses
import train
from config import build_config
from data.dataset import FaceDataset, ResumableBatchSampler, build_dataset
from data.mixing import WeightedBatchSampler, build_sampler, normalise, quotas
from engine.checkpoint import load_training_checkpoint
from engine.objective import DenseLoss
from engine.trainer import Trainer
from tests.cli_helpers import script_error
from tests.small_nets import SmallNet


def flat(sampler, epoch, start=0):
    sampler.set_epoch(epoch, start)
    return [i for batch in sampler for i in batch]


def source_of(index, sizes):
    return int(np.searchsorted(np.cumsum(sizes), index, side="right"))


def test_without_weights_the_batches_are_todays():
    for world in (1, 2):
        for rank in range(world):
            new = build_sampler([40, 25, 35], 6, seed=7, rank=rank, world_size=world)
            old = ResumableBatchSampler(100, 6, seed=7, rank=rank, world_size=world)
            for epoch in (0, 3):
                new.set_epoch(epoch, 1)
                old.set_epoch(epoch, 1)
                assert list(new) == list(old)


def test_quotas_by_largest_remainder():
    # 13 * (0.7, 0.3) = (9.1, 3.9): floors (9, 3), the one left over to the larger fraction 0.9
    assert quotas(normalise([0.7, 0.3], 2), 13).tolist() == [9, 4]
    # 10 / 3 each = 3.33: floors 3, the one left over to the first (a tie)
    assert quotas(normalise([2, 2, 2], 3), 10).tolist() == [4, 3, 3]
    assert np.allclose(normalise([7, 3], 2), [0.7, 0.3])


def test_frequencies_follow_the_weights_not_the_sizes():
    sizes, p = [1000, 50], 0.3  # the small source gets 30% of the images, not 50/1050 = 4.8%
    s = WeightedBatchSampler(sizes, [0.7, 0.3], 10, seed=3)
    epoch = flat(s, 0)
    assert sum(source_of(i, sizes) == 1 for i in epoch) == round(0.3 * 1050)  # 315 exactly per epoch
    # a long draw (six epochs) cut into windows of m images: within 4 binomial standard deviations of p*m
    # (the per-epoch quota makes the true spread smaller: sampling the epoch's slots without replacement)
    draws = [source_of(i, sizes) for e in range(6) for i in flat(s, e)]
    m = 150
    sd = math.sqrt(m * p * (1 - p))
    for w in range(0, len(draws) - m + 1, m):
        assert abs(sum(draws[w:w + m]) - p * m) <= 4 * sd
    assert abs(sum(draws) / len(draws) - p) <= 4 * math.sqrt(p * (1 - p) / len(draws))


def test_global_sequence_is_the_same_for_1_2_4_processes():
    sizes, weights, global_batch = [90, 7, 40], [0.5, 0.2, 0.3], 8

    def global_stream(world):
        per = global_batch // world
        ranks = [list(WeightedBatchSampler(sizes, weights, per, seed=11, rank=r, world_size=world))
                 for r in range(world)]
        out = []
        for b in range(len(ranks[0])):  # rank r's j-th image of batch b sits at W * (B * b + j) + r
            out += [ranks[r][b][j] for j in range(per) for r in range(world)]
        return out

    one = global_stream(1)
    assert len(one) == (137 // 8) * 8
    assert global_stream(2) == one
    assert global_stream(4) == one


def test_resume_mid_epoch_continues_the_same_stream():
    s = WeightedBatchSampler([20, 3], [0.4, 0.6], 4, seed=5)
    for epoch in (0, 1, 2):  # later epochs start inside a pass of each source's walk
        full = flat(s, epoch)
        again = WeightedBatchSampler([20, 3], [0.4, 0.6], 4, seed=5)  # a new process: nothing carried over
        assert flat(again, epoch, start=2) == full[2 * 4:]
    assert flat(s, 0) != flat(s, 1)


def test_small_source_repeats_once_per_pass_and_large_one_is_subsampled():
    sizes = [97, 3]
    s = WeightedBatchSampler(sizes, [0.5, 0.5], 10, seed=2)  # 50 images of each source per 100-image epoch
    small, big = [], []
    for epoch in range(3):
        images = flat(s, epoch)
        small.append([i for i in images if i >= 97])
        big.append([i for i in images if i < 97])
        counts = Counter(small[-1])
        assert sorted(counts) == [97, 98, 99] and sum(counts.values()) == 50
        assert set(counts.values()) <= {16, 17}  # 50 = 16 passes of 3 and two images of the next
    walk = small[0] + small[1] + small[2]  # 150 = 50 whole passes: each pass holds every image once
    assert all(sorted(walk[k:k + 3]) == [97, 98, 99] for k in range(0, 150, 3))
    assert len(set(big[0])) == 50  # the large source: no repeats within an epoch ...
    assert set(big[0]) | set(big[1]) == set(range(97))  # ... and its first pass ends inside epoch 1


class Fake:
    def __init__(self, path, n, classes):
        self.path, self.num_classes = path, classes
        self.labels = np.arange(n) % classes

    def __len__(self):
        return len(self.labels)


def test_labels_of_the_sources_stay_apart():
    ds = FaceDataset([Fake("a", 30, 5), Fake("b", 4, 2)])
    s = WeightedBatchSampler([len(x) for x in ds.sources], [0.5, 0.5], 17, seed=0)
    for i in flat(s, 0):
        k, _ = ds.locate(i)
        assert (5 <= ds.labels[i] < 7) if k == 1 else (0 <= ds.labels[i] < 5)


def test_bad_weights_raise_one_line():
    with pytest.raises(ValueError, match="1 weight.*2 data source"):
        normalise([1.0], 2)
    with pytest.raises(ValueError, match="> 0"):
        normalise([1.0, 0.0], 2)


@pytest.mark.parametrize("weights, needle", [("0.7", "1 weight(s) for 2 --data source(s)"),
                                             ("0.7,0", "each value must be a finite number > 0"),
                                             ("0.7,x", "bad value")])
def test_train_refuses_bad_data_weights(capsys, tiny_pack, tmp_path, weights, needle):
    script_error(capsys, train.main, ["--data", f"{tiny_pack},{tiny_pack}", "--data-weights", weights,
                                      "--output", str(tmp_path / "r")], "--data-weights", needle)


@pytest.fixture(scope="module")
def second_pack(tmp_path_factory):
    from prepare.synth import generate_dataset

    out = tmp_path_factory.mktemp("second_pack")
    generate_dataset(str(out), identities=3, images_per_id=4, pairs=0.001, seed=9, progress=False)
    return str(out)


def test_train_mixes_two_packs(tiny_pack, second_pack, tmp_path):
    out = str(tmp_path / "run")
    assert train.main(["--data", f"{tiny_pack},{second_pack}", "--data-weights", "1,1", "--output", out,
                       "--batch-size", "8", "--max-steps", "2", "--num-workers", "0", "--no-progress",
                       "--targets", "lfw", "--embedding-size", "32"]) == 0
    log = open(os.path.join(out, "train.log")).read()
    # 36 + 12 = 48 images per epoch, half from each pack: the second one's 12 images twice over
    assert f"{tiny_pack}/train.rec: weight 0.5, 24 of its 36 images" in log
    assert f"{second_pack}/train.rec: weight 0.5, 24 of its 12 images per epoch (2 passes)" in log
    assert json.load(open(os.path.join(out, "config.json")))["data_weights"] == [1.0, 1.0]
    assert train.main(["--resume", out, "--max-steps", "3"]) == 0  # the weights come back from the checkpoint
    assert open(os.path.join(out, "train.log")).read().count(f"{second_pack}/train.rec: weight 0.5") == 2


def test_trainer_resume_with_weights_is_exact(tiny_pack, second_pack, tmp_path):
    def trainer(out):
        out.mkdir(exist_ok=True)
        cfg = build_config(overrides=dict(batch_size=8, lr=0.1, epochs=2, num_workers=0, progress=False, seed=4,
                                          data_weights=(0.3, 0.7), output=str(out)))
        torch.manual_seed(0)
        ds = build_dataset(f"{tiny_pack},{second_pack}")
        head = heads.build("cosface", 32, ds.num_classes, s=16.0, m=0.2)
        return Trainer(cfg, SmallNet(32), DenseLoss(head, losses.build("cross_entropy")), ds, torch.device("cpu"))

    a = trainer(tmp_path / "a")
    a.fit()
    b = trainer(tmp_path / "b")
    b.fit(stop_at=5)  # 48 images / 8 = 6 steps per epoch: stopped inside the first epoch
    c = trainer(tmp_path / "b")
    c.load_state_dict(load_training_checkpoint(str(tmp_path / "b")))
    c.fit()
    assert c.step == a.step == 12
    for (k, va), vc in zip(a.model.state_dict().items(), c.model.state_dict().values()):
        assert torch.equal(va, vc), k
