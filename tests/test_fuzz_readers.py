"""Bounded, seeded fuzz of the readers of untrusted packs and lists: every damaged input either reads
or raises one of our own one-line error types, never another exception, never hangs.

The pristine inputs are built byte by byte from shared/reference/FORMATS.md (not by our writer).
"""

import os
import random
import signal
import struct

import numpy as np
import pytest

from data.facerec import FaceRec
from data.lst import read_lst
from data.recordio import RecordIOError, RecordReader, read_idx
from data.sources import DataSourceError
from utils.files import UnreadableFileError

OURS = (RecordIOError, DataSourceError, UnreadableFileError)
MAGIC = 0xCED7230A
CASES = 150  # per reader; the whole file runs in a few seconds
SECONDS = 5  # per case: a reader that takes longer is taken to hang


def chunk(cflag: int, body: bytes) -> bytes:
    return struct.pack("<II", MAGIC, (cflag << 29) | len(body)) + body + b"\0" * (-len(body) % 4)


def record(flag_values, label: float, payload: bytes) -> bytes:
    if flag_values:
        return struct.pack("<IfQQ", len(flag_values), 0.0, 0, 0) + struct.pack(f"<{len(flag_values)}f",
                                                                             *flag_values) + payload
    return struct.pack("<IfQQ", 0, label, 0, 0) + payload


