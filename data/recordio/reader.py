"""Reading .rec files: the .idx index (vectorised), or a scan of the chunk headers, then random access."""

from __future__ import annotations

import numbers
import os
import struct
from array import array
from typing import Iterator

import numpy as np

from data.recordio.format import LEN_BITS, LEN_MASK, MAGIC, MAGIC_BYTES, RecordIOError
from utils.files import check_regular, read_regular

_READ_AHEAD = 16384  # bytes read with each chunk header: one pread covers a typical 112x112 JPEG
_IDX_BLOCK = 1 << 26  # bytes of .idx text parsed per vectorised block (bounds memory)


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


def _parse_idx_lines(path: str, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The tolerant, line-by-line parse: each line stripped, blank lines skipped, as mxnet's
    ``line.strip().split('\t')`` and other readers do (hand-edited or concatenated indexes)."""
    keys, offsets = array("q"), array("q")
    for n, raw in enumerate(data.split(b"\n"), start=1):
        line = raw.strip()
        if not line:
            continue
        fields = line.split(b"\t")
        if len(fields) == 2 and all(f.isdigit() and len(f) <= 18 for f in fields):  # 18 digits: no int64 overflow
            keys.append(int(fields[0]))
            offsets.append(int(fields[1]))
            continue
        bad = next((f for f in fields if not f.isdigit()), None)
        if len(fields) != 2:
            what = "missing tab" if len(fields) == 1 else "extra tab"
        elif bad == b"":
            what = "empty field"
        elif bad is not None:
            what = f"unexpected byte {next(bytes([c]) for c in bad if not 48 <= c <= 57)!r}"
        else:
            what = "number longer than 18 digits"
        raise RecordIOError(f"{path} line {n}: {what} in {raw[:60]!r} (expected 'key<TAB>offset')")
    return np.frombuffer(keys, dtype=np.int64).copy(), np.frombuffer(offsets, dtype=np.int64).copy()


def read_idx(idx_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Keys and byte offsets (int64 arrays, file order) of a ``key<TAB>offset`` .idx file.

    Parsed with numpy on whole blocks of text, so a 10M-line index loads in seconds without
    a Python object per line. Windows (CRLF) and old Mac (CR) line ends are accepted; a file
    that the fast parse refuses is parsed again line by line with blank lines and whitespace
    around a line ignored (as mxnet reads it); anything else malformed raises RecordIOError
    naming the file and line number (1-based).
    """
    path = os.fspath(idx_path)
    data = read_regular(path, ".idx file")  # a FIFO or a device is refused, never read forever
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    data = data.rstrip(b"\n") + b"\n" if data.strip() else b""  # trailing blank lines: the fast parse still applies
    try:
        return _parse_idx_blocks(path, data)
    except RecordIOError:
        return _parse_idx_lines(path, data)


def _parse_idx_blocks(path: str, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The fast parse of canonical ``key\toffset\n`` text, block by block."""
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
    cflag, length = lrec >> LEN_BITS, lrec & LEN_MASK
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

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None,
                 indexed: bool = True):
        """``indexed=False``: no index read and no scan (no records by number): ``read_at(offset)`` only."""
        self.rec_path = os.fspath(rec_path)
        if not indexed:
            idx_path = None
        elif idx_path is None:
            default = os.path.splitext(self.rec_path)[0] + ".idx"
            idx_path = default if os.path.exists(default) else None
        self.idx_path = os.fspath(idx_path) if idx_path is not None else None
        self._size = check_regular(self.rec_path, ".rec file")
        if not indexed:
            self.offsets = self.keys = np.empty(0, dtype=np.int64)
        elif self.idx_path is None:
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
                parts.append(MAGIC_BYTES)
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
