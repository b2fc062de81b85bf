"""RecordIO against byte streams built by hand from the format facts (never our writer vs our reader)."""

import os
import pickle
import struct

import numpy as np
import pytest

from data.recordio import (
    MAGIC,
    IRHeader,
    RecordIOError,
    RecordReader,
    RecordWriter,
    encode_record,
    pack_irheader,
    read_idx,
    unpack_irheader,
)

M = struct.pack("<I", 0xCED7230A)


def chunk(cflag: int, body: bytes, pad: bool = True) -> bytes:
    """One on-disk chunk, written out from the facts: magic, lrec, bytes, zero pad to 4."""
    return M + struct.pack("<I", (cflag << 29) | len(body)) + body + (b"\0" * (-len(body) % 4) if pad else b"")


def write_files(tmp_path, blob: bytes, idx_lines: str | None, name: str = "t"):
    rec = tmp_path / f"{name}.rec"
    rec.write_bytes(blob)
    if idx_lines is not None:
        (tmp_path / f"{name}.idx").write_text(idx_lines)
    return str(rec)


def test_magic_constant():
    assert struct.pack("<I", MAGIC) == bytes([0x0A, 0x23, 0xD7, 0xCE])


def test_read_hand_built_unsplit_records(tmp_path):
    bodies = [b"", b"a", b"hello", b"12345678", b"x" * 1001]
    blob, lines, offsets = b"", "", []
    for key, body in zip([10, 11, 12, 13, 14], bodies):
        offsets.append(len(blob))
        lines += f"{key}\t{len(blob)}\n"
        blob += chunk(0, body)
    rec = write_files(tmp_path, blob, lines)
    reader = RecordReader(rec)
    assert len(reader) == 5
    assert reader.keys.tolist() == [10, 11, 12, 13, 14] and reader.offsets.tolist() == offsets
    for key, body in zip([10, 11, 12, 13, 14], bodies):
        assert reader.read(key) == body
    assert reader.read_at(offsets[2]) == b"hello"
    assert list(reader) == list(zip([10, 11, 12, 13, 14], bodies))
    assert reader.contains(np.array([9, 10, 14, 15])).tolist() == [False, True, True, False]
    with pytest.raises(KeyError, match="record key 3 is not in the index"):
        reader.read(3)


@pytest.mark.parametrize(
    "data, expected",
    [
        # aligned magic in the middle: split there, magic dropped, last chunk padded
        (b"AAAA" + M + b"BBBBBB", chunk(1, b"AAAA") + chunk(3, b"BBBBBB")),
        # two hits: first / middle / last chunk
        (b"aaaa" + M + b"bbbb" + M + b"c", chunk(1, b"aaaa") + chunk(2, b"bbbb") + chunk(3, b"c")),
        # magic at offset 0: empty first chunk
        (M + b"tail", chunk(1, b"") + chunk(3, b"tail")),
        # magic in the last 4 bytes: empty last chunk
        (b"12345678" + M, chunk(1, b"12345678") + chunk(3, b"")),
        # the record is only the magic word
        (M, chunk(1, b"") + chunk(3, b"")),
        # unaligned magic is not split
        (b"ab" + M + b"cd", chunk(0, b"ab" + M + b"cd")),
        # magic cut by the end of an unaligned record tail is not split
        (b"abcd" + M[:3], chunk(0, b"abcd" + M[:3])),
    ],
)
def test_encode_record_matches_hand_built_chunks(tmp_path, data, expected):
    assert encode_record(data) == expected
    rec = write_files(tmp_path, expected, "0\t0\n")
    assert RecordReader(rec).read(0) == data


def test_reader_joins_hand_built_split_record_between_others(tmp_path):
    first = chunk(0, b"one")
    split = chunk(1, b"ABCD") + chunk(2, b"") + chunk(3, b"xyz")
    blob = first + split + chunk(0, b"three")
    rec = write_files(tmp_path, blob, f"0\t0\n1\t{len(first)}\n2\t{len(first) + len(split)}\n")
    reader = RecordReader(rec)
    assert reader.read(1) == b"ABCD" + M + M + b"xyz"
    assert reader.read(2) == b"three"
    assert reader.read_prefix(1, 6) == b"ABCD" + M[:2]


