"""Pairs files (ours and LFW's, hand-written) and make-bin, checked with the standard pickle module."""

import io
import os
import pickle

import cv2
import numpy as np
import pytest

import prepare_data
from prepare.pairs import PairsError, make_bin, parse_pairs
from tests.cli_helpers import one_line_error
from utils.files import UnreadableFileError

Image = pytest.importorskip("PIL.Image")  # an independent decoder (pillow comes with matplotlib)


def encoded(ext: str, rgb: tuple[int, int, int]) -> bytes:
    ok, buf = cv2.imencode(ext, np.full((8, 8, 3), rgb[::-1], np.uint8))  # cv2 wants BGR
    assert ok
    return buf.tobytes()


@pytest.fixture
def lfw(tmp_path):
    """An LFW-style tree: Alice_Smith/Alice_Smith_000{1,2}.jpg, Bob/Bob_0001.jpg, Bob/Bob_0002.jpg."""
    root = tmp_path / "lfw"
    for name, n in (("Alice_Smith", 2), ("Bob", 2)):
        (root / name).mkdir(parents=True)
        for i in range(1, n + 1):
            (root / name / f"{name}_{i:04d}.jpg").write_bytes(encoded(".jpg", (10 * i, 50, 90)))
    return root


def test_lfw_pairs_tab_separated(lfw, tmp_path):
    text = "2\t1\nAlice_Smith\t1\t2\nAlice_Smith\t1\tBob\t2\nBob\t1\t2\nBob\t2\tAlice_Smith\t1\n"
    (tmp_path / "pairs.txt").write_text(text)
    r = str(lfw)
    assert parse_pairs(tmp_path / "pairs.txt", lfw) == [
        (f"{r}/Alice_Smith/Alice_Smith_0001.jpg", f"{r}/Alice_Smith/Alice_Smith_0002.jpg", True),
        (f"{r}/Alice_Smith/Alice_Smith_0001.jpg", f"{r}/Bob/Bob_0002.jpg", False),
        (f"{r}/Bob/Bob_0001.jpg", f"{r}/Bob/Bob_0002.jpg", True),
        (f"{r}/Bob/Bob_0002.jpg", f"{r}/Alice_Smith/Alice_Smith_0001.jpg", False),
    ]


def test_lfw_pairs_space_separated_crlf_single_count_header(lfw, tmp_path):
    (tmp_path / "pairsDevTest.txt").write_bytes(b"1\r\nBob 1 2\r\nBob  2   Alice_Smith 1\r\n")
    got = parse_pairs(tmp_path / "pairsDevTest.txt", lfw)
    assert [(os.path.basename(a), os.path.basename(b), s) for a, b, s in got] == [
        ("Bob_0001.jpg", "Bob_0002.jpg", True), ("Bob_0002.jpg", "Alice_Smith_0001.jpg", False)]


def test_lfw_header_count_must_match(lfw, tmp_path):
    (tmp_path / "pairs.txt").write_text("10 300\nBob\t1\t2\n")
    with pytest.raises(PairsError, match=r"pairs\.txt:1: header '10 300' means 6000 pairs, but the file has 1"):
        parse_pairs(tmp_path / "pairs.txt", lfw)


def test_our_pairs_format(lfw, tmp_path):
    (tmp_path / "p.txt").write_text("Bob/Bob_0001.jpg Alice_Smith/Alice_Smith_0002.jpg 0\n\nBob/Bob_0002.jpg "
                                    "Bob/Bob_0001.jpg 1\n")
    assert parse_pairs(tmp_path / "p.txt", lfw) == [
        (os.path.join(lfw, "Bob/Bob_0001.jpg"), os.path.join(lfw, "Alice_Smith/Alice_Smith_0002.jpg"), False),
        (os.path.join(lfw, "Bob/Bob_0002.jpg"), os.path.join(lfw, "Bob/Bob_0001.jpg"), True)]


def test_malformed_line_names_file_and_line(lfw, tmp_path):
    (tmp_path / "p.txt").write_text("Bob/Bob_0001.jpg Bob/Bob_0002.jpg 1\n\nBob/Bob_0001.jpg Bob/Bob_0002.jpg yes\n")
    with pytest.raises(PairsError, match=r"p\.txt:3: expected '<image_a> <image_b> <1\|0>'"):
        parse_pairs(tmp_path / "p.txt", lfw)


def test_missing_image_names_file_and_line(lfw, tmp_path):
    (tmp_path / "pairs.txt").write_text("1\nBob\t1\t2\nBob\t1\tCarol\t3\n")
    with pytest.raises(PairsError, match=r"pairs\.txt:3: image .*Carol_0003\.jpg not found"):
        parse_pairs(tmp_path / "pairs.txt", lfw)


@pytest.fixture
def mixed(tmp_path):
    """img/a.jpg, img/b.png, img/c.bmp and a 12-pair pairs file using them out of order (3 lines x 4)."""
    d = tmp_path / "img"
    d.mkdir()
    files = {"a.jpg": encoded(".jpg", (200, 10, 10)), "b.png": encoded(".png", (10, 200, 10)),
             "c.bmp": encoded(".bmp", (255, 0, 0))}
    for n, data in files.items():
        (d / n).write_bytes(data)
    (tmp_path / "pairs.txt").write_text("b.png a.jpg 0\na.jpg a.jpg 1\nc.bmp b.png 0\n" * 4)
    return d, files


def test_make_bin_stores_file_bytes_in_pair_order(tmp_path, mixed):
    d, files = mixed
    summary = make_bin(d, tmp_path / "pairs.txt", tmp_path / "out" / "x.bin", progress=False)
    items, issame = pickle.loads((tmp_path / "out" / "x.bin").read_bytes())
    assert items[:4] == [files["b.png"], files["a.jpg"], files["a.jpg"], files["a.jpg"]]
    assert issame == [False, True, False] * 4
    assert (summary["pairs"], summary["images"], summary["unique_images"], summary["converted"]) == (12, 24, 3, 1)
    assert summary["warning"] is None


