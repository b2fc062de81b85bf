"""Sampling several training sources with weights (``--data a,b --data-weights 0.7,0.3``).

Without weights the sampler shuffles the concatenation of the sources, so each source
is seen in proportion to its size. With weights each image of the stream comes from
source k with probability w_k (normalised to sum 1), whatever the sizes, so a small
in-domain set can be mixed into a large web set.

What an epoch is, precisely:

- Its length is the same number of images as without weights: the total size of the
  sources. ``--epochs``, warmup and milestones therefore mean the same amount of
  training with or without weights; weights change which images are seen, not how long
  training lasts. (Scaling the epoch to the largest source instead would let a tiny
  source with a large weight stretch an epoch without bound.)
- Each epoch takes exactly ``quotas(weights, n)[k]`` images from source k (w_k * n rounded
  by largest remainder; the same every epoch), in a seeded random order of sources:
  proportions are exact per epoch, and a window of m images holds about w_k * m of
  source k (fewer deviations than independent draws: hypergeometric, not binomial).
- Within a source the images come from its own endless walk: seeded permutations of that
  source one after another, each image once per pass. Epoch e takes the walk's
  positions [e * q_k, (e + 1) * q_k): a large source with a small weight is subsampled and
  shows different images each epoch until a pass ends; a small one with a large weight
  repeats, every image within one of the others per epoch.
- Labels stay apart as they do without weights: data.dataset.FaceDataset offsets each
  source's class ids by the classes of the sources before it.

The stream of one epoch depends only on (seed, epoch, weights, source sizes), so a run
resumed at batch ``start`` sees what the uninterrupted run saw; rank r of W takes every
W-th image of it (positions W * (B * b + j) + r), as ResumableBatchSampler does, so
the images of one global batch do not depend on how many processes split it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from data.dataset import ResumableBatchSampler

BLOCK = 1 << 16  # walk positions drawn per generator seeding (small sources: many passes per block)


def normalise(weights: Sequence[float], num_sources: int) -> np.ndarray:
    """``weights`` as float64 summing to 1; ValueError (one line) unless there is one per source, each > 0."""
    w = np.asarray(list(weights), dtype=np.float64)
    if w.size != num_sources:
        raise ValueError(f"{w.size} weight(s) for {num_sources} data source(s): give one weight per source")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights {', '.join(f'{x:g}' for x in w)}: each must be a finite number > 0 "
                         f"(leave a source out of --data to not use it)")
    return w / w.sum()


def quotas(weights: np.ndarray, n: int) -> np.ndarray:
    """Images per source in an epoch of ``n``: floor(w_k * n), the remainder to the largest fractions
    (ties to the earlier source). Sums to ``n``."""
    exact = weights * n
    base = np.floor(exact).astype(np.int64)
    short = int(n - base.sum())
    order = np.argsort(-(exact - base), kind="stable")
    base[order[:short]] += 1
    return base


def walk(size: int, seed: int, source: int, start: int, count: int) -> torch.Tensor:
    """Positions [start, start + count) of source ``source``'s walk: seeded permutations of
    range(size) one after another. Block b of the walk (BLOCK // size passes, at least one) is
    drawn from a generator seeded by (seed, source, b) alone, so any stretch is reproducible."""
    if count == 0:
        return torch.zeros(0, dtype=torch.int64)
    passes = max(1, BLOCK // size)
    span = passes * size
    out = []
    for b in range(start // span, (start + count - 1) // span + 1):
        g = torch.Generator().manual_seed(((seed * 1000003 + source) * 1000033 + b) % (1 << 63))
        if passes == 1:
            block = torch.randperm(size, generator=g)
        else:  # argsort of uniform keys: an independent uniform permutation per row
            block = torch.rand(passes, size, generator=g, dtype=torch.float64).argsort(dim=1).reshape(-1)
        lo, hi = max(start, b * span) - b * span, min(start + count, (b + 1) * span) - b * span
        out.append(block[lo:hi])
    return torch.cat(out)


class WeightedBatchSampler(ResumableBatchSampler):
    """Batches of global dataset indices drawn from several sources with weights (see the module text).

    ResumableBatchSampler's bookkeeping (``batches_per_epoch``, ``set_epoch(epoch, start)``,
    ``__len__``, each rank's share of the stream) with another ``stream`` of indices;
    ``sizes`` are the sources' image counts in dataset order.
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.sizes = np.asarray(list(sizes), dtype=np.int64)
        if self.sizes.size == 0 or np.any(self.sizes <= 0):
            raise ValueError(f"source sizes {list(self.sizes)}: every source needs at least one image")
        if self.sizes.size > 32767:  # the stream's per-position source numbers are int16
            raise ValueError(f"{self.sizes.size} sources: at most 32767 can be mixed")
        self.weights = normalise(weights, self.sizes.size)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])
        self.quota = quotas(self.weights, int(self.starts[-1]))
        super().__init__(int(self.starts[-1]), batch_size, seed=seed, rank=rank, world_size=world_size)

    def stream(self, epoch: int) -> torch.Tensor:
        """The global dataset indices of epoch ``epoch`` in order (all ranks' images, n of them)."""
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        slots = torch.repeat_interleave(torch.arange(self.sizes.size, dtype=torch.int16), torch.from_numpy(self.quota))
        which = slots[torch.randperm(self.n, generator=g)]  # source of each position (int16: n x 2 bytes)
        out = torch.empty(self.n, dtype=torch.int64)
        for k, (size, q) in enumerate(zip(self.sizes.tolist(), self.quota.tolist())):
            out[which == k] = walk(size, self.seed, k, epoch * q, q) + int(self.starts[k])
        return out

    def describe(self, names: Sequence[str] = ()) -> str:
        """One line for the run log: each source's weight, images per epoch and passes over it per epoch;
        sources are called by ``names`` (their paths) where given, else by number."""
        names = list(names) or [f"source {k}" for k in range(self.sizes.size)]
        parts = [f"{name}: weight {w:.3g}, {q} of its {s} images per epoch ({q / s:.3g} passes)"
                 for name, w, q, s in zip(names, self.weights, self.quota.tolist(), self.sizes.tolist())]
        return "data mix: " + "; ".join(parts)


def build_sampler(sizes: Sequence[int], batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                  weights: Sequence[float] = ()) -> ResumableBatchSampler | WeightedBatchSampler:
    """The training sampler: without ``weights`` the plain shuffle of the concatenation (unchanged),
    with them the weighted mix."""
    if not weights:
        return ResumableBatchSampler(int(sum(sizes)), batch_size, seed=seed, rank=rank, world_size=world_size)
    return WeightedBatchSampler(sizes, weights, batch_size, seed=seed, rank=rank, world_size=world_size)
