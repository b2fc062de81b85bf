"""BatchFeeder: micro-batches per optimizer step, bad images counted or fatal, batches kept one size.

Everything is observed through ``steps()`` and ``close()``: sources whose chosen records do not
decode (or cannot be read) stand in for damaged data.
"""

import multiprocessing

import cv2
import numpy as np
import pytest
import torch

from data.dataset import FaceDataset, ResumableBatchSampler, build_dataset
from data.sources import DataSourceError
from engine.distributed import DistInfo
from engine.feeder import BatchFeeder, min_images_to_judge

_JPEG = cv2.imencode(".jpg", np.full((112, 112, 3), 128, np.uint8))[1].tobytes()


class _Damaged:
    """``n`` records, one class each (the label names the record); ``bad`` never decode, ``unreadable`` raise."""

    path = "damaged"

    def __init__(self, n, bad=(), unreadable=()):
        self.n, self.bad, self.unreadable = n, set(bad), set(unreadable)
        self.num_classes, self.labels = n, np.arange(n, dtype=np.int64)

    def __len__(self):
        return self.n

    def read(self, i):
        if i in self.unreadable:
            raise ValueError(f"damaged record {i}: bad magic")
        return b"not an image" if i in self.bad else _JPEG

    def describe(self, i):
        return f"damaged record {i}"


def _order(n, batch, info=DistInfo()):
    """The indices of each batch this rank reads in epoch 0."""
    return [list(b) for b in ResumableBatchSampler(n, batch, seed=0, rank=info.rank, world_size=info.world_size)]


def _damaged(n, batch, bad=(), unreadable=(), info=DistInfo(), log=None, max_bad_fraction=1.0, accum=1):
    ds = FaceDataset([_Damaged(n, bad, unreadable)])
    sampler = ResumableBatchSampler(n, batch, seed=0, rank=info.rank, world_size=info.world_size)
    lines = [] if log is None else log
    return BatchFeeder(ds, sampler, 0, torch.device("cpu"), info, accum, lines.append,
                       max_bad_fraction=max_bad_fraction), lines


def _labels(group):
    return [lab.tolist() for _, lab in group]


def test_steps_group_accum_micro_batches_in_sampler_order(tiny_pack):
    ds = build_dataset(tiny_pack)
    feeder = BatchFeeder(ds, ResumableBatchSampler(len(ds), 6, seed=0), 0, torch.device("cpu"), DistInfo(), 2)
    steps = list(feeder.steps())
    assert len(steps) == 36 // 12 and all(len(s) == 2 for s in steps)
    order = [i for b in feeder.sampler for i in b]
    labels = torch.cat([lab for s in steps for _, lab in s]).tolist()
    assert labels == [ds[i][1] for i in order]
    assert steps[0][0][0].dtype == torch.uint8 and steps[0][0][0].shape == (6, 3, 112, 112)


def test_workers_are_gone_after_close(tiny_pack):
    before = set(multiprocessing.active_children())
    ds = build_dataset(tiny_pack)
    feeder = BatchFeeder(ds, ResumableBatchSampler(len(ds), 6, seed=0), 1, torch.device("cpu"), DistInfo())
    assert len(list(feeder.steps())) == 6
    assert set(multiprocessing.active_children()) - before  # persistent workers outlive the epoch
    feeder.close()
    assert not set(multiprocessing.active_children()) - before
    feeder.close()  # twice is harmless


def test_a_short_batch_stays_short_in_one_process():
    first = _order(24, 6)[0]
    feeder, _ = _damaged(24, 6, bad=first[:2])
    assert _labels(next(iter(feeder.steps()))) == [first[2:]]
    assert feeder.skipped == 2


def test_a_short_batch_is_refilled_with_its_good_images_under_several_ranks():
    """Every rank must run the same collectives on batches of one size: the good images repeat."""
    info = DistInfo(rank=1, world_size=2)
    first = _order(24, 6, info)[0]
    feeder, _ = _damaged(24, 6, bad=first[:2], info=info)
    (images, labels), = next(iter(feeder.steps()))
    good = first[2:]
    assert labels.tolist() == good + good[:2] and images.shape == (6, 3, 112, 112)


