"""Verification .bin loading against pickles built by hand / by pickle and numpy themselves."""

import os
import pickle
import pickletools
import struct

import cv2
import numpy as np
import pytest

from data.bins import BinFormatError, decode_bin, load_bin, write_bin


def rgb_images(n: int, size: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def png(rgb: np.ndarray) -> bytes:
    """Lossless PNG of an RGB image (OpenCV writes BGR, so flip first)."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    assert ok
    return buf.tobytes()


def py2_stream(items: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2's cPickle.dump((bins, issame), f, protocol=2) wrote, opcode by opcode."""
    out = b"\x80\x02" + b"]q\x00("  # PROTO 2, EMPTY_LIST, BINPUT 0, MARK
    for i, item in enumerate(items):
        if len(item) < 256:
            out += b"U" + bytes([len(item)]) + item  # SHORT_BINSTRING
        else:
            out += b"T" + struct.pack("<i", len(item)) + item  # BINSTRING
        out += b"q" + bytes([i + 1])  # BINPUT
    out += b"e" + b"]q" + bytes([len(items) + 1]) + b"("  # APPENDS, EMPTY_LIST, BINPUT, MARK
    out += b"".join(b"\x88" if v else b"\x89" for v in issame)  # NEWTRUE / NEWFALSE
    return out + b"e\x86q" + bytes([len(items) + 2]) + b"."  # APPENDS, TUPLE2, BINPUT, STOP


@pytest.fixture
def four():
    imgs = rgb_images(4)
    return imgs, [png(im) for im in imgs], [True, False]


def test_py2str_hand_written_stream(tmp_path, four):
    imgs, pngs, issame = four
    small = [png(np.full((8, 8, 3), v, np.uint8)) for v in (10, 200)]  # < 256 bytes: SHORT_BINSTRING
    assert all(len(p) < 256 for p in small) and all(len(p) >= 256 for p in pngs[:2])  # both opcodes used
    items = small + pngs[:2]
    path = tmp_path / "lfw.bin"
    path.write_bytes(py2_stream(items, issame))
    with pytest.raises(UnicodeDecodeError):  # a Python-2 str pickle indeed: default loads cannot read it
        pickle.loads(path.read_bytes())
    bins, same = load_bin(path)
    assert bins == items and same.dtype == bool and same.tolist() == issame
    pixels, _ = decode_bin(path, image_size=(8, 8))
    expected = np.stack([np.full((8, 8, 3), 10, np.uint8), np.full((8, 8, 3), 200, np.uint8), imgs[0], imgs[1]])
    np.testing.assert_array_equal(pixels, expected)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_python3_bytes(tmp_path, four, protocol):
    imgs, pngs, issame = four
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(pickle.dumps((pngs, issame), protocol=protocol))
    bins, same = load_bin(path)
    assert bins == pngs and same.tolist() == issame
    pixels, same = decode_bin(path, image_size=(8, 8))
    assert pixels.dtype == np.uint8 and pixels.shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(pixels, np.stack(imgs))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_arrays_encoded_and_decoded(tmp_path, four, protocol):
    imgs, pngs, issame = four
    items = [np.frombuffer(p, np.uint8).copy() for p in pngs[:3]] + [imgs[3]]  # last one: raw RGB pixels
    path = tmp_path / "cfp_fp.bin"
    path.write_bytes(pickle.dumps((items, issame), protocol=protocol))
    bins, _ = load_bin(path)
    assert [b.tobytes() for b in bins[:3]] == pngs[:3]
    np.testing.assert_array_equal(bins[3], imgs[3])
    pixels, _ = decode_bin(path, image_size=(8, 8))
    np.testing.assert_array_equal(pixels, np.stack(imgs))


def test_grayscale_and_resize(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    ok, buf = cv2.imencode(".png", gray)
    big = rgb_images(1, size=16)[0]
    path = tmp_path / "calfw.bin"
    path.write_bytes(pickle.dumps(([buf.tobytes(), png(big)], [True]), protocol=4))
    pixels, _ = decode_bin(path, image_size=(8, 8))
    np.testing.assert_array_equal(pixels[0], np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(pixels[1], cv2.resize(big, (8, 8), interpolation=cv2.INTER_AREA))


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_reduce_is_refused_not_run(tmp_path, four, protocol):
    target = tmp_path / "pwned"
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps(([four[1][0], _Evil(target)], [True]), protocol=protocol))
    with pytest.raises(BinFormatError, match=r"lfw\.bin: refused to unpickle posix\.system \(only image bytes"):
        load_bin(path)
    assert not target.exists()


def test_hand_made_global_is_refused(tmp_path):
    target = tmp_path / "pwned"
    cmd = f"touch {target}".encode()
    stream = b"\x80\x02cposix\nsystem\nq\x00U" + bytes([len(cmd)]) + cmd + b"\x85R."  # GLOBAL, TUPLE1, REDUCE
    path = tmp_path / "lfw.bin"
    path.write_bytes(stream)
    with pytest.raises(BinFormatError, match=r"refused to unpickle posix\.system"):
        load_bin(path)
    assert not target.exists()
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(BinFormatError, match="refused to unpickle _codecs.encode"):  # only latin-1 is allowed
        load_bin(path)


def test_mismatched_counts(tmp_path, four):
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps((four[1][:3], [True, False]), protocol=4))
    with pytest.raises(BinFormatError, match=r"lfw\.bin: 3 images but 2 pairs"):
        load_bin(path)


def test_missing_truncated_and_undecodable(tmp_path, four):
    with pytest.raises(FileNotFoundError, match=r"nope\.bin: no such \.bin file"):
        load_bin(tmp_path / "nope.bin")
    path = tmp_path / "cut.bin"
    path.write_bytes(pickle.dumps((four[1], four[2]), protocol=4)[:-30])
    with pytest.raises(BinFormatError, match=r"cut\.bin: not a readable pickle"):
        load_bin(path)
    path.write_bytes(pickle.dumps(([four[1][0], b"not an image"], [True]), protocol=4))
    with pytest.raises(BinFormatError, match=r"cut\.bin: item 1 .* not a decodable image"):
        decode_bin(path, image_size=(8, 8))


@pytest.mark.parametrize("kind", ["bytes", "ndarray", "py2str"])
def test_write_bin_round_trip(tmp_path, four, kind):
    imgs, pngs, issame = four
    path = tmp_path / "rt.bin"
    write_bin(path, pngs, issame, kind=kind)
    assert os.listdir(tmp_path) == ["rt.bin"]
    raw = path.read_bytes()
    ops = {op.name for op, _, _ in pickletools.genops(raw)}
    if kind == "py2str":
        assert raw[:2] == b"\x80\x02" and "BINSTRING" in ops and "GLOBAL" not in ops
    bins, same = load_bin(path)
    assert [bytes(b) for b in bins] == pngs and same.tolist() == issame
    pixels, _ = decode_bin(path, image_size=(8, 8))
    np.testing.assert_array_equal(pixels, np.stack(imgs))


@pytest.mark.parametrize("protocol", [2, 5])
def test_numpy1_module_names(tmp_path, four, protocol):
    """numpy 1.x pickles name numpy.core.* where numpy 2.x writes numpy._core.*; rewrite ours to match."""
    imgs, pngs, issame = four
    raw = pickle.dumps(([np.frombuffer(p, np.uint8).copy() for p in pngs], issame), protocol=protocol)
    if protocol == 2:  # GLOBAL opcodes carry newline-terminated text
        old = raw
        raw = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    else:  # SHORT_BINUNICODE (0x8c) carries a length byte; the one FRAME (0x95) its byte count
        old = raw
        n = raw.count(b"\x8c\x13numpy._core.numeric")
        raw = raw.replace(b"\x8c\x13numpy._core.numeric", b"\x8c\x12numpy.core.numeric")
        assert raw[2] == 0x95 and struct.unpack_from("<Q", raw, 3)[0] == len(old) - 11  # a single frame
        raw = raw[:3] + struct.pack("<Q", len(raw) - 11) + raw[11:]
        assert n == 1
    assert raw != old
    path = tmp_path / "old.bin"
    path.write_bytes(raw)
    pixels, _ = decode_bin(path, image_size=(8, 8))
    np.testing.assert_array_equal(pixels, np.stack(imgs))


# Variants seen in re-made files: numpy bools from a comparison, numpy containers, bytearrays.
_ISSAME_VARIANTS = {
    "numpy bools": lambda flags: [np.bool_(v) for v in flags],
    "numpy ints": lambda flags: [np.int64(v) for v in flags],
    "bool array": lambda flags: np.array(flags),
}
_BINS_VARIANTS = {
    "object array": lambda imgs, pngs: np.array(pngs, dtype=object),
    "bytearrays": lambda imgs, pngs: [bytearray(p) for p in pngs],
    "one pixel array": lambda imgs, pngs: np.stack(imgs),
}


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("variant", list(_ISSAME_VARIANTS))
def test_issame_variants(tmp_path, four, protocol, variant):
    imgs, pngs, issame = four
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps((pngs, _ISSAME_VARIANTS[variant](issame)), protocol=protocol))
    pixels, same = decode_bin(path, image_size=(8, 8))
    assert same.dtype == bool and same.tolist() == issame
    np.testing.assert_array_equal(pixels, np.stack(imgs))


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("variant", list(_BINS_VARIANTS))
def test_bins_container_variants(tmp_path, four, protocol, variant):
    imgs, pngs, issame = four
    path = tmp_path / "calfw.bin"
    path.write_bytes(pickle.dumps((_BINS_VARIANTS[variant](imgs, pngs), issame), protocol=protocol))
    pixels, same = decode_bin(path, image_size=(8, 8))
    assert same.tolist() == issame
    np.testing.assert_array_equal(pixels, np.stack(imgs))


@pytest.mark.parametrize("protocol", [2, 4])
def test_float_scalars_are_refused_by_name(tmp_path, four, protocol):
    _, pngs, _ = four
    path = tmp_path / "cplfw.bin"
    path.write_bytes(pickle.dumps((pngs, [np.float64(1), np.float64(0)]), protocol=protocol))
    with pytest.raises(BinFormatError, match=r"cplfw\.bin: refused to unpickle numpy scalar of dtype"):
        load_bin(path)
