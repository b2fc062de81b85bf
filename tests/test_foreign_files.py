"""Files as other tools write them (mxnet/im2rec, insightface's scripts, Python 2, other encoders),
hand-built byte by byte from shared/reference/FORMATS.md; decoded pixels checked against Pillow."""

import io
import struct

import numpy as np
import pytest
from PIL import Image

from data.bins import load_bin
from data.dataset import decode_image
from data.facerec import FaceRec
from data.recordio import RecordIOError, read_idx
from data.sources import open_source
from evaluation.protocol import kfold_accuracy
from tests.test_verification import reference_accuracy

MAGIC = struct.pack("<I", 0xCED7230A)


def on_disk(data: bytes) -> bytes:
    """dmlc-core's chunks for one record: split at every 4-aligned magic word, which is dropped;
    cflag 0 whole, 1 first, 2 middle, 3 last; zero padding of the record length to 4 bytes."""
    cuts = [i for i in range(0, len(data) - 3, 4) if data[i:i + 4] == MAGIC]
    out, start = b"", 0
    for n, cut in enumerate(cuts):
        out += MAGIC + struct.pack("<I", ((1 if n == 0 else 2) << 29) | (cut - start)) + data[start:cut]
        start = cut + 4
    out += MAGIC + struct.pack("<I", ((3 if cuts else 0) << 29) | (len(data) - start)) + data[start:]
    return out + b"\0" * (-len(data) % 4)


def header(label, key=0, payload=b"") -> bytes:
    """IRHeader '<IfQQ' + payload; a list label is stored as flag float32 values (header label 0)."""
    if isinstance(label, list):
        return struct.pack("<IfQQ", len(label), 0.0, key, 0) + struct.pack(f"<{len(label)}f", *label) + payload
    return struct.pack("<IfQQ", 0, float(label), key, 0) + payload


def write_pack(folder, records: dict, file_order=None, idx_order=None, newline="\n", tail="") -> str:
    """train.rec with ``records`` written in ``file_order``; train.idx lines in ``idx_order``."""
    blob, offsets = b"", {}
    for key in file_order or sorted(records):
        offsets[key] = len(blob)
        blob += on_disk(records[key])
    (folder / "train.rec").write_bytes(blob)
    lines = "".join(f"{k}\t{offsets[k]}{newline}" for k in (idx_order or sorted(records)))
    (folder / "train.idx").write_bytes((lines + tail).encode())
    return str(folder / "train.rec")


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# ---- .idx text as hand editors, Windows and old tools leave it ------------------------------------


@pytest.mark.parametrize("text", ["0\t0\n1\t8\n\n", "\n0\t0\n\n1\t8\n", "0\t0\r\n1\t8\r\n\r\n", "0\t0\r1\t8\r",
                                  "0\t0 \n 1\t8\t\n", "0\t0\n1\t8"])
def test_idx_blank_lines_stray_whitespace_and_line_ends_are_read_as_mxnet_does(tmp_path, text):
    (tmp_path / "a.idx").write_bytes(text.encode())
    keys, offsets = read_idx(tmp_path / "a.idx")
    assert keys.tolist() == [0, 1] and offsets.tolist() == [0, 8]


@pytest.mark.parametrize("text, line, what", [("0\t0\n\n1 8\n", 3, "missing tab"), ("0\t\t0\n", 1, "extra tab"),
                                              ("\n0\t0\nx\t8\n", 3, "unexpected byte b'x'"),
                                              ("0\t0\n\n1\t" + "9" * 19 + "\n", 3, "number longer than 18 digits")])
def test_idx_lines_mxnet_refuses_are_named_with_their_line_number(tmp_path, text, line, what):
    (tmp_path / "a.idx").write_bytes(text.encode())
    with pytest.raises(RecordIOError, match=rf"a\.idx line {line}: {what}"):
        read_idx(tmp_path / "a.idx")


# ---- an insightface pack in every variant the format allows ------------------------------------


