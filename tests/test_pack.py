"""prepare_data.py pack: folders and im2rec lists packed, read back by FaceRec and by a reader built from FORMATS.md."""

import os
import struct

import cv2
import numpy as np
import pytest

import prepare_data
from data.facerec import FaceRec
from data.sources import open_source

MAGIC = 0xCED7230A


def read_pack_by_hand(folder) -> dict:
    """key -> (flag, label list, payload), parsed from the .idx text and the .rec bytes as FORMATS.md says."""
    blob = open(os.path.join(folder, "train.rec"), "rb").read()
    out = {}
    for line in open(os.path.join(folder, "train.idx")).read().splitlines():
        key, pos = (int(x) for x in line.split("\t"))
        parts = []
        while True:
            magic, lrec = struct.unpack_from("<II", blob, pos)
            assert magic == MAGIC
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            parts.append(blob[pos + 8:pos + 8 + length])
            pos += 8 + length + (-length % 4)
            if cflag in (0, 3):
                break
        data = struct.pack("<I", MAGIC).join(parts)
        flag, label, _, _ = struct.unpack_from("<IfQQ", data)
        labels = list(struct.unpack_from(f"<{flag}f", data, 24)) if flag else [label]
        out[key] = (flag, labels, data[24 + 4 * flag:])
    return out


def jpeg(seed: int, size=(16, 16)) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


def make_folder(root, spec: dict) -> dict:
    """spec: class -> {file name: bytes}; returns the same dict."""
    for cls, files in spec.items():
        os.makedirs(root / cls, exist_ok=True)
        for name, data in files.items():
            (root / cls / name).write_bytes(data)
    return spec


def run_pack(*argv) -> int:
    return prepare_data.main(["pack", *map(str, argv), "--size", "16x16", "--no-progress"])


@pytest.fixture
def folder(tmp_path):
    spec = {"zed": {"b.jpg": jpeg(1), "a.jpg": jpeg(2)}, "amy": {"x.jpg": jpeg(3)},
            "bob": {"1.jpg": jpeg(4), "2.jpg": jpeg(5), "3.jpg": jpeg(6)}}
    make_folder(tmp_path / "src", spec)
    return tmp_path / "src", spec


def expected_images(spec):
    """(label, bytes) in pack order: classes by sorted() name, files by sorted() name."""
    return [(c, spec[name][f]) for c, name in enumerate(sorted(spec)) for f in sorted(spec[name])]


def test_folder_pack_by_hand_reader(folder, tmp_path):
    src, spec = folder
    assert run_pack(src, tmp_path / "out") == 0
    recs = read_pack_by_hand(tmp_path / "out")
    want = expected_images(spec)
    n, c = len(want), len(spec)
    assert recs[0][0] == 2 and recs[0][1] == [n + 1, n + 1 + c]
    assert [(int(recs[k][1][0]), recs[k][2]) for k in range(1, n + 1)] == want
    assert [recs[k][1] for k in range(n + 1, n + 1 + c)] == [[1, 2], [2, 5], [5, 7]]  # amy 1, bob 3, zed 2 images
    assert (tmp_path / "out" / "property").read_text().strip() == "3,16,16"
    assert (tmp_path / "out" / "classes.txt").read_text() == "0\tamy\n1\tbob\n2\tzed\n"


def test_folder_pack_reads_back_with_facerec(folder, tmp_path):
    src, spec = folder
    assert run_pack(src, tmp_path / "out") == 0
    rec = FaceRec(str(tmp_path / "out" / "train.rec"))
    assert rec.layout == "insightface" and rec.num_classes == 3
    assert [(label, payload) for payload, label in map(rec.read, range(len(rec)))] == expected_images(spec)


def test_packed_folder_has_the_labels_of_the_folder_trained_directly(folder, tmp_path):
    src, _ = folder
    assert run_pack(src, tmp_path / "out") == 0
    direct, packed = open_source(str(src)), open_source(str(tmp_path / "out"))
    assert [(int(direct.labels[i]), direct.read(i)) for i in range(len(direct))] == \
        [(int(packed.labels[i]), packed.read(i)) for i in range(len(packed))]


