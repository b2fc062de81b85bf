"""unpack-rec / unpack-bin / unpack on packs and .bin files built byte by byte (no facerec.write_pack)."""

import io
import os
import pickle
import struct

import cv2
import numpy as np
import pytest

import prepare_data
from data.bins import load_bin, write_bin
from data.recordio import RecordIOError
from prepare.pairs import make_bin
from prepare.unpack import MANIFEST, UnpackError, payload_extension, unpack_bin, unpack_dataset, unpack_rec
from tests.cli_helpers import one_line_error

Image = pytest.importorskip("PIL.Image")  # an independent decoder (pillow comes with matplotlib)

MAGIC = struct.pack("<I", 0xCED7230A)


def chunk(cflag: int, body: bytes) -> bytes:
    """One RecordIO chunk: magic, lrec (cflag << 29 | length), body, zero padding to 4 bytes."""
    return MAGIC + struct.pack("<I", (cflag << 29) | len(body)) + body + b"\0" * (-len(body) % 4)


def ir(label: float, payload: bytes, values: list[float] | None = None) -> bytes:
    """Record data: IRHeader '<IfQQ' (+ float32 label values when given) + payload."""
    if values is None:
        return struct.pack("<IfQQ", 0, label, 0, 0) + payload
    return struct.pack("<IfQQ", len(values), 0.0, 0, 0) + struct.pack(f"<{len(values)}f", *values) + payload


def write_rec(folder, records: list[tuple[int, bytes]], idx: bool = True, name: str = "train") -> str:
    """train.rec (+ .idx) from (key, record data); data must not hold the magic word (one chunk each)."""
    os.makedirs(folder, exist_ok=True)
    rec = os.path.join(folder, f"{name}.rec")
    blob, lines = b"", []
    for key, data in records:
        assert MAGIC not in data
        lines.append(f"{key}\t{len(blob)}\n")
        blob += chunk(0, data)
    with open(rec, "wb") as f:
        f.write(blob)
    if idx:
        with open(os.path.join(folder, f"{name}.idx"), "w") as f:
            f.write("".join(lines))
    return rec


def jpeg(rgb: tuple[int, int, int], size: int = 8) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.full((size, size, 3), rgb[::-1], np.uint8))  # cv2 wants BGR
    assert ok
    return buf.tobytes()


def png(rgb: tuple[int, int, int], size: int = 8) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((size, size, 3), rgb[::-1], np.uint8))
    assert ok
    return buf.tobytes()


def colours(n: int) -> list[tuple[int, int, int]]:
    return [(20 * i % 256, 255 - 13 * i % 256, 60 + 7 * i % 196) for i in range(n)]


def files_of(out) -> dict[str, bytes]:
    """Every file under ``out`` as 'relative/path' -> bytes (not the unpack manifest)."""
    found = {}
    for root, _, names in os.walk(out):
        for n in names:
            if n == MANIFEST:
                continue
            p = os.path.join(root, n)
            found[os.path.relpath(p, out).replace(os.sep, "/")] = open(p, "rb").read()
    return found


@pytest.fixture
def insightface_pack(tmp_path):
    """Header record 0 + 11 images (keys 1..11) in 3 classes + 3 identity records; -> (folder, expected files)."""
    counts = [2, 6, 3]
    payloads = [jpeg(c) for c in colours(11)]
    records, expected, key = [], {}, 1
    for cls, n in enumerate(counts):
        for _ in range(n):
            records.append((key, ir(float(cls), payloads[key - 1])))
            expected[f"{cls}/{key:02d}.jpg"] = payloads[key - 1]
            key += 1
    starts = [1, 3, 9, 12]
    records += [(12 + c, ir(0, b"", [starts[c], starts[c + 1]])) for c in range(3)]
    records.insert(0, (0, ir(0, b"", [12.0, 15.0])))
    write_rec(tmp_path / "pack", records)
    return str(tmp_path / "pack"), expected