@pytest.fixture(scope="module")
def payloads():
    """Image payloads as other encoders write them, 112x112 (PIL, not OpenCV, made them)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray((rng.random((14, 14, 3)) * 255).astype(np.uint8)).resize((112, 112), Image.BILINEAR)
    jpeg = encoded(rgb, "JPEG", quality=95)
    com = b"\xff\xfe" + struct.pack(">H", 2 + 2 + 16) + b"\0\0" + MAGIC * 4  # comment holding magic words
    return {
        "baseline": jpeg,
        "progressive": encoded(rgb, "JPEG", quality=95, progressive=True),
        "gray_jpeg": encoded(rgb.convert("L"), "JPEG", quality=95),
        "cmyk_jpeg": encoded(rgb.convert("CMYK"), "JPEG", quality=95),
        "444_jpeg": encoded(rgb, "JPEG", quality=95, subsampling=0),
        "png": encoded(rgb, "PNG"),
        "rgba_png": encoded(rgb.convert("RGBA"), "PNG"),
        "gray_png": encoded(rgb.convert("L"), "PNG"),
        "palette_png": encoded(rgb.convert("P"), "PNG"),
        "magic_inside": jpeg[:2] + com + jpeg[2:],
    }


def insightface_records(payloads: list, classes: list) -> dict:
    """Record 0 [first_identity, end]; images 1..N with array labels [class, 7] (flag 2);
    identity records [first_image, end_image) per class."""
    n = len(payloads)
    recs = {k: header([float(c), 7.0], k, p) for k, (c, p) in enumerate(zip(classes, payloads), start=1)}
    bounds = np.flatnonzero(np.diff(classes, prepend=-1, append=max(classes) + 1)) + 1
    for c in range(len(bounds) - 1):
        recs[n + 1 + c] = header([float(bounds[c]), float(bounds[c + 1])])
    recs[0] = header([float(n + 1), float(n + 1 + len(bounds) - 1)])
    return recs


def test_insightface_pack_with_array_labels_split_records_and_shuffled_index(tmp_path, payloads):
    names = list(payloads)
    classes = [0] * 4 + [1] * 3 + [2] * (len(names) - 7)
    recs = insightface_records([payloads[n] for n in names], classes)
    keys = sorted(recs)
    rec = write_pack(tmp_path, recs, file_order=keys[::-1], idx_order=keys[5:] + keys[:5], newline="\r\n",
                     tail="\r\n")
    (tmp_path / "property").write_text("3,112,112")  # no final newline
    split = on_disk(recs[1 + names.index("magic_inside")])
    assert struct.unpack_from("<I", split, 4)[0] >> 29 == 1  # that record really is split in chunks on disk
    pack = FaceRec(rec)
    assert pack.layout == "insightface" and pack.num_classes == 3 and pack.labels.tolist() == classes
    source = open_source(str(tmp_path))
    for i, name in enumerate(names):
        data = source.read(i)
        assert data == payloads[name], name
        ours = decode_image(data)
        pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        # CMYK -> RGB: OpenCV and Pillow round the inverted-ink product differently (by at most 1)
        assert np.abs(ours.astype(int) - pil).max() <= (1 if name == "cmyk_jpeg" else 0), name


def test_identity_records_contradicting_the_image_headers_give_way_to_the_headers(tmp_path):
    """arcface_torch trains on each image header's label; identity records are our shortcut only."""
    recs = insightface_records([b"\xff\xd8\xff" + bytes([k]) for k in range(4)], [0, 0, 1, 1])
    recs.update({k: header([float((k - 1) % 2), 0.0], k, b"\xff\xd8\xff") for k in range(1, 5)})  # 0, 1, 0, 1
    pack = FaceRec(write_pack(tmp_path, recs))
    assert pack.labels.tolist() == [0, 1, 0, 1] and pack.num_classes == 2
    assert [pack.read(i)[1] for i in range(4)] == [0, 1, 0, 1]


def test_a_contradiction_the_sample_missed_is_refused_when_that_image_is_read(tmp_path):
    n = 200  # more images than the sample checked at open
    recs = insightface_records([b"\xff\xd8\xff"] * n, [0] * 100 + [1] * 100)
    pack = FaceRec(write_pack(tmp_path, recs))
    picked = set(np.unique(np.linspace(0, n - 1, 64).astype(int)).tolist())
    j = next(i for i in range(n) if i not in picked)
    recs[j + 1] = header([1.0, 0.0], j + 1, b"\xff\xd8\xff")  # image j of class 0 says class 1
    pack = FaceRec(write_pack(tmp_path, recs))
    assert pack.labels[j] == 0
    with pytest.raises(RecordIOError, match=rf"train\.rec record {j + 1}: image header label 1\.0 but the "
                                            r"identity records put it in class 0"):
        pack.read(j)


