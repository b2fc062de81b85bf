"""Verification .bin loading against pickles built by hand / by pickle and numpy themselves."""

import io
import os
import pickle
import pickletools
import struct

import cv2
import numpy as np
import pytest

from data.bins import BinFormatError, decode_bin, load_bin, write_bin
from utils.files import UnreadableFileError


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


# ---- payload layouts, protocols 0-5 and container kinds other tools write ----------------------------------

def twelve_pairs() -> tuple[list[np.ndarray], list[bytes], list[bool]]:
    imgs = rgb_images(24)
    return imgs, [png(im) for im in imgs], [bool(i % 3) for i in range(12)]


_LAYOUTS = {
    "bytes": lambda p: p,
    "(N,)": lambda p: np.frombuffer(p, np.uint8).copy(),
    "(N, 1)": lambda p: np.frombuffer(p, np.uint8).reshape(-1, 1).copy(),  # insightface's own test .bin
    "(1, N)": lambda p: np.frombuffer(p, np.uint8).reshape(1, -1).copy(),
    "(N, 1) Fortran": lambda p: np.asfortranarray(np.frombuffer(p, np.uint8).reshape(-1, 1)),
}
_ISSAME_KINDS = {
    "list of bools": list,
    "tuple of bools": tuple,
    "list of 0/1": lambda f: [int(v) for v in f],
    "bool array": np.array,
    "int64 array": lambda f: np.array(f, np.int64),
    "int32 array": lambda f: np.array(f, np.int32),
    "uint8 array": lambda f: np.array(f, np.uint8),
}


@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("layout", list(_LAYOUTS))
def test_encoded_payload_layouts_at_every_protocol(tmp_path, protocol, layout):
    imgs, pngs, issame = twelve_pairs()
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps(([_LAYOUTS[layout](p) for p in pngs], issame), protocol=protocol))
    items, same = load_bin(path)
    assert [bytes(x) if isinstance(x, bytes) else x.tobytes() for x in items] == pngs
    assert all(isinstance(x, bytes) or x.ndim == 1 for x in items)  # what unpack and inspect expect
    assert same.tolist() == issame
    pixels, _ = decode_bin(path, image_size=(8, 8))
    np.testing.assert_array_equal(pixels, np.stack(imgs))


def test_insightface_style_column_arrays_hand_written_opcodes(tmp_path):
    """A (N, 1) uint8 array as numpy 1.x protocol 2 writes it: _reconstruct + BUILD with latin-1 text data."""
    _, pngs, issame = twelve_pairs()

    def column(p: bytes) -> bytes:
        text = p.decode("latin-1").encode("utf-8")
        return (  # _reconstruct(ndarray, (0,), b'b'), then BUILD (1, (len, 1), dtype('u1'), False, data)
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
            b"(K\x01M" + struct.pack("<H", len(p)) + b"K\x01\x86cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R"
            b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
            b"c_codecs\nencode\nX" + struct.pack("<I", len(text)) + text + b"X\x06\x00\x00\x00latin1\x86Rtb")

    stream = b"\x80\x02](" + b"".join(column(p) for p in pngs) + b"e](" + b"".join(
        b"\x88" if v else b"\x89" for v in issame) + b"e\x86."
    assert all(len(p) < 65536 for p in pngs)
    ref = pickle.loads(stream, encoding="bytes")  # the reference reader agrees on what the stream holds
    assert ref[0][0].shape == (len(pngs[0]), 1) and ref[0][0].dtype == np.uint8
    path = tmp_path / "lfw.bin"
    path.write_bytes(stream)
    items, same = load_bin(path)
    assert [x.tobytes() for x in items] == pngs and same.tolist() == issame


@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("kind", list(_ISSAME_KINDS))
def test_issame_kinds_and_tuple_payloads_at_every_protocol(tmp_path, protocol, kind):
    _, pngs, issame = twelve_pairs()
    path = tmp_path / "cfp_fp.bin"
    path.write_bytes(pickle.dumps((tuple(pngs), _ISSAME_KINDS[kind](issame)), protocol=protocol))
    items, same = load_bin(path)
    assert items == pngs and same.dtype == bool and same.tolist() == issame


@pytest.mark.parametrize("protocol", range(6))
def test_object_array_and_pixel_arrays_at_every_protocol(tmp_path, protocol):
    imgs, pngs, issame = twelve_pairs()
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(pickle.dumps((np.array(pngs, dtype=object), issame), protocol=protocol))
    np.testing.assert_array_equal(decode_bin(path, image_size=(8, 8))[0], np.stack(imgs))
    path.write_bytes(pickle.dumps((imgs, issame), protocol=protocol))  # (H, W, 3) pixels
    np.testing.assert_array_equal(decode_bin(path, image_size=(8, 8))[0], np.stack(imgs))


