"""BatchFeeder: micro-batches per optimizer step, bad images counted or fatal, batches kept one size."""

import pytest
import torch

from data.dataset import ResumableBatchSampler, build_dataset
from data.sources import DataSourceError
from utils.distributed import DistInfo
from utils.feeder import BatchFeeder


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
    feeder._check_bad([3, 5])
    assert feeder.skipped == 2 and "skipped undecodable image(s)" in lines[0] and "2 skipped so far" in lines[0]
    with pytest.raises(DataSourceError, match="record 7: bad magic"):
        feeder._check_bad([1, "train.rec record 7: bad magic"])


def test_short_batches_are_refilled_only_under_several_ranks(tiny_pack):
    images, labels = torch.arange(4).view(4, 1, 1, 1), torch.tensor([10, 11, 12, 13])
    alone = _feeder(tiny_pack, batch=6)
    assert alone._fill(images, labels)[1].tolist() == [10, 11, 12, 13]
    ranked = _feeder(tiny_pack, batch=6, dist_info=DistInfo(rank=1, world_size=2))
    got_images, got_labels = ranked._fill(images, labels)
    assert got_labels.tolist() == [10, 11, 12, 13, 10, 11] and got_images.flatten().tolist() == [0, 1, 2, 3, 0, 1]
    with pytest.raises(DataSourceError, match="rank 1: a whole batch of 6 undecodable images"):
        ranked._fill(images[:0], labels[:0])
