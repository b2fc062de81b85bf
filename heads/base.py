"""The margin-head surface shared by every head.

A head owns the class-centre matrix ``weight`` (rows x embedding_size) and turns
un-normalised embeddings plus labels into float32 logits for a softmax loss. Its
forward is split in two so a sharded softmax (Partial FC) can reuse the margin on
a slice of the classes:

    cos = head.cosine(embeddings, weight_shard)          # (B, C_shard), in [-1, 1]
    logits = head.margin_logits(cos, local_labels, norms)

``local_labels`` index into that shard's columns; -1 means "this row's class lives
in another shard": the row is only scaled, no margin is applied. ``norms`` are the
L2 norms (B, 1) of the un-normalised embeddings (feature magnitudes, used by
SphereFace, AdaFace and MagFace).

Angles are in radians everywhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from typing import Any, Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.registry import Registry

HEADS = Registry("head")
register = HEADS.register


# Sanity bounds on the sizes a head allocates (checked before allocating): 10^8 classes is 50x the
# largest public training set (WebFace42M, 2M identities); 65536 is the backbones' embedding cap.
MAX_CLASSES = 100_000_000
MAX_EMBEDDING_SIZE = 65536
CENTRE_STD = 0.01  # initial centres ~ N(0, 0.01^2) per coordinate
_INIT_BLOCK = 1024  # rows drawn per seeded block (see centre_rows)
_DEFERRED = contextvars.ContextVar("facetrain_deferred_centres", default=False)


def centre_rows(first: int, last: int, dim: int, seed: int) -> Tensor:
    """Initial rows ``first .. last-1`` (float32) of the centre matrix of a head seeded ``seed``.

    Drawn in blocks of 1024 rows, each from its own generator seeded by (seed, block), so
    any range of rows is a function of the range alone: a Partial FC shard draws only its
    rows, yet holds exactly what the full matrix has there, whatever the number of shards.
    """
    if not 0 <= first <= last:
        raise ValueError(f"centre_rows: need 0 <= first <= last, got {first}, {last}")
    out = torch.empty(last - first, dim, device="cpu")
    for block in range(first // _INIT_BLOCK, -(-last // _INIT_BLOCK)):
        lo, hi = block * _INIT_BLOCK, (block + 1) * _INIT_BLOCK
        g = torch.Generator().manual_seed((seed * 0x9E3779B1 + block) % (1 << 63))
        rows = torch.randn(_INIT_BLOCK, dim, generator=g, device="cpu").mul_(CENTRE_STD)
        a, b = max(first, lo), min(last, hi)
        out[a - first:b - first] = rows[a - lo:b - lo]
    return out


@contextlib.contextmanager
def deferred_centres() -> Iterator[None]:
    """Heads built inside leave their centre matrix unallocated (on the meta device).

    For Partial FC at millions of classes: the wrapper then creates only its shard's rows
    (``centre_rows``), instead of every process drawing the full matrix (4 GB at 2M x 512)
    to keep a slice of it. A deferred head cannot run on its own.
    """
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


class HeadOutput(NamedTuple):
    """``logits`` (B, C) float32; ``extra_loss`` a weighted scalar to add to the loss, or None."""

    logits: Tensor
    extra_loss: Tensor | None = None


class MarginHead(nn.Module):
    """Base class: normalised class centres, cosine logits, a margin on the target column.

    Subclasses implement :meth:`margin_logits`; heads with a feature-norm regulariser
    override :meth:`extra_loss`. ``rows_per_class`` is how many rows of ``weight``
    belong to one class (sub-centres), stored class-major: class ``c`` owns rows
    ``c*K .. c*K+K-1``, so sharding by class is slicing contiguous rows.
    """

    rows_per_class: int = 1

    def __init__(self, embedding_size: int, num_classes: int) -> None:
        super().__init__()
        name = type(self).__name__
        embedding_size = check_int(name, "embedding_size", embedding_size, 1, MAX_EMBEDDING_SIZE)
        num_classes = check_int(name, "num_classes", num_classes, 1, MAX_CLASSES)
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        # one draw from torch's RNG (so torch.manual_seed decides the centres), then seeded blocks
        self.init_seed = int(torch.randint(0, 1 << 62, (), device="cpu"))
        rows = num_classes * self.rows_per_class
        if _DEFERRED.get():
            self.weight = nn.Parameter(torch.empty(rows, embedding_size, device="meta"))
        else:
            self.weight = nn.Parameter(centre_rows(0, rows, embedding_size, self.init_seed))

    def forward(self, embeddings: Tensor, labels: Tensor) -> HeadOutput:
        """Logits for ``embeddings`` (B, D), un-normalised, and ``labels`` (B,) int64.

        Computed in float32 (float64 if the head was converted with ``.double()``)
        with autocast switched off: margins on cosines near +-1 do not survive half
        precision.
        """
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"{type(self).__name__}: embeddings must be (B, {self.embedding_size}), "
                             f"got {tuple(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"{type(self).__name__}: labels must be ({embeddings.shape[0]},), "
                             f"got {tuple(labels.shape)}")
        dtype = torch.promote_types(torch.promote_types(embeddings.dtype, self.weight.dtype), torch.float32)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = embeddings.to(dtype)
            norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
            cos = self.cosine(x, self.weight.to(dtype))
            logits = self.margin_logits(cos, labels, norms)
            return HeadOutput(logits, self.extra_loss(norms))

    def cosine(self, embeddings: Tensor, weight: Tensor) -> Tensor:
        """Cosine (B, rows) between each embedding and each row of ``weight``, clamped to [-1, 1]."""
        cos = F.linear(F.normalize(embeddings, dim=1), F.normalize(weight, dim=1))
        return cos.clamp(-1.0, 1.0)

    def margin_logits(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        """Logits from cosines: margin on column ``labels[i]`` of row i (none where -1), then scale."""
        raise NotImplementedError

    def extra_loss(self, norms: Tensor) -> Tensor | None:
        """An already-weighted scalar added to the loss (e.g. MagFace's norm regulariser)."""
        return None

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}"


