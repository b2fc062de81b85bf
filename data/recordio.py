"""Pure-Python MXNet RecordIO (``.rec`` + ``.idx``), byte-compatible with dmlc-core.

Why our own: the insightface training sets (MS1M, Glint360K, WebFace, CASIA) ship as
RecordIO packs, and mxnet is no longer installable on current Pythons. Format facts
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
import os
import struct
from array import array
from dataclasses import dataclass
from typing import Iterator

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_BITS = 29
_LEN_MASK = (1 << _LEN_BITS) - 1
_IR_STRUCT = struct.Struct("<IfQQ")
IR_SIZE = _IR_STRUCT.size  # 24 bytes
_READ_AHEAD = 16384  # bytes read with each chunk header: one pread covers a typical 112x112 JPEG
_IDX_BLOCK = 1 << 26  # bytes of .idx text parsed per vectorised block (bounds memory)


class RecordIOError(ValueError):
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
    if _MAGIC_BYTES not in data:
        return np.empty(0, dtype=np.int64)
    words = np.frombuffer(data, dtype="<u4", count=len(data) // 4)
    return np.flatnonzero(words == MAGIC).astype(np.int64) * 4


def _chunk(cflag: int, body: bytes) -> bytes:
    if len(body) > _LEN_MASK:
        raise ValueError(f"RecordIO chunk of {len(body)} bytes exceeds the 29-bit length limit ({_LEN_MASK})")
    return _MAGIC_BYTES + struct.pack("<I", (cflag << _LEN_BITS) | len(body)) + body


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


def _sync_close(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


class RecordWriter:
    """Writes a .rec and its .idx atomically: both appear only when :meth:`close` succeeds.

    ``idx_path=None`` writes ``<rec stem>.idx`` (where :class:`RecordReader` looks for it),
    so a stale index can never sit beside a new .rec. Data goes to ``<path>.tmp`` files that
    are renamed onto the final names on close; if a ``with`` block raises, the temp files
    are deleted and files already at the final paths are left untouched.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = os.fspath(rec_path)
        self.idx_path = os.fspath(idx_path) if idx_path is not None else os.path.splitext(self.rec_path)[0] + ".idx"
        self._rec_tmp = self.rec_path + ".tmp"
        self._idx_tmp = self.idx_path + ".tmp"
        self._rec = open(self._rec_tmp, "wb")
        try:
            self._idx = open(self._idx_tmp, "w", encoding="ascii", newline="\n")
        except BaseException:
            self._rec.close()
            os.remove(self._rec_tmp)
            raise
        self._pos = 0
        self._closed = False

    def write(self, key: int, record: bytes) -> int:
        """Append one record (its data, e.g. from :func:`pack_irheader`); returns its byte offset."""
        if self._closed:
            raise ValueError(f"{self.rec_path}: write after close")
        if isinstance(key, bool) or not isinstance(key, numbers.Integral) or key < 0:
            raise ValueError(f"{self.rec_path}: record key must be a non-negative int, got {key!r}")
        encoded = encode_record(record)
        offset = self._pos
        self._rec.write(encoded)
        self._idx.write(f"{int(key)}\t{offset}\n")
        self._pos += len(encoded)
        return offset

    def overwrite(self, offset: int, record: bytes) -> None:
        """Replace the record written at ``offset`` by one whose encoding has the same length.

        For headers whose values are known only at the end (e.g. insightface's record 0).
        """
        if self._closed:
            raise ValueError(f"{self.rec_path}: overwrite after close")
        encoded = encode_record(record)
        self._rec.flush()
        with open(self._rec_tmp, "rb") as f:
            f.seek(offset)
            old = f.read(8)
        if len(old) < 8 or old[:4] != _MAGIC_BYTES:
            raise ValueError(f"{self.rec_path}: no record starts at byte {offset}")
        old_len = struct.unpack("<I", old[4:])[0] & _LEN_MASK
        if (struct.unpack("<I", old[4:])[0] >> _LEN_BITS) != 0 or 8 + old_len + (-old_len % 4) != len(encoded):
            raise ValueError(f"{self.rec_path}: record at byte {offset} is not an unsplit record of the same size")
        self._rec.seek(offset)
        self._rec.write(encoded)
        self._rec.seek(0, os.SEEK_END)

    def tell(self) -> int:
        """Byte offset the next record will be written at."""
        return self._pos

    def close(self) -> None:
        """Flush, fsync and rename the temp files onto the final paths (.rec first, then .idx)."""
        if self._closed:
            return
        self._closed = True
        try:
            _sync_close(self._rec)
            _sync_close(self._idx)
        except BaseException:
            self._closed = False
            self.abort()
            raise
        os.replace(self._rec_tmp, self.rec_path)
        os.replace(self._idx_tmp, self.idx_path)

    def abort(self) -> None:
        """Drop everything written so far; the final paths are not touched."""
        if self._closed:
            return
        self._closed = True
        for f, tmp in ((self._rec, self._rec_tmp), (self._idx, self._idx_tmp)):
            f.close()
            if os.path.exists(tmp):
                os.remove(tmp)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _idx_error(path: str, block: bytes, pos: int, first_line: int, what: str) -> RecordIOError:
    """RecordIOError for the line of ``block`` holding byte ``pos`` (only built once a block is known bad)."""
    line = block.count(b"\n", 0, pos)
    start = block.rfind(b"\n", 0, pos) + 1
    end = block.find(b"\n", pos)
    content = block[start:end if end >= 0 else len(block)][:60]
    return RecordIOError(f"{path} line {first_line + line}: {what} in {content!r} (expected 'key<TAB>offset')")


