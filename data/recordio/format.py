"""The RecordIO format itself: chunk framing, the magic word, the IRHeader, record encoding.

Format facts
(see shared/reference/FORMATS.md and dmlc-core's ``RecordIOWriter::WriteRecord``):

- a record is stored as one or more chunks: magic ``0xced7230a`` (uint32 LE), ``lrec``
  (uint32 LE: low 29 bits chunk length in bytes, top 3 bits ``cflag``), the chunk bytes,
  then zero padding up to a multiple of 4 bytes;
- the writer looks for the magic word at every 4-byte aligned offset ``i`` of the record
  data with ``i + 4 <= len(data)``; at each hit it ends the current chunk there and
  drops the magic word. cflag 0 = unsplit record, 1 = first chunk, 2 = middle, 3 = last.
  A magic at offset 0 gives an empty first chunk; a magic in the last 4 bytes gives an
  empty last chunk. Only the last chunk can need padding (the others end on a hit, which
  is aligned). A reader joins the chunks and puts the magic word back between them;
- the ``.idx`` line ``key<TAB>offset`` points at the record's first chunk.

A record's data is an IRHeader (struct ``'<IfQQ'``: flag, label, id, id2; 24 bytes),
``flag`` float32 labels when ``flag > 0`` (the header's label field is then 0), then the
payload (usually JPEG bytes).
"""

from __future__ import annotations

import numbers
import struct
from dataclasses import dataclass

import numpy as np

from utils.errors import UserError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LEN_BITS = 29
LEN_MASK = (1 << LEN_BITS) - 1
_IR_STRUCT = struct.Struct("<IfQQ")
IR_SIZE = _IR_STRUCT.size  # 24 bytes


class RecordIOError(UserError, ValueError):
    """A .rec/.idx file that does not follow the RecordIO format; the message names file, record and byte."""


@dataclass(frozen=True)
class IRHeader:
    """The 24-byte image-record header; ``label`` is a float, or a float32 array when ``flag > 0``."""

    flag: int
    label: float | np.ndarray
    id: int = 0
    id2: int = 0


def pack_irheader(header: IRHeader, payload: bytes) -> bytes:
    """Record data for ``header`` + ``payload``, as ``mxnet.recordio.pack`` builds it.

    A scalar label is stored in the header with flag 0 (a given flag is ignored, as in
    mxnet). An array or list label (any length) is stored as ``flag = len(label)`` float32
    values after the header, whose own label field is then 0.
    """
    label = header.label
    if isinstance(label, numbers.Number) or (isinstance(label, np.ndarray) and label.ndim == 0):
        flag, head_label, extra = 0, float(label), b""
    else:
        values = np.asarray(label, dtype="<f4").reshape(-1)
        flag, head_label, extra = int(values.size), 0.0, values.tobytes()
    try:
        head = _IR_STRUCT.pack(flag, head_label, header.id, header.id2)
    except struct.error as exc:
        raise ValueError(f"cannot pack IRHeader {header!r}: {exc}") from exc
    return head + extra + bytes(payload)


def unpack_irheader(record: bytes) -> tuple[IRHeader, bytes]:
    """Split record data into its IRHeader and payload (inverse of :func:`pack_irheader`).

    The label is a Python float when ``flag == 0``, else a float32 array of ``flag`` values.
    """
    if len(record) < IR_SIZE:
        raise RecordIOError(f"record of {len(record)} bytes is shorter than the {IR_SIZE}-byte IRHeader")
    flag, label, rid, rid2 = _IR_STRUCT.unpack_from(record, 0)
    if flag == 0:
        return IRHeader(0, float(label), rid, rid2), bytes(record[IR_SIZE:])
    end = IR_SIZE + 4 * flag
    if len(record) < end:
        raise RecordIOError(
            f"record of {len(record)} bytes is too short for its IRHeader with flag {flag} ({end} bytes needed)"
        )
    values = np.frombuffer(record, dtype="<f4", count=flag, offset=IR_SIZE).astype(np.float32)
    return IRHeader(flag, values, rid, rid2), bytes(record[end:])


def _aligned_magic_positions(data: bytes) -> np.ndarray:
    """Byte offsets ``i % 4 == 0``, ``i + 4 <= len(data)``, where the magic word sits (dmlc's split points)."""
    if MAGIC_BYTES not in data:
        return np.empty(0, dtype=np.int64)
    words = np.frombuffer(data, dtype="<u4", count=len(data) // 4)
    return np.flatnonzero(words == MAGIC).astype(np.int64) * 4


def _chunk(cflag: int, body: bytes) -> bytes:
    if len(body) > LEN_MASK:
        raise ValueError(f"RecordIO chunk of {len(body)} bytes exceeds the 29-bit length limit ({LEN_MASK})")
    return MAGIC_BYTES + struct.pack("<I", (cflag << LEN_BITS) | len(body)) + body


def encode_record(data: bytes) -> bytes:
    """The exact bytes dmlc-core's ``RecordIOWriter::WriteRecord`` puts on disk for ``data``."""
    data = bytes(data)
    cuts = _aligned_magic_positions(data).tolist()
    parts = []
    start = 0
    for n, pos in enumerate(cuts):
        parts.append(_chunk(1 if n == 0 else 2, data[start:pos]))
        start = pos + 4
    parts.append(_chunk(3 if cuts else 0, data[start:]))
    parts.append(b"\0" * (-len(data) % 4))
    return b"".join(parts)
