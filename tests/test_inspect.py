"""prepare_data.py inspect: packs and .bin files built by hand from FORMATS.md, good ones and planted faults."""

import json
import pickle
import struct

import cv2
import numpy as np
import pytest

import prepare_data

M = struct.pack("<I", 0xCED7230A)


def jpeg(seed: int) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


def record(label, payload: bytes = b"") -> bytes:
    """IRHeader '<IfQQ' (+ float32 labels for a list label) + payload."""
    if isinstance(label, list):
        return struct.pack("<IfQQ", len(label), 0.0, 0, 0) + struct.pack(f"<{len(label)}f", *label) + payload
    return struct.pack("<IfQQ", 0, float(label), 0, 0) + payload


def chunk(data: bytes) -> bytes:
    assert M not in data  # the test payloads never need splitting
    return M + struct.pack("<I", len(data)) + data + b"\0" * (-len(data) % 4)


def write_rec(folder, records: dict, prop: str | None) -> dict:
    """Write train.rec/.idx (+ property); returns key -> byte offset."""
    folder.mkdir(exist_ok=True)
    blob, offsets = b"", {}
    for key, data in records.items():
        offsets[key] = len(blob)
        blob += chunk(data)
    (folder / "train.rec").write_bytes(blob)
    (folder / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in offsets.items()))
    if prop is not None:
        (folder / "property").write_text(prop)
    return offsets