def test_a_whole_undecodable_batch_under_several_ranks_is_an_error_naming_the_rank():
    info = DistInfo(rank=1, world_size=2)
    feeder, _ = _damaged(24, 6, bad=_order(24, 6, info)[0], info=info)
    with pytest.raises(DataSourceError, match="rank 1: a whole batch of 6 undecodable images"):
        next(iter(feeder.steps()))


def test_undecodable_images_are_counted_and_named():
    first = _order(24, 6)[0]
    feeder, lines = _damaged(24, 6, bad=first[:2])
    next(iter(feeder.steps()))
    assert feeder.skipped == 2 and len(lines) == 1
    assert "skipped undecodable image(s)" in lines[0] and "2 skipped so far" in lines[0]
    assert f"damaged record {first[0]}" in lines[0]


def test_an_unreadable_record_stops_with_its_message():
    feeder, _ = _damaged(24, 6, unreadable=[_order(24, 6)[1][0]])
    with pytest.raises(DataSourceError, match="bad magic"):
        list(feeder.steps())


def test_the_warning_is_rate_limited_to_doublings():
    """One line when the count first reaches 1, 2, 4, 8, ... (within a minute), not one per batch."""
    feeder, lines = _damaged(600, 6, bad=[b[0] for b in _order(600, 6)])  # one bad image in each of 100 batches
    assert len(list(feeder.steps())) == 100
    assert feeder.skipped == 100
    assert len(lines) == 7  # at 1, 2, 4, 8, 16, 32, 64
    assert "64 skipped so far" in lines[-1]


@pytest.mark.parametrize("fraction,epoch,want", [(0.01, 10**6, 2000), (0.01, 36, 36), (0.5, 10**6, 200),
                                                  (0.0, 10**6, 1)])
def test_min_images_to_judge(fraction, epoch, want):
    assert min_images_to_judge(fraction, epoch) == want


def test_too_many_undecodable_stops_only_once_enough_were_read():
    order = [i for b in _order(36, 6) for i in b]  # an epoch is 36 images: judged from 36 on
    bad = order[:4] + order[30:31]  # 4 of the first 30 (13%, too few read to judge), then 5 of 36
    feeder, _ = _damaged(36, 6, bad=bad, max_bad_fraction=0.1)
    got = []
    with pytest.raises(DataSourceError) as e:
        for group in feeder.steps():
            got.append(group)
    assert len(got) == 5
    msg = str(e.value)
    assert "5 of the 36 images read are undecodable" in msg and "13.9%" in msg and "0.1" in msg
    assert msg.count("damaged record") == 3 and "\n" not in msg  # the first three named, one line
    fine, _ = _damaged(36, 6, bad=bad, max_bad_fraction=0.2)
    assert len(list(fine.steps())) == 6  # 14% <= 20%: goes on


def test_a_whole_undecodable_epoch_stops_with_one_line():
    feeder, lines = _damaged(12, 4, bad=range(12))
    with pytest.raises(DataSourceError) as e:
        list(feeder.steps())
    assert "all 12 images read in epoch 0 were undecodable" in str(e.value)
    assert "damaged record" in str(e.value) and len(lines) == 2  # at 4 and 8 (12 is no doubling)


def test_a_stop_request_ends_the_skipping_early():
    ds = FaceDataset([_Damaged(12, bad=range(12))])
    asked = []
    feeder = BatchFeeder(ds, ResumableBatchSampler(len(ds), 4), 0, torch.device("cpu"), DistInfo(), 1,
                         lambda m: None, max_bad_fraction=1.0, stop_requested=lambda: len(asked) > 1 or asked.append(1))
    assert list(feeder.steps()) == [] and feeder.skipped == 8  # stopped before the third batch, no error
