"""What feeds the training step: one persistent DataLoader, optional decoding on the device,
bad images counted (or fatal), and micro-batches grouped per optimizer step.

Kept apart from the trainer because its concerns are processes and bytes, not
optimisation: worker start-up and shut-down, undecodable JPEGs, and keeping every
rank's batches one size so that the collectives of a step line up.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import time
import weakref
from typing import Any, Callable, Iterator, List, Tuple

import torch
from torch.utils.data import DataLoader

from data.dataset import EncodedBatch, FaceDataset, ResumableBatchSampler, collate, stop_workers, worker_init
from data.sources import DataSourceError
from engine.distributed import DistInfo

MicroBatch = Tuple[torch.Tensor, torch.Tensor]

NOTE_EVERY_S = 60.0  # the undecodable-image warning: at most once a minute, or when the count has doubled
FIRST_BAD_SHOWN = 3  # bad images named in the warning and in the error


class WaitInterrupted(Exception):
    """Raised by a stop-signal handler to abandon a wait for the next batch (see ``BatchFeeder.waiting``)."""


def min_images_to_judge(max_bad_fraction: float, epoch_images: int) -> int:
    """How many images must have been read before their undecodable share is compared with the limit.

    About 20 expected bad images at the limit (20 / fraction: 2000 at 1%), at least 200, at
    most one epoch: fewer would stop healthy data on a chance cluster of bad images early
    on. A limit of 0 judges from the first image (any undecodable image stops).
    """
    if max_bad_fraction <= 0:
        return 1
    return max(1, min(epoch_images, max(200, math.ceil(20.0 / max_bad_fraction))))


class BatchFeeder:
    """Groups of ``accum`` (images uint8, labels) micro-batches of ``dataset`` in ``sampler``'s order.

    ``skipped`` counts undecodable images (dropped; reported through ``log`` at a bounded
    rate); an unreadable record stops training with its one-line message, and so do
    undecodable images beyond ``max_bad_fraction`` of those read (or a whole undecodable
    epoch). ``stop_requested`` is asked before each batch is fetched: a single process ends
    the epoch early when it says yes (a stop signal arrived while batches were being skipped).
    """

    def __init__(self, dataset: FaceDataset, sampler: ResumableBatchSampler, num_workers: int,
                 device: torch.device, dist_info: DistInfo, accum: int = 1,
                 log: Callable[[str], None] = print, max_bad_fraction: float = 0.01,
                 stop_requested: Callable[[], bool] = lambda: False) -> None:
        self.dataset, self.sampler, self.num_workers = dataset, sampler, int(num_workers)
        self.device, self.dist, self.accum, self.log = device, dist_info, int(accum), log
        self.max_bad_fraction, self.stop_requested = float(max_bad_fraction), stop_requested
        self.skipped = 0  # undecodable images over the whole run (restored from a checkpoint)
        self.waiting = False  # True while blocked on the loader for the next batch
        self._seen = self._bad = 0  # images read and undecodable ones, in this process
        self._first_bad: List[str] = []
        self._noted_at, self._noted_time = 0, -math.inf
        self._data: DataLoader | None = None
        self._stop_at_exit: Callable[[], None] | None = None

    def loader(self) -> DataLoader:
        """One DataLoader for the whole run; its workers live across epochs (the sampler is re-read per epoch).

        Workers start from a forkserver, not a fork of this process: a fork copies the state of
        threads that do not exist in the child (OpenCV's pool after the .bin decoding, OpenMP),
        and a worker touching it can hang forever. The price is a few seconds of start-up, once.
        No DataLoader ``timeout``: a slow but healthy first batch (worker start-up, a cold network
        file system) has no safe bound; a stop signal abandons the wait instead (``waiting``).
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
        """Stop the persistent workers now (bounded: a blocked worker is killed), whatever still
        references the loader (a traceback may)."""
        data, self._data = self._data, None
        if data is not None:
            stop_workers(data)
        if self._stop_at_exit is not None:
            atexit.unregister(self._stop_at_exit)
            self._stop_at_exit = None

    def steps(self) -> Iterator[List[MicroBatch]]:
        """The sampler's current epoch (from its start batch) as groups of ``accum`` micro-batches.

        Raises DataSourceError when every image of the epoch was undecodable (otherwise the
        training loop would ask for the same empty epoch forever).
        """
        group: List[MicroBatch] = []
        seen = good = 0
        batches = iter(self.loader())
        while True:
            if self.stop_requested() and not self.dist.distributed:
                return  # the caller stops; not a whole epoch
            self.waiting = True
            try:
                images, labels, bad = next(batches)
            except StopIteration:
                break
            finally:
                self.waiting = False
            if isinstance(images, EncodedBatch):  # encoded: decode where the model runs
                images, labels, undecodable = self._decode(images, labels)
                bad = list(bad) + undecodable
            seen, good = seen + len(labels) + len(bad), good + len(labels)
            self._check_bad(bad, len(labels) + len(bad))
            if len(labels) == 0 and not self.dist.distributed:
                continue
            group.append(self._fill(images, labels))
            if len(group) == self.accum:
                yield group
                group = []
        if seen and not good:
            raise DataSourceError(f"all {seen} images read in epoch {self.sampler.epoch} were undecodable "
                                  f"(first: {', '.join(self._first_bad)}): damaged images, or not image data")

    def _decode(self, batch: EncodedBatch, labels: torch.Tensor):
        """Batched JPEG decoding on the training device; undecodable images dropped and reported."""
        from data.device_decode import decode_batch

        images, failed = decode_batch(batch.payloads(), self.device, tuple(self.dataset.image_size))
        if failed:
            keep = torch.ones(len(batch.indices), dtype=torch.bool)
            keep[failed] = False
            labels = labels[keep]
        return images, labels, [batch.indices[i] for i in failed]

    def _fill(self, images: torch.Tensor, labels: torch.Tensor) -> MicroBatch:
        """Under several processes, a batch short of undecodable images is refilled by repeating its
        good ones: every rank must run the same collectives on batches of one size."""
        want = self.sampler.batch_size
        if not self.dist.distributed or len(labels) == want:
            return images, labels
        if len(labels) == 0:
            raise DataSourceError(f"rank {self.dist.rank}: a whole batch of {want} undecodable images "
                                  f"(epoch {self.sampler.epoch}; first: {', '.join(self._first_bad)})")
        idx = torch.arange(want) % len(labels)
        return images[idx], labels[idx]

    def _check_bad(self, bad: List[Any], seen: int) -> None:
        """Stop on an unreadable record; count undecodable images among the ``seen`` of a batch,
        note them at a bounded rate, and stop when their share is beyond ``max_bad_fraction``."""
        unreadable = [b for b in bad if isinstance(b, str)]
        if unreadable:  # a damaged data file: stop with its one-line message
            raise DataSourceError(unreadable[0])
        self._seen += seen
        if not bad:
            return
        self.skipped += len(bad)
        self._bad += len(bad)
        for i in bad[:FIRST_BAD_SHOWN - len(self._first_bad)]:
            self._first_bad.append(self.dataset.describe(i))
        judge = min_images_to_judge(self.max_bad_fraction, self.sampler.batches_per_epoch() * self.sampler.batch_size)
        if self._seen >= judge and self._bad > self.max_bad_fraction * self._seen:
            raise DataSourceError(f"{self._bad} of the {self._seen} images read are undecodable "
                                  f"({self._bad / self._seen:.1%}, more than --max-bad-fraction "
                                  f"{self.max_bad_fraction:g}; first: {', '.join(self._first_bad)})")
        now = time.monotonic()
        if self._bad >= 2 * self._noted_at or now - self._noted_time >= NOTE_EVERY_S:
            names = ", ".join(self.dataset.describe(i) for i in bad[:FIRST_BAD_SHOWN])
            self.log(f"warning: skipped undecodable image(s) {names} ({self.skipped} skipped so far, "
                     f"{self._bad} of {self._seen} read in this run; next note when it doubles or in "
                     f"{NOTE_EVERY_S:.0f} s)")
            self._noted_at, self._noted_time = self._bad, now