def test_insightface_layout_files_hold_the_payloads(insightface_pack, tmp_path):
    pack, expected = insightface_pack
    summary = unpack_rec(pack, tmp_path / "out", progress=False)
    found = files_of(tmp_path / "out")
    assert sorted(found) == ["0/01.jpg", "0/02.jpg", "1/03.jpg", "1/04.jpg", "1/05.jpg", "1/06.jpg", "1/07.jpg",
                             "1/08.jpg", "2/09.jpg", "2/10.jpg", "2/11.jpg"]  # no header, no identity records
    assert found == expected
    assert (summary["images"], summary["written"], summary["classes"], summary["skipped"]) == (11, 11, 3, 0)
    assert summary["bytes"] == sum(len(v) for v in expected.values())


def test_threads_write_the_same_files(insightface_pack, tmp_path):
    pack, expected = insightface_pack
    unpack_rec(pack, tmp_path / "out", workers=3, progress=False)
    assert files_of(tmp_path / "out") == expected


def test_plain_layout_scalar_labels(tmp_path):
    labels = [2, 0, 2, 1, 0]
    payloads = [jpeg(c) for c in colours(5)]
    rec = write_rec(tmp_path / "p", [(10 + 5 * i, ir(float(c), p)) for i, (c, p) in enumerate(zip(labels, payloads))])
    summary = unpack_rec(rec, tmp_path / "out", progress=False)
    assert files_of(tmp_path / "out") == {"2/10.jpg": payloads[0], "0/15.jpg": payloads[1], "2/20.jpg": payloads[2],
                                          "1/25.jpg": payloads[3], "0/30.jpg": payloads[4]}
    assert summary["layout"] == "plain" and summary["classes"] == 3


def test_plain_layout_property_sets_class_width(tmp_path):
    payloads = [jpeg(c) for c in colours(3)]
    write_rec(tmp_path / "p", [(i, ir(float(c), p)) for i, (c, p) in enumerate(zip([3, 11, 3], payloads))])
    (tmp_path / "p" / "property").write_text("12,8,8")  # no final newline, as some packs have it
    unpack_rec(tmp_path / "p", tmp_path / "out", progress=False)
    assert files_of(tmp_path / "out") == {"03/0.jpg": payloads[0], "11/1.jpg": payloads[1], "03/2.jpg": payloads[2]}


def test_rec_without_idx_is_scanned(tmp_path):
    payloads = [jpeg(c) for c in colours(2)]
    rec = write_rec(tmp_path / "p", [(0, ir(1.0, payloads[0])), (1, ir(0.0, payloads[1]))], idx=False)
    unpack_rec(rec, tmp_path / "out", progress=False)
    assert files_of(tmp_path / "out") == {"1/0.jpg": payloads[0], "0/1.jpg": payloads[1]}


def test_array_labels_first_value_is_the_class(tmp_path):
    payloads = [jpeg(c) for c in colours(3)]
    values = [[1.0, 0.5, 7.0], [0.0, 2.5, 3.0], [1.0, 9.0, 1.5]]
    write_rec(tmp_path / "p", [(i, ir(0, p, v)) for i, (v, p) in enumerate(zip(values, payloads))])
    unpack_rec(tmp_path / "p", tmp_path / "out", progress=False)
    assert files_of(tmp_path / "out") == {"1/0.jpg": payloads[0], "0/1.jpg": payloads[1], "1/2.jpg": payloads[2]}


def test_record_split_into_continuation_chunks(tmp_path):
    base = jpeg((200, 30, 30))
    payload = base + b"\0" * (-len(base) % 4) + MAGIC + b"after the magic"  # header is 24 bytes: magic is aligned
    data = ir(0.0, payload)
    cut = data.index(MAGIC)
    assert cut % 4 == 0
    folder = tmp_path / "p"
    folder.mkdir()
    first = chunk(0, ir(1.0, jpeg((0, 0, 255))))
    (folder / "train.rec").write_bytes(first + chunk(1, data[:cut]) + chunk(3, data[cut + 4:]))
    (folder / "train.idx").write_text(f"0\t0\n1\t{len(first)}\n")
    unpack_rec(folder, tmp_path / "out", progress=False)
    assert files_of(tmp_path / "out") == {"1/0.jpg": jpeg((0, 0, 255)), "0/1.jpg": payload}


