"""The training dataset: decoded uint8 images and labels from one or more sources.

Workers only read and decode (bytes -> uint8 RGB); flipping and normalisation
happen on the device, batched. A corrupt image does not stop training: it is
returned with label -1, dropped by `collate`, and counted by the trainer.
"""

from __future__ import annotations

import signal
import time
from typing import Any, List, NamedTuple, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate

from data.imageformat import oversize
from data.sources import FaceSource, open_source
from utils.files import UnreadableFileError


def decode_bgr(payload: bytes, size: Tuple[int, int] = (112, 112)) -> np.ndarray | None:
    """Encoded JPEG/PNG -> (H,W,3) uint8 BGR (OpenCV's order) at `size` (H,W), or None if undecodable (or
    claiming in its header more pixels than data.imageformat.MAX_IMAGE_PIXELS: such bytes never reach the decoder)."""
    buf = np.frombuffer(payload, dtype=np.uint8)
    if buf.size == 0 or oversize(buf):
        return None
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None:
        return None
    if img.shape[:2] != tuple(size):
        img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return img


def decode_image(payload: bytes, size: Tuple[int, int] = (112, 112)) -> np.ndarray | None:
    """Encoded JPEG/PNG -> (H,W,3) uint8 RGB at `size` (H,W), or None (see `decode_bgr`)."""
    img = decode_bgr(payload, size)
    return None if img is None else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def bgr_to_chw_rgb(img: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
    """(H,W,3) uint8 BGR -> contiguous (3,H,W) uint8 RGB: channel 2 to plane 0, 1 to 1, 0 to 2 (cv2.mixChannels).

    One pass instead of a BGR -> RGB conversion plus a transposing copy. Written into `out` (a contiguous
    (3,H,W) uint8 CPU tensor, e.g. a row of a batch) when given.
    """
    out = torch.from_numpy(np.empty((3, *img.shape[:2]), dtype=np.uint8)) if out is None else out
    planes = out.numpy()
    cv2.mixChannels([img], [planes[0], planes[1], planes[2]], (2, 0, 1, 1, 0, 2))
    return out


class FaceDataset(Dataset):
    """Concatenation of sources, labels offset so each source has its own classes."""

    def __init__(self, sources: Sequence[FaceSource], image_size: Tuple[int, int] = (112, 112),
                 decode: bool = True) -> None:
        self.sources = list(sources)
        self.image_size = image_size
        self.decode = decode  # False: items are the encoded bytes (decoded on the device, data/device_decode.py)
        sizes = np.array([len(s) for s in self.sources], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        offsets = np.concatenate([[0], np.cumsum([s.num_classes for s in self.sources])])
        self.label_offsets = offsets[:-1]
        self.num_classes = int(offsets[-1])
        self.labels = np.concatenate([s.labels + off for s, off in zip(self.sources, self.label_offsets)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, index: int) -> Tuple[int, int]:
        """(source number, index inside that source) of a global index."""
        if len(self.sources) == 1:
            return 0, index
        k = int(np.searchsorted(self.starts, index, side="right") - 1)
        return k, index - int(self.starts[k])

    def describe(self, index: int) -> str:
        k, i = self.locate(index)
        return self.sources[k].describe(i)

    def __getitem__(self, index: int, out: torch.Tensor | None = None) -> Tuple[torch.Tensor, int, int | str]:
        """(uint8 CHW RGB image, label, index); label -1 for an undecodable image (or an image file
        refused unread: a FIFO, a device, over the size cap), counted and skipped like one.

        A record that cannot be read at all (truncated file, bad magic) comes back
        with label -2 and the error message in place of the index, so the main
        process can stop with that one line instead of a worker traceback.
        `out`: where to write the decoded image (see `__getitems__`).
        """
        k, i = self.locate(index)
        try:
            payload = self.sources[k].read(i)
        except UnreadableFileError:  # a FIFO, a device or an over-size file where an image should be: skip it
            return self._blank(), -1, index
        except (OSError, ValueError) as exc:
            return self._blank(), -2, str(exc).splitlines()[0] if str(exc) else f"{self.describe(index)}: unreadable"
        if not self.decode:
            return torch.frombuffer(bytearray(payload), dtype=torch.uint8), int(self.labels[index]), index
        try:
            img = decode_bgr(payload, self.image_size)
        except (cv2.error, ValueError):
            img = None
        if img is None:
            return self._blank(), -1, index
        return bgr_to_chw_rgb(img, out), int(self.labels[index]), index

    def __getitems__(self, indices: List[int]) -> List[Tuple[torch.Tensor, int, int | str]]:
        """The items of one batch (the DataLoader asks for a batch sampler's list at once), their images
        decoded straight into the rows of one (B,3,H,W) uint8 batch: `collate` hands that batch on
        without stacking a copy when every row decoded. In a DataLoader worker the batch lives in
        shared memory (as torch's own collate does), so it reaches the main process uncopied too.
        """
        if not self.decode:
            return [self[i] for i in indices]
        shape = (len(indices), 3, *self.image_size)
        if torch.utils.data.get_worker_info() is not None:
            batch = torch.empty(0, dtype=torch.uint8)
            batch.set_(batch.untyped_storage()._new_shared(int(np.prod(shape))), 0, shape)
        else:  # numpy's allocation reuses freed pages: see data.transforms.flip_normalize
            batch = torch.from_numpy(np.empty(shape, dtype=np.uint8))
        return [self.__getitem__(index, batch[row]) for row, index in enumerate(indices)]

    def _blank(self) -> torch.Tensor:
        """The stand-in image of a skipped record (dropped by `collate`)."""
        return torch.zeros(3, *self.image_size, dtype=torch.uint8)


def build_dataset(spec: str, image_size: Tuple[int, int] = (112, 112), decode: bool = True) -> FaceDataset:
    """`spec`: one path or several joined by commas (labels offset per source)."""
    paths = [p.strip() for p in spec.split(",") if p.strip()]
    return FaceDataset([open_source(p) for p in paths], image_size, decode)


class EncodedBatch(NamedTuple):
    """The encoded images of a batch (``decode=False``) as one flat uint8 tensor, for
    data.device_decode.decode_batch in the main process.

    One block, not a tensor per image: between a DataLoader worker and the main process each
    tensor travels as its own shared-memory file (a file descriptor and a socket round trip
    apiece), which capped the loader near 1000 images/s on two cores (15000 packed) and can
    exhaust the descriptor limit at batch 256 x 8 workers x prefetch 4.
    """

    data: torch.Tensor  # uint8 (sum of sizes,): the payloads one after another
    sizes: torch.Tensor  # int64 (B,): each payload's length in bytes
    indices: List[int]  # each payload's dataset index

    def payloads(self) -> List[torch.Tensor]:
        """The B payloads as 1-D uint8 views of ``data``."""
        return list(torch.split(self.data, self.sizes.tolist())) if len(self.indices) else []


def collate(batch: List[Tuple[torch.Tensor, int, int | str]]) -> Tuple[torch.Tensor | EncodedBatch, torch.Tensor,
                                                                          List[int | str]]:
    """Stack the good samples; return the bad ones separately.

    With a dataset built with ``decode=False`` the images come back as an EncodedBatch
    (the encoded bytes and dataset index of each good sample) for data.device_decode.decode_batch.

    `bad` holds the index of each undecodable image and, for an unreadable
    record (label -2), its error message: the trainer raises that one in the
    main process (this function runs inside the DataLoader workers).
    """
    good = [b for b in batch if b[1] >= 0]
    bad = [b[2] for b in batch if b[1] < 0]
    labels = torch.tensor([b[1] for b in good], dtype=torch.int64)
    if good and good[0][0].dim() == 1:  # encoded bytes, decoded later on the device
        return EncodedBatch(torch.cat([b[0] for b in good]), torch.tensor([len(b[0]) for b in good], dtype=torch.int64),
                            [b[2] for b in good]), labels, bad
    if not good:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), labels, bad
    images = [b[0] for b in good]
    whole = images[0]._base  # FaceDataset.__getitems__: every image is its row of one batch, in order
    if (len(good) == len(batch) and whole is not None and whole.dim() == 4 and len(whole) == len(images)
            and all(im._base is whole and im.data_ptr() == whole[r].data_ptr() for r, im in enumerate(images))):
        return whole, labels, bad
    if torch.utils.data.get_worker_info() is not None:
        return default_collate(images), labels, bad  # stacked straight into shared memory
    out = torch.from_numpy(np.empty((len(images), *images[0].shape), dtype=np.uint8))  # reused pages: see
    return torch.stack(images, out=out), labels, bad  # data.transforms.flip_normalize


class ResumableBatchSampler(Sampler[List[int]]):
    """Shuffled batches, a new permutation per epoch, startable mid-epoch.

    The permutation depends only on (seed, epoch), so a run resumed at batch
    `start` of an epoch sees exactly the batches the uninterrupted run saw.
    With `world_size` > 1 each rank takes every world_size-th index of the
    permutation (its own shard), and all ranks get the same number of batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0
        if self.batches_per_epoch() == 0:
            raise ValueError(f"{n} images are fewer than one batch of {batch_size} x {world_size} process(es)")

    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start

    def stream(self, epoch: int) -> torch.Tensor:
        """The global dataset indices of epoch ``epoch`` in order (all ranks' images): a permutation."""
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        mine = self.stream(self.epoch)[self.rank::self.world_size]
        for b in range(self.start, self.batches_per_epoch()):
            yield mine[b * self.batch_size:(b + 1) * self.batch_size].tolist()


def worker_init(_: int) -> None:
    """Decode threads: one per worker process (the workers already run in parallel).

    Workers ignore SIGINT/SIGTERM: the training process handles them (a clean stop
    with a checkpoint at the next step) and shuts its workers down itself.
    """
    cv2.setNumThreads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_workers(loader: Any, timeout: float = 5.0) -> None:
    """Shut a DataLoader's persistent workers down now, in at most about ``timeout`` seconds.

    Needed because the workers ignore SIGTERM (see `worker_init`): left to the garbage
    collector, a loader kept alive by a traceback outlives the interpreter's own exit
    hook, which then SIGTERMs the workers and waits for them forever. The workers are
    asked to finish (their queue's end mark) and waited for together; one still busy
    after ``timeout`` (blocked in a read, e.g. on a FIFO) is killed (SIGKILL) rather
    than left orphaned. torch's own shut-down then finds them gone. A loader that never
    started workers (or None) is left alone.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is None or not hasattr(iterator, "_shutdown_workers"):
        return
    workers = list(getattr(iterator, "_workers", []))
    if not getattr(iterator, "_shutdown", True):
        if hasattr(iterator, "_pin_memory_thread"):  # first, as torch does: it reads what the workers write
            iterator._pin_memory_thread_done_event.set()
            iterator._worker_result_queue.put((None, None))
            iterator._pin_memory_thread.join(timeout=timeout)
        iterator._workers_done_event.set()
        for i, queue in enumerate(getattr(iterator, "_index_queues", [])):
            if iterator._persistent_workers or iterator._workers_status[i]:
                queue.put(None)  # the worker's end mark (what torch's shut-down sends)
        deadline = time.monotonic() + timeout
        for w in workers:
            w.join(timeout=max(0.0, deadline - time.monotonic()))
        for w in workers:
            if w.is_alive():
                w.kill()  # SIGKILL: the ignored SIGTERM would not stop it
                w.join(timeout=timeout)
    iterator._shutdown_workers()
    loader._iterator = None
