"""FaceRec / write_pack against packs built and parsed by hand with struct (the format facts)."""

import os
import pickle
import struct

import numpy as np
import pytest

from data.facerec import FaceRec, header_range, write_pack
from data.recordio import RecordIOError

M = struct.pack("<I", 0xCED7230A)


def chunk(cflag: int, body: bytes) -> bytes:
    return M + struct.pack("<I", (cflag << 29) | len(body)) + body + b"\0" * (-len(body) % 4)


def record(label, payload: bytes, rid: int = 0) -> bytes:
    """IRHeader '<IfQQ' (+ float32 labels when an array) + payload, as the facts describe."""
    if isinstance(label, (list, tuple)):
        return struct.pack("<IfQQ", len(label), 0.0, rid, 0) + struct.pack(f"<{len(label)}f", *label) + payload
    return struct.pack("<IfQQ", 0, float(label), rid, 0) + payload


def write_pack_by_hand(d, records: dict, split_keys=()) -> str:
    """Write .rec/.idx; records in ``split_keys`` must contain one aligned magic and are stored split."""
    blob, idx = b"", ""
    for key, data in records.items():
        idx += f"{key}\t{len(blob)}\n"
        if key in split_keys:
            cut = data.index(M)
            assert cut % 4 == 0
            blob += chunk(1, data[:cut]) + chunk(3, data[cut + 4:])
        else:
            blob += chunk(0, data)
    (d / "train.rec").write_bytes(blob)
    (d / "train.idx").write_text(idx)
    return str(d / "train.rec")


def insightface_records(ranges):
    """Header 0, images 1..N (class per range), identity records N+1.. with [first, end)."""
    n = ranges[-1][1] - 1
    recs = {0: record([n + 1, n + 1 + len(ranges)], b"")}
    for c, (lo, hi) in enumerate(ranges):
        for key in range(lo, hi):
            recs[key] = record(c, b"img%d" % key, key)
    for c, (lo, hi) in enumerate(ranges):
        recs[n + 1 + c] = record([lo, hi], b"")
    return recs


def test_insightface_layout_by_hand(tmp_path):
    recs = insightface_records([(1, 3), (3, 4), (4, 7)])
    recs[5] = record(2, b"abcd" + M + b"tail", 5)  # payload at offset 28 holds an aligned magic: stored split
    ds = FaceRec(write_pack_by_hand(tmp_path, recs, split_keys={5}))
    assert ds.layout == "insightface"
    assert ds.image_keys.tolist() == [1, 2, 3, 4, 5, 6]
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 0, 1, 2, 2, 2]
    assert ds.num_classes == 3 and len(ds) == 6
    assert ds.read(2) == (b"img3", 1)
    assert ds.read(4) == (b"abcd" + M + b"tail", 2)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.read(0) == (b"img1", 0)
    with pytest.raises(IndexError):
        ds.read(6)


def test_insightface_bad_identity_record_is_named(tmp_path):
    recs = insightface_records([(1, 3), (3, 4), (4, 7)])
    recs[8] = record([2, 4], b"")  # class 1 overlaps class 0, which ends at 3
    path = write_pack_by_hand(tmp_path, recs)
    with pytest.raises(RecordIOError, match=r"train\.rec identity record 8 \(class 1\): image range \[2, 4\)"):
        FaceRec(path)


def test_plain_pack_array_labels_and_property_without_newline(tmp_path):
    jpeg = b"\xff\xd8\xff\xe0fake"
    # record 0 carries a 2-value label that looks like a header range, but its payload is an image
    recs = {0: record([2, 7], jpeg), 1: record([0, 0.5], jpeg), 2: record([1, 0.5], jpeg), 3: record(2, jpeg)}
    path = write_pack_by_hand(tmp_path, recs)
    (tmp_path / "property").write_text("10,112,112")
    ds = FaceRec(path)
    assert ds.layout == "plain"
    assert ds.image_keys.tolist() == [0, 1, 2, 3]
    assert ds.labels.tolist() == [2, 0, 1, 2]
    assert ds.num_classes == 10 and ds.image_size == (112, 112)
    assert ds.read(1) == (jpeg, 0)
    (tmp_path / "property").write_text("2,112,112\n")  # smaller than max label + 1: labels win
    assert FaceRec(path).num_classes == 3


def parse_rec(rec_bytes: bytes, idx_text: str) -> dict:
    """Independent reader: follow the idx, join chunks (magic between), return key -> data."""
    out = {}
    for line in idx_text.splitlines():
        key, pos = (int(x) for x in line.split("\t"))
        parts = []
        while True:
            magic, lrec = struct.unpack_from("<II", rec_bytes, pos)
            assert magic == 0xCED7230A
            cflag, n = lrec >> 29, lrec & ((1 << 29) - 1)
            parts.append(rec_bytes[pos + 8:pos + 8 + n])
            pos += 8 + n + (-n % 4)
            if cflag in (0, 3):
                break
        out[key] = M.join(parts)
    return out


def parse_header(data: bytes):
    flag, label, _, _ = struct.unpack_from("<IfQQ", data)
    if flag:
        return flag, list(struct.unpack_from(f"<{flag}f", data, 24)), data[24 + 4 * flag:]
    return flag, label, data[24:]