def test_png_payload_gets_png_extension(tmp_path):
    p = png((1, 2, 3))
    write_rec(tmp_path / "p", [(0, ir(0.0, p))])
    unpack_rec(tmp_path / "p", tmp_path / "out", progress=False)
    assert files_of(tmp_path / "out") == {"0/0.png": p}


@pytest.mark.parametrize("head, ext", [
    (b"\xff\xd8\xff\xe0\0\x10JFIF", ".jpg"), (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", ".png"),
    (b"RIFF\x24\0\0\0WEBPVP8 ", ".webp"), (b"GIF89a\x08\0", ".gif"), (b"BM\x36\x01\0\0", ".bmp"),
    (b"II*\0\x08\0\0\0", ".tif"), (b"hello world", ".dat"), (b"", ".dat"),
])
def test_payload_extension_from_magic_bytes(head, ext):
    assert payload_extension(head) == ext


def test_second_run_skips_everything(insightface_pack, tmp_path):
    pack, expected = insightface_pack
    unpack_rec(pack, tmp_path / "out", progress=False)
    again = unpack_rec(pack, tmp_path / "out", progress=False)
    assert (again["written"], again["skipped"], again["bytes"]) == (0, 11, 0)


def test_deleted_file_is_restored(insightface_pack, tmp_path):
    pack, expected = insightface_pack
    unpack_rec(pack, tmp_path / "out", progress=False)
    os.remove(tmp_path / "out" / "1" / "05.jpg")
    (tmp_path / "out" / "1" / "06.jpg").write_bytes(b"")  # an empty file is not a complete one
    again = unpack_rec(pack, tmp_path / "out", progress=False)
    assert (again["written"], again["skipped"]) == (2, 9)
    assert files_of(tmp_path / "out") == expected


def test_reencode_png_keeps_red_red(tmp_path):
    red = jpeg((255, 0, 0), size=16)
    assert Image.open(io.BytesIO(red)).convert("RGB").getpixel((8, 8))[0] > 240  # the payload is red as stored
    write_rec(tmp_path / "p", [(0, ir(0.0, red))])
    summary = unpack_rec(tmp_path / "p", tmp_path / "out", reencode="png", progress=False)
    out = Image.open(tmp_path / "out" / "0" / "0.png")
    assert out.format == "PNG" and summary["formats"] == {".png": 1}
    r, g, b = np.asarray(out.convert("RGB"), dtype=np.int64).reshape(-1, 3).mean(0)
    assert r > 240 and g < 15 and b < 15


def test_reencode_of_undecodable_payload_names_the_record(tmp_path):
    write_rec(tmp_path / "p", [(0, ir(0.0, jpeg((1, 1, 1)))), (1, ir(0.0, b"not an image"))])
    with pytest.raises(RecordIOError, match=r"train\.rec record 1: payload .* not a decodable image"):
        unpack_rec(tmp_path / "p", tmp_path / "out", reencode="png", progress=False)


# ----------------------------------------------------------------------------------------- .bin


def bin_stream(items, issame) -> bytes:
    return pickle.dumps((items, issame), protocol=4)


@pytest.fixture
def twelve():
    """6 pairs of small images: JPEG and PNG mixed, issame alternating."""
    cs = colours(12)
    return [jpeg(c) if i % 3 else png(c) for i, c in enumerate(cs)], [bool(i % 2 == 0) for i in range(6)]


def test_unpack_bin_names_and_pairs_txt(tmp_path, twelve):
    items, issame = twelve
    (tmp_path / "lfw.bin").write_bytes(bin_stream(items, issame))
    summary = unpack_bin(tmp_path / "lfw.bin", tmp_path / "lfw", progress=False)
    names = [f"{i:02d}{'.jpg' if i % 3 else '.png'}" for i in range(12)]
    expected = {n: p for n, p in zip(names, items)}
    expected["pairs.txt"] = (b"00.png 01.jpg 1\n02.jpg 03.png 0\n04.jpg 05.jpg 1\n"
                             b"06.png 07.jpg 0\n08.jpg 09.png 1\n10.jpg 11.jpg 0\n")
    assert files_of(tmp_path / "lfw") == expected
    assert (summary["images"], summary["pairs"], summary["same"]) == (12, 6, 3)


def test_unpack_bin_pixel_arrays_become_lossless_png(tmp_path):
    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(2)]
    (tmp_path / "x.bin").write_bytes(bin_stream(arrays, [True]))
    unpack_bin(tmp_path / "x.bin", tmp_path / "x", progress=False)
    for i, arr in enumerate(arrays):
        img = Image.open(tmp_path / "x" / f"{i}.png")
        np.testing.assert_array_equal(np.asarray(img.convert("RGB")), arr)  # RGB in the .bin = RGB in the file


