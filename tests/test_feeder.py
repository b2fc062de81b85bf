"""BatchFeeder: micro-batches per optimizer step, bad images counted or fatal, batches kept one size."""

import numpy as np
import pytest
import torch

from data.dataset import FaceDataset, ResumableBatchSampler, build_dataset
from data.sources import DataSourceError
from engine.distributed import DistInfo
from engine.feeder import BatchFeeder, min_images_to_judge


def _feeder(pack, batch=6, accum=1, workers=0, dist_info=DistInfo(), log=print):
    ds = build_dataset(pack)
    sampler = ResumableBatchSampler(len(ds), batch, seed=0)
    return BatchFeeder(ds, sampler, workers, torch.device("cpu"), dist_info, accum, log)


def test_steps_group_accum_micro_batches_in_sampler_order(tiny_pack):
    feeder = _feeder(tiny_pack, batch=6, accum=2)
    steps = list(feeder.steps())
    assert len(steps) == 36 // 12 and all(len(s) == 2 for s in steps)
    order = [i for b in feeder.sampler for i in b]
    ds = feeder.dataset
    labels = torch.cat([lab for s in steps for _, lab in s]).tolist()
    assert labels == [ds[i][1] for i in order]
    assert steps[0][0][0].dtype == torch.uint8 and steps[0][0][0].shape == (6, 3, 112, 112)


def test_workers_stop_on_close(tiny_pack):
    feeder = _feeder(tiny_pack, workers=1)
    assert len(list(feeder.steps())) == 6
    workers = list(feeder._data._iterator._workers)
    feeder.close()
    for w in workers:
        w.join(timeout=10)
    assert not any(w.is_alive() for w in workers) and feeder._data is None
    feeder.close()  # twice is harmless


def test_undecodable_images_are_counted_and_named(tiny_pack):
    lines = []
    feeder = _feeder(tiny_pack, log=lines.append)
    feeder._check_bad([3, 5], 6)
    assert feeder.skipped == 2 and "skipped undecodable image(s)" in lines[0] and "2 skipped so far" in lines[0]
    assert "record" in lines[0]  # named by the source (train.rec record N)
    with pytest.raises(DataSourceError, match="record 7: bad magic"):
        feeder._check_bad([1, "train.rec record 7: bad magic"], 2)


def test_the_warning_is_rate_limited_to_doublings(tiny_pack):
    """One line when the count first reaches 1, 2, 4, 8, ... (within a minute), not one per batch."""
    lines = []
    feeder = _feeder(tiny_pack, log=lines.append)
    feeder.max_bad_fraction = 1.0  # never fatal here
    for _ in range(100):
        feeder._check_bad([0], 6)
    assert feeder.skipped == 100
    assert len(lines) == 7  # at 1, 2, 4, 8, 16, 32, 64
    assert "64 skipped so far" in lines[-1]


@pytest.mark.parametrize("fraction,epoch,want", [(0.01, 10**6, 2000), (0.01, 36, 36), (0.5, 10**6, 200),
                                                  (0.0, 10**6, 1)])
def test_min_images_to_judge(fraction, epoch, want):
    assert min_images_to_judge(fraction, epoch) == want


def test_too_many_undecodable_stops_only_once_enough_were_read(tiny_pack):
    feeder = _feeder(tiny_pack, log=lambda m: None)  # an epoch is 36 images: judged from 36 on
    feeder.max_bad_fraction = 0.1
    feeder._check_bad([0, 1, 2, 3], 30)  # 13% of 30: too few read to judge
    with pytest.raises(DataSourceError) as e:
        feeder._check_bad([4], 6)  # 5 of 36 = 14% > 10%
    msg = str(e.value)
    assert "5 of the 36 images read are undecodable" in msg and "13.9%" in msg and "0.1" in msg
    assert msg.count("record") == 3 and "\n" not in msg  # the first three named, one line
    fine = _feeder(tiny_pack, log=lambda m: None)
    fine.max_bad_fraction = 0.2
    fine._check_bad([0, 1, 2, 3, 4], 36)  # 14% <= 20%: goes on


class _Garbage:
    """A source of 12 records that never decode."""

    path, num_classes = "garbage", 2
    labels = np.array([0, 1] * 6)

    def __len__(self):
        return 12

    def read(self, i):
        return b"not an image"

    def describe(self, i):
        return f"garbage record {i}"


def test_a_whole_undecodable_epoch_stops_with_one_line():
    lines = []
    ds = FaceDataset([_Garbage()])
    feeder = BatchFeeder(ds, ResumableBatchSampler(len(ds), 4), 0, torch.device("cpu"), DistInfo(), 1,
                         lines.append, max_bad_fraction=1.0)
    with pytest.raises(DataSourceError) as e:
        list(feeder.steps())
    assert "all 12 images read in epoch 0 were undecodable" in str(e.value)
    assert "garbage record" in str(e.value) and len(lines) == 2  # at 4 and 8 (12 is no doubling)


def test_a_stop_request_ends_the_skipping_early():
    ds = FaceDataset([_Garbage()])
    asked = []
    feeder = BatchFeeder(ds, ResumableBatchSampler(len(ds), 4), 0, torch.device("cpu"), DistInfo(), 1,
                         lambda m: None, max_bad_fraction=1.0, stop_requested=lambda: len(asked) > 1 or asked.append(1))
    assert list(feeder.steps()) == [] and feeder.skipped == 8  # stopped before the third batch, no error


def test_short_batches_are_refilled_only_under_several_ranks(tiny_pack):
    images, labels = torch.arange(4).view(4, 1, 1, 1), torch.tensor([10, 11, 12, 13])
    alone = _feeder(tiny_pack, batch=6)
    assert alone._fill(images, labels)[1].tolist() == [10, 11, 12, 13]
    ranked = _feeder(tiny_pack, batch=6, dist_info=DistInfo(rank=1, world_size=2))
    got_images, got_labels = ranked._fill(images, labels)
    assert got_labels.tolist() == [10, 11, 12, 13, 10, 11] and got_images.flatten().tolist() == [0, 1, 2, 3, 0, 1]
    with pytest.raises(DataSourceError, match="rank 1: a whole batch of 6 undecodable images"):
        ranked._fill(images[:0], labels[:0])