@pytest.mark.parametrize("bad, what", [
    (np.zeros((10, 2), np.uint8), r"array uint8 \(10, 2\)"),
    (np.zeros((8, 8, 4), np.uint8), r"array uint8 \(8, 8, 4\)"),
    (np.zeros((0, 8, 3), np.uint8), r"array uint8 \(0, 8, 3\)"),
    (np.zeros((5, 1, 1), np.uint8), r"array uint8 \(5, 1, 1\)"),
    (np.zeros(10, np.int16), r"array int16 \(10,\)"),
    (np.zeros((8, 8, 3), np.float32), r"array float32 \(8, 8, 3\)"),
    ("text", "str"),
    (None, "NoneType"),
])
def test_other_items_refused_by_index_dtype_and_shape(tmp_path, bad, what):
    _, pngs, issame = twelve_pairs()
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps((pngs[:5] + [bad] + pngs[6:], issame), protocol=4))
    with pytest.raises(BinFormatError, match=rf"lfw\.bin: item 5 is {what}; expected image bytes"):
        load_bin(path)


@pytest.mark.parametrize("issame, what", [
    (np.zeros((3, 4), bool), r"issame_list is array bool \(3, 4\)"),
    ([2] * 12, r"issame_list item 0 is 2 \(int\), expected a bool or 0/1"),
    ([1.0] * 12, r"issame_list item 0 is 1.0 \(float\)"),
    ([[[[[[[[True]]]]]]]] + [True] * 11, r"issame_list item 0 is \[\[\[\[\[\[\[\.\.\.\]\]\]\]\]\]\] \(list\)"),
])
def test_bad_issame_refused_by_name(tmp_path, issame, what):
    _, pngs, _ = twelve_pairs()
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps((pngs, issame), protocol=4))
    with pytest.raises(BinFormatError, match=rf"lfw\.bin: {what}"):
        load_bin(path)


# ---- sizes are checked before anything is allocated --------------------------------------------------------

def test_memo_references_to_one_payload_are_counted_before_decoding(tmp_path):
    payload = b"\xff\xd8\xff" + bytes(64 << 10)  # one 64 KB "image" referenced 400k times through the memo
    path = tmp_path / "bomb.bin"
    path.write_bytes(pickle.dumps(([payload] * 400_000, [True, False] * 100_000), protocol=4))
    assert path.stat().st_size < 4 << 20
    with pytest.raises(BinFormatError, match=r"bomb\.bin: 400000 items reference 24\.4 GB of image data "
                                             r"\(1 distinct objects in a [0-9.]+ MB file\), over the 8 GB limit"):
        load_bin(path)


def test_decoded_size_is_checked_before_allocating(tmp_path):
    jpg = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    path = tmp_path / "many.bin"
    path.write_bytes(pickle.dumps(([jpg] * 400_000, [True, False] * 100_000), protocol=4))
    assert len(load_bin(path)[0]) == 400_000  # the payload bytes are small: readable ...
    with pytest.raises(BinFormatError, match=r"many\.bin: 400000 images of 112x112x3 would decode to 14\.0 GB, "
                                             r"over the 8 GB limit \(set \$FACETRAIN_MAX_BIN_GB"):
        decode_bin(path)  # ... but 2N x 112 x 112 x 3 bytes is refused, before np.empty


def test_size_limit_env(tmp_path, monkeypatch):
    _, pngs, issame = twelve_pairs()
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps((pngs, issame), protocol=4))
    monkeypatch.setenv("FACETRAIN_MAX_BIN_GB", str(1000 / (1 << 30)))  # 1000 bytes
    with pytest.raises(BinFormatError, match=r"lfw\.bin: 0\.0 GB, over the .* GB limit for a \.bin"):
        load_bin(path)
    monkeypatch.setenv("FACETRAIN_MAX_BIN_GB", "lots")
    with pytest.raises(UnreadableFileError, match=r"FACETRAIN_MAX_BIN_GB='lots' is not a number"):
        load_bin(path)