def test_scan_without_idx(tmp_path):
    split = chunk(1, b"ABCD") + chunk(3, b"xyz")
    blob = chunk(0, b"zero") + split + chunk(0, b"")
    rec = write_files(tmp_path, blob, None)
    reader = RecordReader(rec)
    assert reader.idx_path is None
    assert reader.keys.tolist() == [0, 1, 2]
    assert reader.offsets.tolist() == [0, 12, 12 + len(split)]
    assert [r for _, r in reader] == [b"zero", b"ABCD" + M + b"xyz", b""]


def test_irheader_scalar_and_array_labels():
    scalar = struct.pack("<IfQQ", 0, 7.0, 42, 0) + b"JPEG"
    assert pack_irheader(IRHeader(0, 7.0, 42, 0), b"JPEG") == scalar
    assert pack_irheader(IRHeader(5, 7, 42, 0), b"JPEG") == scalar  # scalar label forces flag 0, like mxnet
    header, payload = unpack_irheader(scalar)
    assert (header.flag, header.label, header.id, header.id2, payload) == (0, 7.0, 42, 0, b"JPEG")
    assert isinstance(header.label, float)

    arr = struct.pack("<IfQQ", 3, 0.0, 1, 2) + struct.pack("<3f", 3.0, 0.5, -1.0) + b"PNG!"
    assert pack_irheader(IRHeader(0, [3.0, 0.5, -1.0], 1, 2), b"PNG!") == arr
    assert pack_irheader(IRHeader(0, np.array([3, 0.5, -1], np.float64), 1, 2), b"PNG!") == arr
    header, payload = unpack_irheader(arr)
    assert header.flag == 3 and payload == b"PNG!"
    assert header.label.dtype == np.float32 and header.label.tolist() == [3.0, 0.5, -1.0]
    with pytest.raises(RecordIOError, match="flag 3"):
        unpack_irheader(arr[:30])


def test_writer_output_equals_hand_built_bytes_and_idx(tmp_path):
    recs = {5: b"five", 2: b"AAAA" + M + b"B", 9: b""}
    rec = str(tmp_path / "w.rec")
    with RecordWriter(rec) as w:
        got = [w.write(k, v) for k, v in recs.items()]
    expected = [chunk(0, b"five"), chunk(1, b"AAAA") + chunk(3, b"B"), chunk(0, b"")]
    offsets = [0, len(expected[0]), len(expected[0]) + len(expected[1])]
    assert got == offsets
    assert (tmp_path / "w.rec").read_bytes() == b"".join(expected)
    assert (tmp_path / "w.idx").read_text() == f"5\t{offsets[0]}\n2\t{offsets[1]}\n9\t{offsets[2]}\n"
    assert sorted(os.listdir(tmp_path)) == ["w.idx", "w.rec"]  # no temp files left


def test_read_idx_values_and_malformed_line(tmp_path):
    path = tmp_path / "a.idx"
    path.write_bytes(b"0\t0\r\n7\t123456789012\n3\t16")  # CRLF and no final newline are accepted
    keys, offsets = read_idx(path)
    assert keys.dtype == np.int64 and keys.tolist() == [0, 7, 3]
    assert offsets.tolist() == [0, 123456789012, 16]
    path.write_bytes(b"0\t0\n1\t8\n2 16\n")
    with pytest.raises(RecordIOError, match=r"a\.idx line 3"):
        read_idx(path)
    path.write_bytes(b"0\t0\n1\n")
    with pytest.raises(RecordIOError, match=r"a\.idx line 2: missing tab"):
        read_idx(path)


def test_truncated_rec_names_file_key_and_offset(tmp_path):
    blob = chunk(0, b"good") + chunk(0, b"x" * 40)
    rec = write_files(tmp_path, blob[:-10], "0\t0\n1\t12\n", name="train")
    reader = RecordReader(rec)
    assert reader.read(0) == b"good"
    with pytest.raises(RecordIOError, match=r"train\.rec record 1 at byte 12: truncated"):
        reader.read(1)