def test_write_pack_parsed_independently(tmp_path):
    samples = [(0, b"a0"), (0, b"a1" + M), (1, b"b0"), (2, b"c0"), (2, b"c1"), (2, b"c2")]
    summary = write_pack(tmp_path / "out", samples)
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["property", "train.idx", "train.rec"]
    rec_bytes = (out / "train.rec").read_bytes()
    assert summary == {"images": 6, "classes": 3, "bytes": len(rec_bytes), "rec": str(out / "train.rec"),
                       "idx": str(out / "train.idx"), "property": str(out / "property")}
    records = parse_rec(rec_bytes, (out / "train.idx").read_text())
    assert sorted(records) == list(range(10))
    assert parse_header(records[0]) == (2, [7.0, 10.0], b"")
    for key, (label, payload) in enumerate(samples, start=1):
        assert parse_header(records[key]) == (0, float(label), payload)
    assert [parse_header(records[k]) for k in (7, 8, 9)] == [(2, [1.0, 3.0], b""), (2, [3.0, 4.0], b""),
                                                             (2, [4.0, 7.0], b"")]
    assert (out / "property").read_text() == "3,112,112\n"
    ds = FaceRec(out / "train.rec")
    assert ds.layout == "insightface" and ds.labels.tolist() == [0, 0, 1, 2, 2, 2]


def test_write_pack_label_order_violation(tmp_path):
    with pytest.raises(ValueError, match=r"sample 2: label 0 after label 1"):
        write_pack(tmp_path, [(0, b"a"), (1, b"b"), (0, b"c")])
    with pytest.raises(ValueError, match=r"sample 1: label 2 follows label 0; class 1 has no images"):
        write_pack(tmp_path, [(0, b"a"), (2, b"b")])
    assert os.listdir(tmp_path) == []  # nothing half-written


def test_header_without_identity_records_reads_image_labels(tmp_path):
    """Some third-party packers write header [N+1, num_classes] and no identity records."""
    recs = {0: record([4, 2], b""), 1: record(0, b"i1"), 2: record(0, b"i2"), 3: record([1, 9], b"i3")}
    ds = FaceRec(write_pack_by_hand(tmp_path, recs))
    assert ds.layout == "insightface"
    assert ds.image_keys.tolist() == [1, 2, 3] and ds.labels.tolist() == [0, 0, 1] and ds.num_classes == 2
    assert ds.read(2) == (b"i3", 1)


def _record(flag, labels, payload=b""):
    """IRHeader '<IfQQ' by hand: flag, label 0.0 (an array follows), ids 0; then float32 labels, payload."""
    return struct.pack("<IfQQ", flag, 0.0, 0, 0) + struct.pack(f"<{len(labels)}f", *labels) + payload


def test_header_range_rule_on_hand_built_records():
    assert header_range(_record(2, [5, 9])) == (5, 9)
    assert header_range(_record(3, [5, 9, 0])) == (5, 9)
    assert header_range(_record(1, [5])) is None  # a one-value array label: an image record
    assert header_range(_record(2, [5.5, 9])) is None
    assert header_range(_record(2, [0, 9])) is None
    assert header_range(_record(2, [5, 9], b"\xff\xd8\xff\xe0JFIF")) is None  # an image with a 2-value label
    assert header_range(_record(2, [5, 9], b"\x89PNG\r\n\x1a\n")) is None
    assert header_range(b"\x02\x00") is None  # shorter than an IRHeader


def test_idx_key_pointing_at_another_records_offset_is_refused(tmp_path):
    recs = insightface_records([(1, 3), (3, 4), (4, 7)])
    path = write_pack_by_hand(tmp_path, recs)
    lines = (tmp_path / "train.idx").read_text().splitlines()
    lines[4] = "4\t" + lines[3].split("\t")[1]  # key 4 now points at record 3's bytes
    (tmp_path / "train.idx").write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordIOError, match=r"train\.idx: keys 3 and 4 both point at byte"):
        FaceRec(path)


def test_header_with_zeroed_flag_and_no_property_is_refused(tmp_path):
    """Record 0's flag zeroed: a plain reading would take the identity records as images of class 1, 3, 4."""
    recs = insightface_records([(1, 3), (3, 4), (4, 7)])
    recs[0] = struct.pack("<IfQQ", 0, 0.0, 0, 0) + recs[0][24:]  # flag 0; the two float32 values stay
    path = write_pack_by_hand(tmp_path, recs)
    with pytest.raises(RecordIOError, match=r"record 7: no image payload after its IRHeader \(flag 2\)"):
        FaceRec(path)


@pytest.mark.parametrize("text", ["1000000000000,112,112", "99999999999999999999999,112,112"])
def test_property_claiming_absurd_class_count_is_refused_before_allocating(tmp_path, text):
    recs = insightface_records([(1, 3), (3, 4), (4, 7)])
    path = write_pack_by_hand(tmp_path, recs)
    (tmp_path / "property").write_text(text)
    with pytest.raises(RecordIOError, match=r"property: num_classes \d+ is not believable for a pack of 10"):
        FaceRec(path)


def test_header_claiming_huge_ranges_is_refused_before_allocating(tmp_path):
    recs = insightface_records([(1, 3), (3, 4), (4, 7)])
    recs[0] = record([2.0 ** 40, 2.0 ** 40 + 2.0 ** 20], b"")  # exact in float32
    path = write_pack_by_hand(tmp_path, recs)
    with pytest.raises(RecordIOError, match=r"record 0: header range \[1099511627776, 1099512676352\] runs past"):
        FaceRec(path)


def test_plain_label_of_3e9_is_refused(tmp_path):
    path = write_pack_by_hand(tmp_path, {0: record(0, b"\xff\xd8\xffa"), 1: record(3e9, b"\xff\xd8\xffb")})
    with pytest.raises(RecordIOError, match=r"record 1: label 3000000000 is not believable in a pack of 2"):
        FaceRec(path)