def png_header(width: int, height: int) -> bytes:
    """A PNG signature + IHDR (8-bit RGB) + one tiny IDAT + IEND, built by hand (valid CRCs)."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real 8x8 JPEG whose SOF0 header is patched to claim ``width`` x ``height``."""
    data = bytearray(cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("huge, claim", [(png_header(100_000, 100_000), "100000x100000"),
                                         (jpeg_claiming(65_000, 60_000), "65000x60000")])
def test_huge_claimed_image_refused_undecoded(tmp_path, huge, claim):
    _, pngs, issame = twelve_pairs()
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps((pngs[:3] + [huge] + pngs[4:], issame), protocol=4))
    with pytest.raises(BinFormatError, match=rf"lfw\.bin: item 3: its header claims {claim} pixels"):
        decode_bin(path, image_size=(8, 8))


def test_cv2_error_becomes_one_line(tmp_path, monkeypatch):
    """Where the header is not read (here: switched off), OpenCV's own refusal is reported, not raised."""
    import data.bins

    monkeypatch.setattr(data.bins, "oversize", lambda payload: None)
    _, pngs, issame = twelve_pairs()
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps(([png_header(100_000, 100_000)] + pngs[1:], issame), protocol=4))
    with pytest.raises(BinFormatError) as info:
        decode_bin(path, image_size=(8, 8))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}: item 0 (") and "not a decodable image (OpenCV:" in msg


def test_encoded_dimensions_against_pillow(tmp_path):
    from data.imageformat import encoded_dimensions

    Image = pytest.importorskip("PIL.Image")  # an independent header reader
    rgb = np.random.default_rng(0).integers(0, 256, (5, 9, 3), dtype=np.uint8)  # 5 high, 9 wide
    for ext in (".png", ".jpg", ".bmp"):
        data = cv2.imencode(ext, rgb)[1].tobytes()
        w, h = Image.open(io.BytesIO(data)).size
        assert encoded_dimensions(data) == (h, w) == (5, 9), ext
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="GIF")
    assert encoded_dimensions(buf.getvalue()) == (5, 9)
    progressive = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    assert encoded_dimensions(progressive) == (5, 9)
    assert encoded_dimensions(b"\xff\xd8\xff") is None and encoded_dimensions(b"RIFF....WEBP") is None


# ---- pair counts, special files, refused code ---------------------------------------------------------------

@pytest.mark.parametrize("pairs", [0, 1, 5, 9])
def test_fewer_than_10_pairs_refused_when_asked(tmp_path, pairs):
    _, pngs, issame = twelve_pairs()
    path = tmp_path / "tiny.bin"
    path.write_bytes(pickle.dumps((pngs[:2 * pairs], issame[:pairs]), protocol=4))
    assert len(load_bin(path)[1]) == pairs  # unpack and inspect still read it
    with pytest.raises(BinFormatError, match=rf"tiny\.bin: {pairs} pairs?; needs at least 10 pairs for "
                                             r"10-fold verification"):
        decode_bin(path, image_size=(8, 8), min_pairs=10)


def test_fifo_and_device_refused_unread(tmp_path):
    from utils.files import UnreadableFileError

    os.mkfifo(tmp_path / "lfw.bin")  # open() would block forever
    with pytest.raises(UnreadableFileError, match=r"lfw\.bin: is a FIFO, not a regular \.bin file"):
        load_bin(tmp_path / "lfw.bin")
    os.symlink("/dev/zero", tmp_path / "zero.bin")  # read() would never end
    with pytest.raises(UnreadableFileError, match=r"zero\.bin: is a device"):
        load_bin(tmp_path / "zero.bin")


def test_ndarray_called_directly_or_huge_reconstruct_refused(tmp_path):
    path = tmp_path / "lfw.bin"
    path.write_bytes(b"cnumpy\nndarray\n((I1000000000000\ntS'B'\ntR.")  # protocol 0: ndarray((10**12,), 'B')
    with pytest.raises(BinFormatError, match=r"refused to unpickle numpy\.ndarray called directly"):
        load_bin(path)
    path.write_bytes(b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(I1000000000000\ntS'b'\ntR.")
    with pytest.raises(BinFormatError, match=r"refused to unpickle numpy _reconstruct of shape \(1000000000000,\)"):
        load_bin(path)


@pytest.mark.parametrize("protocol", range(6))
def test_code_is_refused_at_every_protocol(tmp_path, protocol):
    target = tmp_path / "pwned"
    _, pngs, issame = twelve_pairs()
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps((pngs[:23] + [_Evil(target)], issame), protocol=protocol))
    with pytest.raises(BinFormatError, match=r"refused to unpickle posix\.system"):
        load_bin(path)
    assert not target.exists()