def test_truncated_split_record(tmp_path):
    rec = write_files(tmp_path, chunk(1, b"ABCD"), "0\t0\n", name="train")
    with pytest.raises(RecordIOError, match=r"train\.rec record 0 at byte 0: truncated"):
        RecordReader(rec).read(0)


def test_idx_offset_past_end(tmp_path):
    rec = write_files(tmp_path, chunk(0, b"good"), "0\t0\n1\t4096\n", name="train")
    with pytest.raises(RecordIOError, match=r"train\.rec record 1 at byte 4096: .*past the end"):
        RecordReader(rec)


def test_bad_magic(tmp_path):
    blob = chunk(0, b"good") + b"\0" * 12
    rec = write_files(tmp_path, blob, "0\t0\n1\t12\n", name="train")
    expected = r"train\.rec record 1 at byte 12: bad magic 0x00000000 \(expected 0xced7230a\)"
    with pytest.raises(RecordIOError, match=expected):
        RecordReader(rec).read(1)


def test_bad_cflag_sequence(tmp_path):
    rec = write_files(tmp_path, chunk(2, b"mid!") + chunk(0, b"oops"), "0\t0\n1\t8\n", name="train")
    reader = RecordReader(rec)
    with pytest.raises(RecordIOError, match=r"train\.rec record 0 at byte 0: bad cflag sequence"):
        reader.read(0)
    rec = write_files(tmp_path, chunk(1, b"head") + chunk(0, b"oops"), "0\t0\n", name="other")
    with pytest.raises(RecordIOError, match=r"other\.rec record 0 .*byte 12: bad cflag sequence"):
        RecordReader(rec).read(0)


def test_writer_exception_leaves_previous_files_intact(tmp_path):
    rec = tmp_path / "keep.rec"
    with RecordWriter(rec) as w:
        w.write(0, b"old")
    before = (rec.read_bytes(), (tmp_path / "keep.idx").read_bytes())
    with pytest.raises(RuntimeError, match="boom"):
        with RecordWriter(rec) as w:
            w.write(0, b"new record that must not appear")
            raise RuntimeError("boom")
    assert (rec.read_bytes(), (tmp_path / "keep.idx").read_bytes()) == before
    assert sorted(os.listdir(tmp_path)) == ["keep.idx", "keep.rec"]


def test_reader_after_pickle_and_in_forked_child(tmp_path):
    bodies = [b"r%d" % i * 3 for i in range(4)]
    blob, lines = b"", ""
    for i, body in enumerate(bodies):
        lines += f"{i}\t{len(blob)}\n"
        blob += chunk(0, body)
    reader = RecordReader(write_files(tmp_path, blob, lines))
    assert reader.read(1) == bodies[1]  # opens the handle in this process
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read(3) == bodies[3]
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    pid = os.fork()
    if pid == 0:  # child: must reopen its own handle and read correctly
        ok = reader.read(2) == bodies[2] and reader._pid == os.getpid()
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert reader.read(0) == bodies[0]


def test_fifo_as_rec_or_idx_is_refused_without_blocking(tmp_path):
    """A FIFO where the .rec or .idx is expected: one error naming it, never a blocked open()."""
    import threading

    from data.recordio import RecordReader
    from utils.files import UnreadableFileError

    rec, idx = tmp_path / "a.rec", tmp_path / "a.idx"
    rec.write_bytes(b"")
    os.mkfifo(idx)
    fifo_rec = tmp_path / "b.rec"
    os.mkfifo(fifo_rec)
    errors = []

    def attempt():
        for args in ((str(rec), str(idx)), (str(fifo_rec), None)):
            try:
                RecordReader(*args)
            except UnreadableFileError as exc:
                errors.append(str(exc))

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "a FIFO blocked the reader"
    assert len(errors) == 2 and "a.idx" in errors[0] and "b.rec" in errors[1] and "FIFO" in errors[1]
