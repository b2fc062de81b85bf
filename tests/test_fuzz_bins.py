"""Seeded, bounded fuzz of the .bin reader: every damaged file reads or raises one of our one-line errors.

Valid small sets of each payload kind (bytes, (N,) and (N, 1) encoded uint8 arrays, (H, W, 3) pixel
arrays, Python-2 str, object arrays) are truncated, bit-flipped, grown, shrunk and given wrong
length fields; ``decode_bin`` must then return or raise BinFormatError / UnreadableFileError, never
anything else, and never hang (each case runs under a 5 s alarm). A few seconds in all.
"""

import os
import pickle
import signal
import struct

import cv2
import numpy as np
import pytest

from data.bins import BinFormatError, decode_bin, write_bin
from utils.files import UnreadableFileError

OUR_ERRORS = (BinFormatError, UnreadableFileError)
CASES_PER_BASE = 70


def _images(n: int, size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _encoded(imgs: list[np.ndarray]) -> list[bytes]:
    return [cv2.imencode(".jpg" if i % 2 else ".png", im)[1].tobytes() for i, im in enumerate(imgs)]


def _bases(tmp_path) -> dict[str, bytes]:
    imgs = _images(22, 8) + _images(2, 16)  # 12 pairs, mixed sizes
    enc = _encoded(imgs)
    issame = [bool(i % 2) for i in range(12)]
    write_bin(tmp_path / "py2.bin", enc, issame, kind="py2str")
    return {
        "bytes p4": pickle.dumps((enc, issame), protocol=4),
        "bytes p0": pickle.dumps((enc, issame), protocol=0),
        "(N,) p2": pickle.dumps(([np.frombuffer(p, np.uint8).copy() for p in enc], np.array(issame)), protocol=2),
        "(N,1) p5": pickle.dumps(([np.frombuffer(p, np.uint8).reshape(-1, 1).copy() for p in enc],
                                  [int(v) for v in issame]), protocol=5),
        "pixels p3": pickle.dumps((imgs[:22] + [im[:8, :8] for im in imgs[22:]], tuple(issame)), protocol=3),
        "object array p1": pickle.dumps((np.array(enc, dtype=object), issame), protocol=1),
        "py2 str": (tmp_path / "py2.bin").read_bytes(),
    }


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        op = int(rng.integers(0, 6))
        pos = int(rng.integers(0, max(1, len(b))))
        if op == 0:  # truncate
            del b[pos:]
        elif op == 1:  # flip bits
            for _ in range(int(rng.integers(1, 8))):
                if b:
                    b[int(rng.integers(0, len(b)))] ^= 1 << int(rng.integers(0, 8))
        elif op == 2:  # insert bytes
            b[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
        elif op == 3:  # delete bytes
            del b[pos:pos + int(rng.integers(1, 64))]
        elif op == 4:  # a wrong 4-byte length (or shape) field, small or huge
            value = int(rng.choice([0, 1, 255, 65535, 1 << 24, 1 << 31, (1 << 32) - 1]))
            b[pos:pos + 4] = struct.pack("<I", value)
        else:  # a wrong 1-byte length (SHORT_BINBYTES, SHORT_BINSTRING, BINPUT/BINGET ...)
            if b:
                b[pos % len(b)] = int(rng.integers(0, 256))
    return bytes(b)


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


def _check(path, case: str) -> None:
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    try:
        images, issame = decode_bin(path, image_size=(8, 8))
        assert images.shape == (2 * len(issame), 8, 8, 3) and images.dtype == np.uint8, case
    except OUR_ERRORS as exc:
        assert "\n" not in str(exc) and str(path) in str(exc), f"{case}: {exc!r}"
    except _Hang:
        pytest.fail(f"{case}: still reading after 5 s")
    except Exception as exc:  # noqa: BLE001 - the point of the test: nothing else may escape
        pytest.fail(f"{case}: {type(exc).__name__}: {exc}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_damaged_bins_read_or_raise_our_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("FACETRAIN_MAX_BIN_GB", "0.25")  # a mutated count never allocates much
    rng = np.random.default_rng(12)
    path = tmp_path / "fuzz.bin"
    for name, base in _bases(tmp_path).items():
        path.write_bytes(base)
        images, issame = decode_bin(path, image_size=(8, 8))  # each base is valid
        assert len(issame) == 12, name
        for k in range(CASES_PER_BASE):
            path.write_bytes(_mutate(base, rng))
            _check(path, f"{name} case {k}")


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_damaged_code_carrying_pickles_never_run_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FACETRAIN_MAX_BIN_GB", "0.25")
    target = tmp_path / "pwned"
    enc = _encoded(_images(24, 8))
    rng = np.random.default_rng(13)
    path = tmp_path / "evil.bin"
    for protocol in (0, 2, 4, 5):
        base = pickle.dumps((enc[:12] + [_Evil(target)] + enc[13:], [True, False] * 6), protocol=protocol)
        path.write_bytes(base)
        with pytest.raises(BinFormatError, match=r"refused to unpickle posix\.system"):
            decode_bin(path, image_size=(8, 8))
        for k in range(25):
            path.write_bytes(_mutate(base, rng))
            _check(path, f"evil protocol {protocol} case {k}")
    assert not target.exists()