def test_make_bin_converts_other_formats_to_png_keeping_colours(tmp_path, mixed):
    d, _ = mixed
    make_bin(d, tmp_path / "pairs.txt", tmp_path / "x.bin", progress=False)
    items, _ = pickle.loads((tmp_path / "x.bin").read_bytes())
    img = Image.open(io.BytesIO(items[4]))
    assert img.format == "PNG"
    np.testing.assert_array_equal(np.asarray(img.convert("RGB")), np.full((8, 8, 3), (255, 0, 0), np.uint8))


def test_make_bin_py2str_kind_is_a_python2_pickle(tmp_path, mixed):
    d, files = mixed
    make_bin(d, tmp_path / "pairs.txt", tmp_path / "x.bin", kind="py2str", progress=False)
    data = (tmp_path / "x.bin").read_bytes()
    with pytest.raises(UnicodeDecodeError):  # Python 2 str items: only encoding='bytes' reads them
        pickle.loads(data)
    items, issame = pickle.loads(data, encoding="bytes")
    assert items[:2] == [files["b.png"], files["a.jpg"]] and list(issame) == [False, True, False] * 4


def test_make_bin_ndarray_kind_holds_1d_uint8_arrays(tmp_path, mixed):
    d, files = mixed
    make_bin(d, tmp_path / "pairs.txt", tmp_path / "x.bin", kind="ndarray", progress=False)
    items, _ = pickle.loads((tmp_path / "x.bin").read_bytes())
    assert all(isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.ndim == 1 for a in items)
    assert items[0].tobytes() == files["b.png"]


def test_cli_make_bin_summary_line(capsys, tmp_path, mixed):
    d, _ = mixed
    assert prepare_data.main(["make-bin", str(d), str(tmp_path / "pairs.txt"), str(tmp_path / "x.bin"),
                              "--no-progress"]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and "12 pairs (4 same)" in out


@pytest.mark.parametrize("n", [1, 9])
def test_cli_make_bin_refuses_fewer_than_10_pairs(capsys, tmp_path, mixed, n):
    d, _ = mixed
    (tmp_path / "few.txt").write_text("a.jpg b.png 1\n" * n)
    one_line_error(capsys, ["make-bin", str(d), str(tmp_path / "few.txt"), str(tmp_path / "x.bin")],
                   "prepare_data.py make-bin: error:", f"few.txt: {n} pair", "needs at least 10 pairs")
    assert not (tmp_path / "x.bin").exists()


def test_make_bin_library_accepts_small_sets_unless_asked(tmp_path, mixed):
    d, _ = mixed
    (tmp_path / "few.txt").write_text("a.jpg b.png 1\n")
    assert make_bin(d, tmp_path / "few.txt", tmp_path / "x.bin", progress=False)["pairs"] == 1
    with pytest.raises(PairsError, match=r"few\.txt: 1 pair; a verification \.bin needs at least 10 pairs"):
        make_bin(d, tmp_path / "few.txt", tmp_path / "y.bin", progress=False, min_pairs=10)
    assert not (tmp_path / "y.bin").exists()


@pytest.mark.parametrize("label", [0, 1])
def test_cli_make_bin_warns_when_all_pairs_have_one_label(capsys, tmp_path, mixed, label):
    d, _ = mixed
    (tmp_path / "one.txt").write_text(f"a.jpg b.png {label}\n" * 12)
    assert prepare_data.main(["make-bin", str(d), str(tmp_path / "one.txt"), str(tmp_path / "x.bin"),
                              "--no-progress"]) == 0
    captured = capsys.readouterr()
    word = "same" if label else "different"
    assert captured.err.strip() == (f"make-bin: warning: {tmp_path / 'x.bin'}: all 12 pairs are '{word}'; "
                                    "its verification accuracy will not measure the model")
    assert pickle.loads((tmp_path / "x.bin").read_bytes())[1] == [bool(label)] * 12


def test_make_bin_refuses_a_fifo_pairs_file_unread(tmp_path, mixed):
    d, _ = mixed
    os.mkfifo(tmp_path / "fifo.txt")
    with pytest.raises(UnreadableFileError, match=r"fifo\.txt: is a FIFO"):
        make_bin(d, tmp_path / "fifo.txt", tmp_path / "x.bin", progress=False)




def test_cli_make_bin_malformed_pairs(capsys, tmp_path, mixed):
    d, _ = mixed
    (tmp_path / "bad.txt").write_text("a.jpg b.png 1\na.jpg\n")
    one_line_error(capsys, ["make-bin", str(d), str(tmp_path / "bad.txt"), str(tmp_path / "x.bin")],
                   "prepare_data.py make-bin: error:", "bad.txt:2:")
    assert not (tmp_path / "x.bin").exists()


def test_cli_make_bin_missing_image(capsys, tmp_path, mixed):
    d, _ = mixed
    (tmp_path / "p.txt").write_text("a.jpg b.png 1\na.jpg nope.jpg 0\n")
    one_line_error(capsys, ["make-bin", str(d), str(tmp_path / "p.txt"), str(tmp_path / "x.bin")],
                   "p.txt:2:", "nope.jpg not found")


def test_cli_make_bin_missing_pairs_file(capsys, tmp_path, mixed):
    d, _ = mixed
    one_line_error(capsys, ["make-bin", str(d), str(tmp_path / "none.txt"), str(tmp_path / "x.bin")],
                   "none.txt: no such pairs file")