@pytest.mark.parametrize("kind", ["bytes", "py2str", "ndarray"])
def test_unpack_bin_then_make_bin_round_trip(tmp_path, twelve, kind):
    items, issame = twelve
    src = tmp_path / "src.bin"
    if kind == "bytes":
        src.write_bytes(bin_stream(items, issame))
    elif kind == "ndarray":
        src.write_bytes(bin_stream([np.frombuffer(p, np.uint8) for p in items], issame))
    else:
        write_bin(src, items, issame, kind="py2str")
    unpack_bin(src, tmp_path / "u", progress=False)
    make_bin(tmp_path / "u", tmp_path / "u" / "pairs.txt", tmp_path / "back.bin", kind=kind, progress=False)
    got, got_same = load_bin(tmp_path / "back.bin")
    assert [bytes(g) for g in got] == items and got_same.tolist() == issame
    assert [type(g) for g in got] == [type(g) for g in load_bin(src)[0]]


def test_pixel_array_bin_round_trip_is_pixel_identical(tmp_path):
    rng = np.random.default_rng(4)
    arrays = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(4)]
    (tmp_path / "src.bin").write_bytes(bin_stream(arrays, [False, True]))
    unpack_bin(tmp_path / "src.bin", tmp_path / "u", progress=False)
    make_bin(tmp_path / "u", tmp_path / "u" / "pairs.txt", tmp_path / "back.bin", kind="ndarray", progress=False)
    got, same = load_bin(tmp_path / "back.bin")
    for g, a in zip(got, arrays):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(g.tobytes())).convert("RGB")), a)
    assert same.tolist() == [False, True]


def test_unpack_bin_npy(tmp_path):
    cs = colours(4)
    (tmp_path / "a.bin").write_bytes(bin_stream([png(c) for c in cs], [True, False]))
    unpack_bin(tmp_path / "a.bin", tmp_path / "a", npy=True, progress=False)
    images = np.load(tmp_path / "a" / "images.npy")
    assert images.dtype == np.uint8 and images.shape == (4, 112, 112, 3)
    np.testing.assert_array_equal(images, np.stack([np.full((112, 112, 3), c, np.uint8) for c in cs]))
    assert np.load(tmp_path / "a" / "issame.npy").tolist() == [True, False]


def test_unpack_dataset_folder(insightface_pack, tmp_path, twelve):
    pack, expected = insightface_pack
    items, issame = twelve
    (tmp_path / "pack" / "lfw.bin").write_bytes(bin_stream(items[:4], issame[:2]))
    (tmp_path / "pack" / "cfp_fp.bin").write_bytes(bin_stream(items[4:], issame[2:]))
    assert prepare_data.main(["unpack", pack, str(tmp_path / "out"), "--no-progress", "--npy"]) == 0
    found = files_of(tmp_path / "out")
    assert {k[len("train/"):]: v for k, v in found.items() if k.startswith("train/")} == expected
    assert found["lfw/pairs.txt"] == b"0.png 1.jpg 1\n2.jpg 3.png 0\n" and found["lfw/0.png"] == items[0]
    assert found["cfp_fp/pairs.txt"].count(b"\n") == 4 and "cfp_fp/images.npy" in found