def insightface(folder, payloads=None) -> dict:
    """Two classes of three 16x16 JPEGs: header 0, images 1..6, identity records 7, 8."""
    payloads = payloads or {k: jpeg(k) for k in range(1, 7)}
    recs = {0: record([7, 9])}
    recs.update({k: record((k - 1) // 3, payloads[k]) for k in range(1, 7)})
    recs.update({7: record([1, 4]), 8: record([4, 7])})
    return write_rec(folder, recs, "2,16,16\n")


def inspect(capsys, *argv):
    code = prepare_data.main(["inspect", *map(str, argv), "--no-progress", "--no-plot"])
    return code, capsys.readouterr().out


def test_good_pack_exits_0_with_counts_and_plot(tmp_path, capsys):
    insightface(tmp_path / "pack")
    code = prepare_data.main(["inspect", str(tmp_path / "pack"), "--full", "--no-progress",
                              "--plot", str(tmp_path / "c.png"), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0 and "insightface layout, 6 images, 2 classes (labels 0..1)" in out and "no problems" in out
    report = json.load(open(tmp_path / "r.json"))[0]
    assert report["per_class"] == {"min": 3, "median": 3.0, "max": 3}
    assert report["sizes"] == {"16x16": 6} and report["formats"] == {"jpeg": 6}
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_magic_in_the_middle_is_named(tmp_path, capsys):
    offsets = insightface(tmp_path / "pack")
    rec = tmp_path / "pack" / "train.rec"
    data = bytearray(rec.read_bytes())
    data[offsets[4]:offsets[4] + 4] = b"\0\0\0\0"
    rec.write_bytes(bytes(data))
    code, out = inspect(capsys, tmp_path / "pack", "--full")
    assert code == 1 and "train.rec record 4 at byte" in out and "bad magic 0x00000000" in out


def test_truncated_rec_names_the_cut_record(tmp_path, capsys):
    offsets = insightface(tmp_path / "pack")
    rec = tmp_path / "pack" / "train.rec"
    rec.write_bytes(rec.read_bytes()[:offsets[5] + 20])  # record 5 cut inside its payload
    code, out = inspect(capsys, tmp_path / "pack", "--full")
    assert code == 1 and "train.rec record 5 at byte" in out and "truncated record" in out
    assert "train.rec record 6 at byte" in out and "past the end of the file" in out


def test_truncated_rec_without_full_is_one_problem_not_a_traceback(tmp_path, capsys):
    offsets = insightface(tmp_path / "pack")
    rec = tmp_path / "pack" / "train.rec"
    rec.write_bytes(rec.read_bytes()[:offsets[5] + 20])
    code, out = inspect(capsys, tmp_path / "pack")
    assert code == 1 and "PROBLEM" in out and "train.rec record 6" in out and "--full" in out


def test_undecodable_payload_is_named(tmp_path, capsys):
    payloads = {k: jpeg(k) for k in range(1, 7)}
    payloads[3] = b"\xff\xd8\xff\xe0 not really a jpeg"
    insightface(tmp_path / "pack", payloads)
    code, out = inspect(capsys, tmp_path / "pack", "--full")
    assert code == 1 and "train.rec record 3: undecodable image" in out


def test_label_beyond_property_is_named(tmp_path, capsys):
    write_rec(tmp_path / "pack", {k: record(label, jpeg(k)) for k, label in enumerate([0, 1, 2, 9])}, "3,16,16")
    code, out = inspect(capsys, tmp_path / "pack", "--full")
    assert code == 1 and "plain layout" in out and "train.rec record 3: label 9 >= 3 classes" in out


def test_identity_record_disagreeing_with_image_label_is_named(tmp_path, capsys):
    recs = {0: record([7, 9])}
    recs.update({k: record(0 if k < 4 else 1, jpeg(k)) for k in range(1, 7)})
    recs[4] = record(0, jpeg(4))  # image 4 says class 0, identity record 8 puts it in class 1
    recs.update({7: record([1, 4]), 8: record([4, 7])})
    write_rec(tmp_path / "pack", recs, "2,16,16")
    code, out = inspect(capsys, tmp_path / "pack", "--full")
    assert code == 1 and "record 4: image label 0 but identity record 8 puts it in class 1" in out


def write_bin(path, payloads, issame):
    path.write_bytes(pickle.dumps((payloads, issame), protocol=2))


def test_bin_reports_pairs_and_balance(tmp_path, capsys):
    write_bin(tmp_path / "lfw.bin", [jpeg(i) for i in range(24)], [True] * 7 + [False] * 5)
    code, out = inspect(capsys, tmp_path / "lfw.bin")
    assert code == 0 and "12 pairs (7 same, 5 different), items: bytes x24" in out
    assert "checked 24 of 24 images: sizes 16x16 x24; formats jpeg x24" in out


def test_bin_undecodable_item_is_named(tmp_path, capsys):
    items = [jpeg(i) for i in range(20)]
    items[3] = b"garbage"
    write_bin(tmp_path / "x.bin", items, [True, False] * 5)
    code, out = inspect(capsys, tmp_path / "x.bin", "--full")
    assert code == 1 and "x.bin item 3 (pair 1): undecodable image" in out


def test_dataset_folder_reports_every_file(tmp_path, capsys):
    insightface(tmp_path / "pack")
    write_bin(tmp_path / "pack" / "agedb_30.bin", [jpeg(i) for i in range(20)], [True, False] * 5)
    (tmp_path / "pack" / "cfp_fp.bin").write_bytes(b"not a pickle")
    code, out = inspect(capsys, tmp_path / "pack")
    assert code == 1
    assert "agedb_30.bin: 10 pairs" in out and "cfp_fp.bin: unreadable" in out and "train.rec: insightface" in out
    assert "inspect: 3 file(s)" in out


def test_missing_path_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["inspect", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "nope" in err


MODES = [(), ("--full",)]


@pytest.mark.parametrize("mode", MODES)
def test_idx_key_pointing_at_another_record_is_a_problem(tmp_path, capsys, mode):
    offsets = insightface(tmp_path / "pack")
    offsets[5] = offsets[4]
    (tmp_path / "pack" / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in offsets.items()))
    code, out = inspect(capsys, tmp_path / "pack", *mode)
    assert code == 1 and "PROBLEM" in out
    assert ("keys 4 and 5 both point at byte" in out) if not mode else ("record 5: the index points it at" in out)


@pytest.mark.parametrize("mode", MODES)
def test_header_flag_zeroed_without_property_is_a_problem(tmp_path, capsys, mode):
    insightface(tmp_path / "pack")
    recs = {0: record(0.0, struct.pack("<2f", 7, 9))}  # flag zeroed: the two label floats become a payload
    recs.update({k: record((k - 1) // 3, jpeg(k)) for k in range(1, 7)})
    recs.update({7: record([1, 4]), 8: record([4, 7])})
    write_rec(tmp_path / "pack", recs, None)
    (tmp_path / "pack" / "property").unlink()
    code, out = inspect(capsys, tmp_path / "pack", *mode)
    assert code == 1 and "PROBLEM" in out
    assert "record 7" in out


@pytest.mark.parametrize("mode", MODES)
def test_empty_idx_is_a_problem(tmp_path, capsys, mode):
    insightface(tmp_path / "pack")
    (tmp_path / "pack" / "train.idx").write_text("")
    code, out = inspect(capsys, tmp_path / "pack", *mode)
    assert code == 1 and ("no records" in out or "lists no records" in out)


@pytest.mark.parametrize("mode", MODES)
def test_zero_image_pack_is_a_problem(tmp_path, capsys, mode):
    write_rec(tmp_path / "pack", {0: record([1, 1])}, "1,16,16\n")  # header only: images 1..0, no classes
    code, out = inspect(capsys, tmp_path / "pack", *mode)
    assert code == 1 and "the pack holds no images" in out


@pytest.mark.parametrize("mode", MODES)
def test_property_of_10_12_classes_is_a_problem_not_a_memory_error(tmp_path, capsys, mode):
    insightface(tmp_path / "pack")
    (tmp_path / "pack" / "property").write_text("1000000000000,16,16\n")
    code, out = inspect(capsys, tmp_path / "pack", *mode)
    assert code == 1 and "num_classes 1000000000000 is not believable for a pack of 9 records" in out


def test_full_scan_label_of_3e9_is_a_problem(tmp_path, capsys):
    write_rec(tmp_path / "pack", {0: record(0, jpeg(0)), 1: record(3e9, jpeg(1))}, None)
    code, out = inspect(capsys, tmp_path / "pack", "--full")
    assert code == 1 and "record 1: label 3000000000 is not believable" in out


@pytest.mark.parametrize("pairs", [0, 1, 5, 9])
def test_bin_with_fewer_than_10_pairs_is_a_problem(tmp_path, capsys, pairs):
    issame = [True, False] * (pairs // 2) + [True] * (pairs % 2)
    write_bin(tmp_path / "x.bin", [jpeg(i) for i in range(2 * pairs)], issame)
    code, out = inspect(capsys, tmp_path / "x.bin")
    assert code == 1 and "x.bin" in out and "PROBLEM" in out


@pytest.mark.parametrize("same", [True, False])
def test_bin_with_one_sided_pairs_is_a_problem(tmp_path, capsys, same):
    write_bin(tmp_path / "x.bin", [jpeg(i) for i in range(24)], [same] * 12)
    code, out = inspect(capsys, tmp_path / "x.bin")
    assert code == 1 and f"all 12 pairs are {'same' if same else 'different'}-person pairs" in out