def gather_target(cos: Tensor, labels: Tensor) -> Tensor:
    """Column ``labels[i]`` of each row as (B, 1); rows with label -1 give column 0 (a placeholder)."""
    return cos.gather(1, labels.clamp(min=0).unsqueeze(1))


def put_target(logits: Tensor, labels: Tensor, target: Tensor) -> Tensor:
    """``logits`` with column ``labels[i]`` of row i replaced by ``target[i]`` (B, 1); label -1 rows unchanged.

    Out of place and without boolean indexing (no host sync on CUDA); gradients are
    exact: the replaced entries get none, the rest pass through.
    """
    valid = (labels >= 0).unsqueeze(1)
    index = labels.clamp(min=0).unsqueeze(1)
    keep = logits.gather(1, index)
    return logits.scatter(1, index, torch.where(valid, target.to(logits.dtype), keep))


def check_real(head: str, key: str, value: Any, rule: str, ok: Callable[[float], bool]) -> float:
    """``value`` as a float if it is a finite real number with ``ok(value)``.

    TypeError for a non-number (a bool or a string from JSON head kwargs), ValueError for
    nan/inf or a value outside the range; both name the head, the parameter and the rule
    (e.g. "arcface: m must be a finite number in [0, pi) radians, got 5.0"), raised before
    anything is allocated.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{head}: {key} must be a number {rule}, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and ok(v)):
        raise ValueError(f"{head}: {key} must be a finite number {rule}, got {value!r}")
    return v


def check_int(head: str, key: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int if it is an integer (not a bool, not 3.5) in [low, high]; else TypeError/ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{head}: {key} must be an integer in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{head}: {key} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def check_bool(head: str, key: str, value: Any) -> bool:
    """``value`` if it is a bool: JSON ``"false"`` (a string) would otherwise read as True."""
    if not isinstance(value, bool):
        raise TypeError(f"{head}: {key} must be true or false, got {value!r}")
    return value


def check_positive(head: str, **values: Any) -> None:
    """ValueError (TypeError for a non-number) naming the head and the parameter unless each value is finite, > 0."""
    for key, value in values.items():
        check_real(head, key, value, "> 0", lambda v: v > 0)