def test_lst_tab_form_with_float_labels_and_extra_columns(tmp_path):
    imgs = {f"img/{i}.jpg": jpeg(10 + i) for i in range(4)}
    for rel, data in imgs.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    (tmp_path / "train.lst").write_text("0\t1.000000\t0.500000\timg/0.jpg\n1\t0.000000\t0.25\timg/1.jpg\n"
                                        "2\t1.000000\t0.0\timg/2.jpg\n3\t0.000000\t7\timg/3.jpg\n")
    assert run_pack(tmp_path / "train.lst", tmp_path / "out") == 0
    recs = read_pack_by_hand(tmp_path / "out")
    got = [(recs[k][1][0], recs[k][2]) for k in range(1, 5)]
    assert got == [(0.0, imgs["img/1.jpg"]), (0.0, imgs["img/3.jpg"]), (1.0, imgs["img/0.jpg"]),
                   (1.0, imgs["img/2.jpg"])]  # grouped by class, list order kept inside a class


def test_lst_path_label_form_with_root(tmp_path):
    (tmp_path / "images" / "p q").mkdir(parents=True)
    a, b = jpeg(20), jpeg(21)
    (tmp_path / "images" / "p q" / "a.jpg").write_bytes(a)
    (tmp_path / "images" / "b.jpg").write_bytes(b)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "x.lst").write_text("p q/a.jpg 1.000000\nb.jpg 0\n")
    assert run_pack(tmp_path / "lists" / "x.lst", tmp_path / "out", "--root", tmp_path / "images") == 0
    rec = FaceRec(str(tmp_path / "out" / "train.rec"))
    assert [rec.read(i) for i in range(2)] == [(b, 0), (a, 1)]


def test_corrupt_input_is_named_skipped_and_exit_is_1(tmp_path, capsys):
    png = cv2.imencode(".png", np.full((16, 16, 3), 90, np.uint8))[1].tobytes()
    make_folder(tmp_path / "src", {"a": {"1.jpg": jpeg(1), "2.png": png}, "b": {"bad.jpg": b"\xff\xd8\xffjunk"},
                                   "c": {"3.jpg": jpeg(3)}})
    assert run_pack(tmp_path / "src", tmp_path / "out") == 1
    out, err = capsys.readouterr()
    bad = str(tmp_path / "src" / "b" / "bad.jpg")
    assert f"pack: {bad}: not a decodable image" in err and "1 skipped" in out
    assert (tmp_path / "out" / "skipped.txt").read_text().startswith(bad)
    rec = FaceRec(str(tmp_path / "out" / "train.rec"))
    assert rec.labels.tolist() == [0, 0, 1] and rec.num_classes == 2  # class b had no usable image: dropped
    assert rec.read(1)[0][:3] == b"\xff\xd8\xff"  # the PNG, stored (encoded as JPEG by default)
    assert (tmp_path / "out" / "classes.txt").read_text() == "0\ta\n1\tc\n"


def test_png_is_encoded_as_jpeg_by_default(tmp_path):
    pixels = np.full((16, 16, 3), (30, 120, 200), np.uint8)
    make_folder(tmp_path / "src", {"a": {"p.png": cv2.imencode(".png", pixels)[1].tobytes()}})
    assert run_pack(tmp_path / "src", tmp_path / "out", "--quality", "90") == 0
    payload = FaceRec(str(tmp_path / "out" / "train.rec")).read(0)[0]
    assert payload[:3] == b"\xff\xd8\xff"
    decoded = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
    assert np.abs(decoded.astype(int) - pixels).max() <= 3  # a flat colour survives JPEG almost exactly


def test_keep_png_stores_the_png_bytes(tmp_path):
    png = cv2.imencode(".png", np.full((16, 16, 3), 7, np.uint8))[1].tobytes()
    make_folder(tmp_path / "src", {"a": {"p.png": png}})
    assert run_pack(tmp_path / "src", tmp_path / "out", "--keep-png") == 0
    assert read_pack_by_hand(tmp_path / "out")[1][2] == png


