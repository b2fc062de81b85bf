"""What feeds the training step: one persistent DataLoader, optional decoding on the device,
bad images counted (or fatal), and micro-batches grouped per optimizer step.

Kept apart from the trainer because its concerns are processes and bytes, not
optimisation: worker start-up and shut-down, undecodable JPEGs, and keeping every
rank's batches one size so that the collectives of a step line up.
"""

from __future__ import annotations

import atexit
import multiprocessing
import weakref
from typing import Any, Callable, Iterator, List, Tuple

import torch
from torch.utils.data import DataLoader

from data.dataset import FaceDataset, ResumableBatchSampler, collate, stop_workers, worker_init
from data.sources import DataSourceError
from utils.distributed import DistInfo

MicroBatch = Tuple[torch.Tensor, torch.Tensor]


class BatchFeeder:
    """Groups of ``accum`` (images uint8, labels) micro-batches of ``dataset`` in ``sampler``'s order.

    ``skipped`` counts undecodable images (they are dropped and reported through ``log``);
    an unreadable record stops training with its one-line message.
    """

    def __init__(self, dataset: FaceDataset, sampler: ResumableBatchSampler, num_workers: int,
                 device: torch.device, dist_info: DistInfo, accum: int = 1,
                 log: Callable[[str], None] = print) -> None:
        self.dataset, self.sampler, self.num_workers = dataset, sampler, int(num_workers)
        self.device, self.dist, self.accum, self.log = device, dist_info, int(accum), log
        self.skipped = 0
        self._data: DataLoader | None = None
        self._stop_at_exit: Callable[[], None] | None = None

    def loader(self) -> DataLoader:
        """One DataLoader for the whole run; its workers live across epochs (the sampler is re-read per epoch).

        Workers start from a forkserver, not a fork of this process: a fork copies the state of
        threads that do not exist in the child (OpenCV's pool after the .bin decoding, OpenMP),
        and a worker touching it can hang forever. The price is a few seconds of start-up, once.
        """
        if self._data is None:
            nw = self.num_workers
            ctx = "forkserver" if nw and "forkserver" in multiprocessing.get_all_start_methods() else None
            self._data = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=nw, collate_fn=collate,
                                    pin_memory=self.device.type == "cuda", worker_init_fn=worker_init if nw else None,
                                    persistent_workers=nw > 0, prefetch_factor=4 if nw else None,
                                    multiprocessing_context=ctx)
            if nw:  # the workers must be gone before the interpreter's exit hook waits for them
                loader = weakref.ref(self._data)  # the hook must not keep the loader alive
                self._stop_at_exit = lambda: stop_workers(loader())
                atexit.register(self._stop_at_exit)
        return self._data

    def close(self) -> None:
        """Stop the persistent workers now, whatever still references the loader (a traceback may)."""
        data, self._data = self._data, None
        if data is not None:
            stop_workers(data)
        if self._stop_at_exit is not None:
            atexit.unregister(self._stop_at_exit)
            self._stop_at_exit = None

    def steps(self) -> Iterator[List[MicroBatch]]:
        """The sampler's current epoch (from its start batch) as groups of ``accum`` micro-batches."""
        group: List[MicroBatch] = []
        for images, labels, bad in self.loader():
            if isinstance(images, list):  # encoded: decode where the model runs
                images, labels, undecodable = self._decode(images, labels)
                bad = list(bad) + undecodable
            self._check_bad(bad)
            if len(labels) == 0 and not self.dist.distributed:
                continue
            group.append(self._fill(images, labels))
            if len(group) == self.accum:
                yield group
                group = []

    def _decode(self, items: List[Tuple[int, torch.Tensor]], labels: torch.Tensor):
        """Batched JPEG decoding on the training device; undecodable images dropped and reported."""
        from utils.device_decode import decode_batch

        images, failed = decode_batch([p for _, p in items], self.device, tuple(self.dataset.image_size))
        if failed:
            keep = torch.ones(len(items), dtype=torch.bool)
            keep[failed] = False
            labels = labels[keep]
        return images, labels, [items[i][0] for i in failed]

    def _fill(self, images: torch.Tensor, labels: torch.Tensor) -> MicroBatch:
        """Under several processes, a batch short of undecodable images is refilled by repeating its
        good ones: every rank must run the same collectives on batches of one size."""
        want = self.sampler.batch_size
        if not self.dist.distributed or len(labels) == want:
            return images, labels
        if len(labels) == 0:
            raise DataSourceError(f"rank {self.dist.rank}: a whole batch of {want} undecodable images "
                                  f"(epoch {self.sampler.epoch})")
        idx = torch.arange(want) % len(labels)
        return images[idx], labels[idx]

    def _check_bad(self, bad: List[Any]) -> None:
        """Stop on an unreadable record; count and report undecodable images."""
        unreadable = [b for b in bad if isinstance(b, str)]
        if unreadable:  # a damaged data file: stop with its one-line message
            raise DataSourceError(unreadable[0])
        if bad:
            self.skipped += len(bad)
            names = ", ".join(self.dataset.describe(i) for i in bad[:3])
            self.log(f"warning: skipped undecodable image(s) {names} ({self.skipped} skipped so far)")