def test_plain_im2rec_pack_without_header_and_an_absurd_float_label(tmp_path):
    recs = {k: header(float(k % 3), k, b"\xff\xd8\xff") for k in range(6)}  # im2rec: key 0 is an image
    pack = FaceRec(write_pack(tmp_path, recs))
    assert pack.layout == "plain" and pack.labels.tolist() == [0, 1, 2, 0, 1, 2]
    recs[4] = header(1e38, 4, b"\xff\xd8\xff")  # float32 holds it; int64 does not
    with pytest.raises(RecordIOError, match=r"train\.rec record 4: label 9\.99\d*e\+37 is not a class id"):
        FaceRec(write_pack(tmp_path, recs))


# ---- .bin pickles as Python 2 wrote them ---------------------------------------------------------


def _u(b: bytes) -> bytes:
    """Python 2 str at protocol 2: SHORT_BINSTRING or BINSTRING."""
    return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<I", len(b))) + b


def py2_ndarray(dtype: bytes, raw: bytes, n: int) -> bytes:
    """A 1-D numpy array pickled by Python 2 numpy 1.x at protocol 2 (dtype strings are str there)."""
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _u(b"b") + b"\x87R("
            + b"K\x01M" + struct.pack("<H", n) + b"\x85cnumpy\ndtype\n" + _u(dtype) + b"K\x00K\x01\x87R("
            + b"K\x03" + _u(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89" + _u(raw) + b"tb")


def _p0(b: bytes) -> bytes:
    """Python 2 str at protocol 0: STRING with its repr escapes."""
    text = "".join(chr(c) if 32 <= c < 127 and c not in (39, 92) else f"\\x{c:02x}" for c in b)
    return b"S'" + text.encode() + b"'\n"


@pytest.fixture(scope="module")
def jpeg():
    return encoded(Image.new("RGB", (112, 112), (200, 30, 60)), "JPEG", quality=90)


FLAGS = [True, False, False, True, True, False, True, False, False, True]


@pytest.mark.parametrize("form", ["numpy issame", "numpy items", "protocol 0", "protocol 1"])
def test_python2_pickles(tmp_path, jpeg, form):
    items = [jpeg] * 20
    if form == "numpy issame":
        data = b"\x80\x02(](" + b"".join(_u(p) for p in items) + b"e" + py2_ndarray(b"b1", bytes(FLAGS), 10) + b"t."
    elif form == "numpy items":
        data = (b"\x80\x02(](" + b"".join(py2_ndarray(b"u1", p, len(p)) for p in items) + b"e](" +
                b"".join(b"\x88" if f else b"\x89" for f in FLAGS) + b"et.")
    elif form == "protocol 0":
        data = (b"((lp0\n" + b"".join(_p0(p) + b"a" for p in items) + b"(lp1\n" +
                b"".join((b"I01\n" if f else b"I00\n") + b"a" for f in FLAGS) + b"tp2\n.")
    else:
        data = (b"(](" + b"".join(b"T" + struct.pack("<I", len(p)) + p for p in items) + b"e](" +
                b"".join(b"I01\n" if f else b"I00\n" for f in FLAGS) + b"et.")
    (tmp_path / "lfw.bin").write_bytes(data)
    got, issame = load_bin(tmp_path / "lfw.bin")
    assert issame.tolist() == FLAGS and len(got) == 20
    assert all(bytes(g) == jpeg for g in got)


# ---- fold sizes of the real sets ------------------------------------------------------------------


@pytest.mark.parametrize("pairs", [5000, 7000, 12000])
def test_kfold_of_published_set_sizes_matches_the_loop(pairs):
    """vgg2_fp 5000, cfp 7000, and 12000 pairs: folds as KFold(10) cuts them, thresholds as the loop picks."""
    rng = np.random.default_rng(pairs)
    issame = rng.random(pairs) < 0.5
    dist = np.where(issame, rng.normal(0.9, 0.3, pairs), rng.normal(1.6, 0.3, pairs)).clip(0, 4)
    accs, thrs = kfold_accuracy(dist, issame)
    ref_accs, ref_thrs = reference_accuracy(dist, issame)
    np.testing.assert_array_equal(accs, ref_accs)
    np.testing.assert_array_equal(thrs, ref_thrs)