def test_wrong_size_is_skipped_unless_resize(tmp_path, capsys):
    make_folder(tmp_path / "src", {"a": {"ok.jpg": jpeg(1), "big.jpg": jpeg(2, (20, 24))}})
    assert run_pack(tmp_path / "src", tmp_path / "out") == 1
    assert "big.jpg: image is 20x24 (HxW), expected 16x16" in capsys.readouterr().err
    assert run_pack(tmp_path / "src", tmp_path / "out2", "--resize") == 0
    payload = FaceRec(str(tmp_path / "out2" / "train.rec")).read(0)[0]  # big.jpg sorts first
    assert cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR).shape == (16, 16, 3)


def test_shuffle_mixes_file_order_keeping_keys_and_labels_true(folder, tmp_path):
    src, spec = folder
    assert run_pack(src, tmp_path / "out", "--shuffle", "--seed", "3") == 0
    idx_keys = [int(line.split("\t")[0]) for line in (tmp_path / "out" / "train.idx").read_text().splitlines()]
    assert idx_keys[0] == 0 and idx_keys[1:7] != sorted(idx_keys[1:7]) and idx_keys[7:] == [7, 8, 9]
    recs = read_pack_by_hand(tmp_path / "out")
    want = expected_images(spec)
    # arcface_torch's way: header record 0, then keys 1..first-1 with labels from each image header
    assert [(int(recs[k][1][0]), recs[k][2]) for k in range(1, int(recs[0][1][0]))] == want
    assert [recs[k][1] for k in range(7, 10)] == [[1, 2], [2, 5], [5, 7]]
    rec = FaceRec(str(tmp_path / "out" / "train.rec"))
    assert [(label, payload) for payload, label in map(rec.read, range(len(rec)))] == want


def test_workers_give_the_same_bytes(folder, tmp_path):
    src, _ = folder
    assert run_pack(src, tmp_path / "one") == 0
    assert run_pack(src, tmp_path / "two", "--workers", "2") == 0
    for name in ("train.rec", "train.idx", "property", "classes.txt"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_output_inside_the_input_is_a_one_line_error(folder, capsys):
    src, _ = folder
    with pytest.raises(SystemExit) as e:
        run_pack(src, src / "packed")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "is inside the input" in err


def test_no_usable_image_is_a_one_line_error(tmp_path, capsys):
    make_folder(tmp_path / "src", {"a": {"x.jpg": b"not an image"}})
    with pytest.raises(SystemExit) as e:
        run_pack(tmp_path / "src", tmp_path / "out")
    assert e.value.code == 2 and "no usable images" in capsys.readouterr().err
    assert not (tmp_path / "out" / "train.rec").exists()


def test_non_utf8_file_and_folder_names_are_packed_and_listed_printably(tmp_path, capsys):
    root = os.fsencode(tmp_path / "src")
    os.makedirs(os.path.join(root, b"caf\xe9"))
    os.makedirs(os.path.join(root, b"ok"))
    for name, data in ((b"caf\xe9/\xff\xfe.jpg", jpeg(1)), (b"ok/a.jpg", jpeg(2)), (b"ok/\xfe.jpg", b"not an image")):
        with open(os.path.join(root, name), "wb") as fh:
            fh.write(data)
    code = run_pack(tmp_path / "src", tmp_path / "out")
    captured = capsys.readouterr()
    assert code == 1 and "ok/\\xfe.jpg: not a decodable image" in captured.err
    recs = read_pack_by_hand(tmp_path / "out")
    assert recs[0][1] == [3.0, 5.0] and [recs[k][2] for k in (1, 2)] == [jpeg(1), jpeg(2)]
    assert (tmp_path / "out" / "classes.txt").read_text(encoding="utf-8") == "0\tcaf\\xe9\n1\tok\n"


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_fifo_or_device_where_an_image_is_expected_is_skipped_unread(folder, tmp_path, capsys, kind):
    target = tmp_path / "src" / "amy" / "y.jpg"
    if kind == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs on this platform")
        os.mkfifo(target)
    else:
        if not os.path.exists("/dev/zero"):
            pytest.skip("no /dev/zero")
        os.symlink("/dev/zero", target)
    code = run_pack(tmp_path / "src", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 1 and f"{target}: is a {'FIFO' if kind == 'fifo' else 'device'}, not a regular image" in err
    assert len(FaceRec(str(tmp_path / "out" / "train.rec"))) == 6