def pristine_pack() -> tuple[bytes, bytes, bytes]:
    """(rec, idx, property): insightface layout, 3 classes x 2 images, one record split in two chunks."""
    images = [(1 + i, i // 2, b"\xff\xd8\xff\xe0" + bytes([i]) * (5 + 3 * i)) for i in range(6)]
    images[2] = (3, 1, struct.pack("<I", MAGIC) + images[2][2])  # the magic at an aligned offset: stored split
    recs = {0: record([7, 10], 0, b"")}
    for key, c, payload in images:
        recs[key] = record(None, c, payload)
    for c in range(3):
        recs[7 + c] = record([1 + 2 * c, 3 + 2 * c], 0, b"")
    blob, idx = b"", ""
    for key, data in recs.items():
        idx += f"{key}\t{len(blob)}\n"
        if key == 3:  # cflag 1 + 3: split where the magic word sits (offset 24), the magic dropped
            blob += chunk(1, data[:24]) + chunk(3, data[28:])
        else:
            blob += chunk(0, data)
    return blob, idx.encode(), b"3,112,112\n"


def mutate(r: random.Random, rec: bytes, idx: bytes, prop: bytes) -> tuple[bytes, bytes, bytes]:
    rec, idx = bytearray(rec), bytearray(idx)
    kind = r.randrange(8)
    if kind == 0:  # truncation
        rec = rec[:r.randrange(len(rec))]
    elif kind == 1:  # bit flips
        for _ in range(r.randint(1, 4)):
            i = r.randrange(len(rec))
            rec[i] ^= 1 << r.randrange(8)
    elif kind == 2:  # a chunk header's length or flag word, or an IRHeader field, overwritten
        i = r.randrange(len(rec) // 4) * 4
        rec[i:i + 4] = struct.pack("<I", r.choice([0, 1, 3, 1 << 29, (1 << 32) - 1, r.getrandbits(32)]))
    elif kind == 3:  # a float label overwritten
        i = r.randrange(len(rec) // 4) * 4
        rec[i:i + 4] = struct.pack("<f", r.choice([float("inf"), float("nan"), -1.0, 3e9, 1e12, 1e38, 0.5]))
    elif kind == 4:  # a bad .idx line
        lines = idx.decode().splitlines()
        j = r.randrange(len(lines))
        key, off = lines[j].split("\t")
        other = lines[r.randrange(len(lines))].split("\t")[1]
        lines[j] = r.choice([f"{key}\t{other}", f"{key}\t{r.randrange(len(rec) + 8)}", f"{key}", "", f"x\t{off}",
                             f"{key}\t{off}\t9", f"{key}\t{10 ** 17}", f"-{key}\t{off}", f"{key} {off}",
                             f"{r.randrange(20)}\t{off}"])
        idx = bytearray(("\n".join(lines) + "\n").encode())
    elif kind == 5:  # .idx truncated
        idx = idx[:r.randrange(len(idx) + 1)]
    elif kind == 6:  # property damaged
        prop = r.choice([b"1000000000000,112,112", b"-3,112,112", b"inf,112,112", b"3,0,0", b"", b"3,112",
                         b"9" * 40 + b",1,1", b"\xff\xfe\x00"])
    else:  # random bytes spliced in
        i = r.randrange(len(rec))
        rec[i:i] = bytes(r.getrandbits(8) for _ in range(r.randint(1, 12)))
    return bytes(rec), bytes(idx), prop


def _timeout(*_):
    raise TimeoutError("reader did not finish")


@pytest.fixture
def deadline():
    """SIGALRM per case where available (Unix), so a hang fails the test instead of the run."""
    if not hasattr(signal, "SIGALRM"):
        yield lambda: None
        return
    old = signal.signal(signal.SIGALRM, _timeout)
    yield lambda: signal.alarm(SECONDS)
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def read_everything(folder) -> None:
    rec_path = os.path.join(folder, "train.rec")
    read_idx(os.path.join(folder, "train.idx"))
    with RecordReader(rec_path) as reader:
        for _ in reader:  # every record the index names, by offset
            pass
    ds = FaceRec(rec_path, progress=False)
    for i in range(len(ds)):
        ds.read(i)
    assert len(ds.labels) == len(ds.image_keys) and (len(ds) == 0 or 0 <= ds.labels.min() <= ds.labels.max())


def test_pristine_pack_reads_as_the_facts_say(tmp_path):
    rec, idx, prop = pristine_pack()
    for name, data in (("train.rec", rec), ("train.idx", idx), ("property", prop)):
        (tmp_path / name).write_bytes(data)
    ds = FaceRec(str(tmp_path / "train.rec"), progress=False)
    assert ds.layout == "insightface" and ds.labels.tolist() == [0, 0, 1, 1, 2, 2] and ds.num_classes == 3
    assert ds.read(2)[0] == struct.pack("<I", MAGIC) + b"\xff\xd8\xff\xe0" + bytes([2]) * 11  # rejoined


def test_damaged_packs_read_or_raise_our_errors(tmp_path, deadline):
    base = pristine_pack()
    outcomes = {"read": 0, "refused": 0}
    for case in range(CASES):
        r = random.Random(case)
        rec, idx, prop = mutate(r, *base)
        folder = tmp_path / f"c{case}"
        folder.mkdir()
        for name, data in (("train.rec", rec), ("train.idx", idx), ("property", prop)):
            (folder / name).write_bytes(data)
        deadline()
        try:
            read_everything(str(folder))
            outcomes["read"] += 1
        except OURS:
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001 (what the test exists to catch)
            pytest.fail(f"case {case}: {type(exc).__name__}: {exc}")
    assert outcomes["read"] and outcomes["refused"]  # the fuzz reaches both sides


LST_TOKENS = ["0", "1", "2.000000", "17", "-1", "1.5", "inf", "-inf", "nan", "1e300", "3e9", "9" * 30, "",
              "x", "\t", " ", "img/a.png", "../a.png", "/abs.png", "\x00", "\udcff.png", "0x10", "1_000"]


def test_damaged_lst_files_read_or_raise_our_errors(tmp_path, deadline):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    for case in range(CASES):
        r = random.Random(1000 + case)
        lines = []
        for _ in range(r.randint(0, 4)):
            n = r.randint(1, 5)
            sep = r.choice(["\t", " ", "\t"])
            lines.append(sep.join(r.choice(LST_TOKENS) for _ in range(n)))
        path = tmp_path / f"c{case}.lst"
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(r.choice(["\n", "\r\n"]).join(lines))
        deadline()
        try:
            lst = read_lst(str(path))
            assert lst.labels.dtype == np.int64 and (lst.labels >= 0).all()
        except OURS:
            pass
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"case {case}: {type(exc).__name__}: {exc} for {lines!r}")