def test_unpack_dataset_needs_rec_or_bins(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither train.rec nor any .bin"):
        unpack_dataset(tmp_path / "empty", tmp_path / "out", progress=False)


# ------------------------------------------------------------------------------- one-line errors




def test_cli_missing_rec(capsys, tmp_path):
    one_line_error(capsys, ["unpack-rec", str(tmp_path / "nope.rec"), str(tmp_path / "o")], "nope.rec",
                   "no such .rec file")


def test_cli_folder_without_train_rec(capsys, tmp_path):
    one_line_error(capsys, ["unpack-rec", str(tmp_path), str(tmp_path / "o")], "no train.rec in this folder")


def test_cli_truncated_rec_names_the_record(capsys, tmp_path):
    rec = write_rec(tmp_path / "p", [(0, ir(0.0, jpeg((1, 2, 3)))), (1, ir(1.0, jpeg((4, 5, 6))))])
    data = open(rec, "rb").read()
    open(rec, "wb").write(data[:-12])
    one_line_error(capsys, ["unpack-rec", rec, str(tmp_path / "o"), "--workers", "2", "--no-progress"],
                   "train.rec record 1", "truncated")


def test_cli_bad_bin(capsys, tmp_path):
    (tmp_path / "lfw.bin").write_bytes(b"this is not a pickle")
    one_line_error(capsys, ["unpack-bin", str(tmp_path / "lfw.bin"), str(tmp_path / "o")], "lfw.bin", "pickle")


def test_cli_unpack_rec_summary_line(capsys, insightface_pack, tmp_path):
    pack, _ = insightface_pack
    assert prepare_data.main(["unpack-rec", pack, str(tmp_path / "o"), "--no-progress"]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and "11 images of 3 classes" in out and "0 skipped" in out


def test_symlinked_class_folder_is_refused_and_nothing_written_outside(insightface_pack, tmp_path, capsys):
    pack, _ = insightface_pack
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").mkdir()
    os.symlink(elsewhere, tmp_path / "out" / "1")
    one_line_error(capsys, ["unpack-rec", pack, str(tmp_path / "out"), "--no-progress"],
                   os.path.join(str(tmp_path / "out"), "1"), "symlink")
    assert os.listdir(elsewhere) == []


def test_symlinked_image_file_is_refused(insightface_pack, tmp_path):
    pack, _ = insightface_pack
    target = tmp_path / "victim.jpg"
    target.write_bytes(b"keep me")
    (tmp_path / "out" / "0").mkdir(parents=True)
    os.symlink(target, tmp_path / "out" / "0" / "01.jpg")
    with pytest.raises(UnpackError) as e:
        unpack_rec(pack, tmp_path / "out", progress=False)
    assert "symlink" in str(e.value) and "01.jpg" in str(e.value)
    assert target.read_bytes() == b"keep me"


def test_another_pack_into_the_same_out_is_refused(insightface_pack, tmp_path, capsys):
    pack_a, expected = insightface_pack
    records_b = [(k, ir(0.0 if k < 6 else 1.0, jpeg(c))) for k, c in enumerate(colours(11))]
    write_rec(tmp_path / "b", records_b)  # same keys 0..10 as A's images: names would collide
    unpack_rec(pack_a, tmp_path / "out", progress=False)
    one_line_error(capsys, ["unpack-rec", str(tmp_path / "b"), str(tmp_path / "out"), "--no-progress"],
                   "different pack", os.path.realpath(os.path.join(pack_a, "train.rec")),
                   str(tmp_path / "b"), "another OUT")
    assert files_of(tmp_path / "out") == expected  # A's images untouched
    again = unpack_rec(pack_a, tmp_path / "out", progress=False)  # resuming A still works
    assert (again["written"], again["skipped"]) == (0, 11)


def test_manifest_records_the_source(insightface_pack, tmp_path):
    import json

    pack, _ = insightface_pack
    unpack_rec(pack, tmp_path / "out", progress=False)
    with open(tmp_path / "out" / MANIFEST) as fh:
        m = json.load(fh)
    rec = os.path.join(pack, "train.rec")
    assert m["source"] == os.path.realpath(rec) and m["rec_bytes"] == os.path.getsize(rec)
    assert (m["records"], m["images"], m["format"]) == (15, 11, None) and len(m["fingerprint"]) == 64


def test_images_without_a_manifest_are_not_taken_as_ours(insightface_pack, tmp_path):
    pack, _ = insightface_pack
    (tmp_path / "out" / "0").mkdir(parents=True)
    (tmp_path / "out" / "0" / "01.jpg").write_bytes(b"from somewhere else")
    with pytest.raises(ValueError, match="no record of which pack"):
        unpack_rec(pack, tmp_path / "out", progress=False)
