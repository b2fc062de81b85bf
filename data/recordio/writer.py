"""Writing a .rec/.idx pair atomically, chunk for chunk as dmlc-core writes it."""

from __future__ import annotations

import numbers
import os
import struct

from data.recordio.format import LEN_BITS, LEN_MASK, MAGIC_BYTES, encode_record


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
        if len(old) < 8 or old[:4] != MAGIC_BYTES:
            raise ValueError(f"{self.rec_path}: no record starts at byte {offset}")
        old_len = struct.unpack("<I", old[4:])[0] & LEN_MASK
        if (struct.unpack("<I", old[4:])[0] >> LEN_BITS) != 0 or 8 + old_len + (-old_len % 4) != len(encoded):
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