def _parse_idx_block(path: str, block: bytes, first_line: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse complete ``key\toffset\n`` lines (``block`` ends with a newline) with whole-array numpy ops.

    The layout is validated first (digits only; separators alternate tab, newline; fields of
    1..18 digits, so int64 cannot overflow), then numpy's C text parser reads the numbers.
    """
    text = np.frombuffer(block, dtype=np.uint8)
    is_sep = (text == 9) | (text == 10)
    bad_byte = np.flatnonzero(~is_sep & ((text < 48) | (text > 57)))
    if bad_byte.size:
        pos = int(bad_byte[0])
        raise _idx_error(path, block, pos, first_line, f"unexpected byte {block[pos:pos + 1]!r}")
    sep_pos = np.flatnonzero(is_sep)
    seps = text[sep_pos]
    widths = np.diff(sep_pos, prepend=-1) - 1
    expected = np.where(np.arange(len(seps)) % 2 == 0, np.uint8(9), np.uint8(10))
    bad = np.flatnonzero((seps != expected) | (widths < 1) | (widths > 18))
    if bad.size:
        j = int(bad[0])
        pos = int(sep_pos[j])
        if seps[j] != expected[j]:
            what = "missing tab" if seps[j] == 10 else "extra tab"
        else:
            what = "empty field" if widths[j] < 1 else "number longer than 18 digits"
        raise _idx_error(path, block, pos, first_line, what)
    values = np.fromstring(block, dtype=np.int64, sep=" ")  # any whitespace separates
    return values[0::2].copy(), values[1::2].copy()


def read_idx(idx_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Keys and byte offsets (int64 arrays, file order) of a ``key<TAB>offset`` .idx file.

    Parsed with numpy on whole blocks of text, so a 10M-line index loads in seconds without
    a Python object per line. Windows line ends are accepted; anything else malformed raises
    RecordIOError naming the file and line number (1-based).
    """
    path = os.fspath(idx_path)
    with open(path, "rb") as f:
        data = f.read()
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    if data and not data.endswith(b"\n"):
        data += b"\n"
    keys, offsets = [], []
    line, start = 1, 0
    while start < len(data):
        stop = data.rfind(b"\n", start, start + _IDX_BLOCK) + 1
        if stop <= start:  # one line longer than a block
            stop = data.index(b"\n", start) + 1
        k, o = _parse_idx_block(path, data[start:stop], line)
        keys.append(k)
        offsets.append(o)
        line += len(k)
        start = stop
    if not keys:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.concatenate(keys), np.concatenate(offsets)


def _read_chunk_header(path: str, head: bytes, pos: int, size: int, where: str) -> tuple[int, int]:
    """(cflag, length) of the chunk whose first bytes are ``head``; checks magic and file bounds."""
    if len(head) < 8:
        raise RecordIOError(f"{path} {where} at byte {pos}: truncated chunk header ({len(head)} of 8 bytes)")
    magic, lrec = struct.unpack_from("<II", head, 0)
    if magic != MAGIC:
        raise RecordIOError(f"{path} {where} at byte {pos}: bad magic 0x{magic:08x} (expected 0x{MAGIC:08x})")
    cflag, length = lrec >> _LEN_BITS, lrec & _LEN_MASK
    if cflag > 3:
        raise RecordIOError(f"{path} {where} at byte {pos}: bad cflag {cflag} (expected 0..3)")
    need = pos + 8 + length + (-length % 4)
    if need > size:
        raise RecordIOError(
            f"{path} {where} at byte {pos}: truncated record (chunk of {length} bytes ends at byte {need}, "
            f"file has {size})"
        )
    return cflag, length


def _check_cflag(path: str, where: str, pos: int, first: bool, cflag: int) -> None:
    if first and cflag not in (0, 1):
        raise RecordIOError(f"{path} {where} at byte {pos}: bad cflag sequence: record starts with cflag {cflag}")
    if not first and cflag not in (2, 3):
        raise RecordIOError(f"{path} {where} at byte {pos}: bad cflag sequence: cflag {cflag} inside a split record")


def scan_offsets(rec_path: str | os.PathLike) -> np.ndarray:
    """Byte offsets of every record of a .rec without an index (one pass over the chunk headers)."""
    path = os.fspath(rec_path)
    size = os.path.getsize(path)
    offsets = array("q")
    pos, first = 0, True
    with open(path, "rb") as f:
        while pos < size:
            f.seek(pos)
            where = f"record {len(offsets) - (0 if first else 1)}"
            cflag, length = _read_chunk_header(path, f.read(8), pos, size, where)
            _check_cflag(path, where, pos, first, cflag)
            if first:
                offsets.append(pos)
            first = cflag in (0, 3)
            pos += 8 + length + (-length % 4)
    if not first:
        raise RecordIOError(f"{path} record {len(offsets) - 1} at byte {pos}: truncated record (last chunk missing)")
    return np.frombuffer(offsets, dtype=np.int64).copy()


class RecordReader:
    """Random access to the records of a .rec file through its .idx.

    ``idx_path=None`` uses ``<rec stem>.idx`` when it exists, else scans the .rec once and
    numbers the records 0..n-1. Safe to share with DataLoader workers: the file is opened
    lazily, reopened after a fork, and not part of the pickled state.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = os.fspath(rec_path)
        if idx_path is None:
            default = os.path.splitext(self.rec_path)[0] + ".idx"
            idx_path = default if os.path.exists(default) else None
        self.idx_path = os.fspath(idx_path) if idx_path is not None else None
        self._size = os.path.getsize(self.rec_path)
        if self.idx_path is None:
            self.offsets = scan_offsets(self.rec_path)
            self.keys = np.arange(len(self.offsets), dtype=np.int64)
        else:
            self.keys, self.offsets = read_idx(self.idx_path)
            past = np.flatnonzero(self.offsets >= self._size)
            if past.size:
                i = int(past[0])
                raise RecordIOError(
                    f"{self.rec_path} record {self.keys[i]} at byte {self.offsets[i]}: offset from {self.idx_path} "
                    f"line {i + 1} is past the end of the file ({self._size} bytes)"
                )
        n = len(self.keys)
        self._dense = bool(n == 0 or (self.keys[0] == 0 and np.array_equal(self.keys, np.arange(n))))
        if self._dense:
            self._order = self._sorted_keys = None
        else:  # duplicate keys: the last line wins, as in mxnet's dict-based index
            self._order = np.argsort(self.keys, kind="stable")
            self._sorted_keys = self.keys[self._order]
        self._file = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        return state

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
        self._pid = None

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def _fd(self) -> int:
        if self._file is None or self._pid != os.getpid():
            self._file = open(self.rec_path, "rb", buffering=0)
            self._pid = os.getpid()
        return self._file.fileno()

    def _pread(self, n: int, pos: int) -> bytes:
        fd = self._fd()
        if hasattr(os, "pread"):
            return os.pread(fd, n, pos)
        os.lseek(fd, pos, os.SEEK_SET)  # pragma: no cover (no pread on Windows)
        return os.read(fd, n)  # pragma: no cover

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``keys`` the index has (vectorised)."""
        keys = np.asarray(keys, dtype=np.int64)
        if self._dense:  # keys 0..n-1: a range check suffices
            return (keys >= 0) & (keys < len(self.keys))
        i = np.clip(np.searchsorted(self._sorted_keys, keys), 0, len(self._sorted_keys) - 1)
        return self._sorted_keys[i] == keys

    def offset_of(self, key: int) -> int:
        """Byte offset of record ``key``; KeyError when the index has no such key."""
        n = len(self.keys)
        if not isinstance(key, (numbers.Integral, np.integer)) or isinstance(key, bool):
            raise KeyError(f"record key {key!r} is not an int (index of {self.rec_path})")
        if self._dense:
            if isinstance(key, (numbers.Integral, np.integer)) and 0 <= key < n:
                return int(self.offsets[key])
        else:
            i = int(np.searchsorted(self._sorted_keys, key, side="right")) - 1
            if i >= 0 and self._sorted_keys[i] == key:
                return int(self.offsets[self._order[i]])
        span = f"keys {self.keys.min()}..{self.keys.max()}" if n else "no keys"
        raise KeyError(f"record key {key!r} is not in the index of {self.rec_path} ({n} records, {span})")

    def _read(self, offset: int, key, limit: int | None = None) -> bytes:
        where = f"record {key}" if key is not None else "record"
        if offset < 0 or offset >= self._size:
            raise RecordIOError(f"{self.rec_path} {where} at byte {offset}: offset is past the end of the file "
                                f"({self._size} bytes)")
        parts: list[bytes] = []
        got = 0
        pos, first = offset, True
        while True:
            ahead = _READ_AHEAD if limit is None else limit + 8
            buf = self._pread(8 + ahead, pos)
            wpos = where if pos == offset else f"{where} (starting at byte {offset}), chunk"
            cflag, length = _read_chunk_header(self.rec_path, buf, pos, self._size, wpos)
            _check_cflag(self.rec_path, wpos, pos, first, cflag)
            want = length if limit is None else min(length, max(limit - got, 0))
            body = buf[8:8 + want]
            if len(body) < want:
                body += self._pread(want - len(body), pos + 8 + len(body))
            if len(body) < want:
                raise RecordIOError(f"{self.rec_path} {wpos} at byte {pos}: truncated record (file shrank?)")
            if not first:
                parts.append(_MAGIC_BYTES)
                got += 4
            parts.append(body)
            got += len(body)
            if cflag in (0, 3) or (limit is not None and got >= limit):
                break
            first = False
            pos += 8 + length + (-length % 4)
            if pos >= self._size:
                raise RecordIOError(f"{self.rec_path} {where} at byte {offset}: truncated record "
                                    f"(split record ends at end of file without its last chunk)")
        data = b"".join(parts)
        return data if limit is None else data[:limit]

    def read(self, key: int) -> bytes:
        """The whole record data of ``key`` (chunks joined, magic words put back)."""
        return self._read(self.offset_of(key), key)

    def read_at(self, offset: int) -> bytes:
        """The record data starting at byte ``offset`` of the .rec."""
        return self._read(int(offset), None)

    def read_prefix(self, key: int, nbytes: int) -> bytes:
        """At most the first ``nbytes`` of record ``key`` (e.g. its IRHeader), without reading the payload."""
        return self._read(self.offset_of(key), key, limit=nbytes)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        for i in range(len(self.keys)):
            key = int(self.keys[i])
            yield key, self._read(int(self.offsets[i]), key)
