"""Training data sources: packs, .rec files, image folders, joined sources, bad input."""

import os
import shutil
import struct

import numpy as np
import pytest
import torch

from data.dataset import ResumableBatchSampler, build_dataset, collate, decode_image
from data.facerec import FaceRec
from data.recordio import RecordIOError
from data.sources import DataSourceError, open_source


def _unpack_to_folder(pack: str, out: str) -> None:
    rec = FaceRec(os.path.join(pack, "train.rec"))
    for i in range(len(rec)):
        payload, label = rec.read(i)
        os.makedirs(os.path.join(out, f"id{label:03d}"), exist_ok=True)
        with open(os.path.join(out, f"id{label:03d}", f"{i}.jpg"), "wb") as fh:
            fh.write(payload)


def test_pack_rec_and_folder_agree(tiny_pack, tmp_path):
    folder = str(tmp_path / "imgs")
    _unpack_to_folder(tiny_pack, folder)
    a = open_source(tiny_pack)
    b = open_source(os.path.join(tiny_pack, "train.rec"))
    c = open_source(folder)
    assert len(a) == len(b) == len(c) == 36
    assert a.num_classes == b.num_classes == c.num_classes == 6
    np.testing.assert_array_equal(a.labels, c.labels)  # class folders sorted like labels
    assert a.read(5) == c.read(5)


def test_joined_sources_offset_labels(tiny_pack, tmp_path):
    folder = str(tmp_path / "imgs")
    _unpack_to_folder(tiny_pack, folder)
    ds = build_dataset(f"{tiny_pack},{folder}")
    assert ds.num_classes == 12 and len(ds) == 72
    assert ds.labels[:36].max() == 5 and ds.labels[36:].min() == 6
    img, label, idx = ds[40]
    assert img.dtype == torch.uint8 and img.shape == (3, 112, 112) and label == ds.labels[40] and idx == 40


def test_decoded_image_is_rgb():
    import cv2

    rgb = np.zeros((112, 112, 3), np.uint8)
    rgb[..., 0] = 200  # red
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = decode_image(png.tobytes())
    assert ok and out[0, 0].tolist() == [200, 0, 0]


def test_missing_path_is_one_line_error(tmp_path):
    with pytest.raises(DataSourceError, match="no such file or directory"):
        open_source(str(tmp_path / "nope"))


def test_label_beyond_property_names_record(tiny_pack, tmp_path):
    pack = tmp_path / "pack"
    shutil.copytree(tiny_pack, pack)
    (pack / "property").write_text("4,112,112\n")
    with pytest.raises(DataSourceError, match=r"train.rec record \d+: label 4 outside \[0, 4\)"):
        open_source(str(pack))


def test_truncated_rec_names_file(tiny_pack, tmp_path):
    pack = tmp_path / "pack"
    shutil.copytree(tiny_pack, pack)
    rec = pack / "train.rec"
    rec.write_bytes(rec.read_bytes()[: rec.stat().st_size // 2])
    with pytest.raises(RecordIOError, match="train.rec"):
        src = open_source(str(pack))
        for i in range(len(src)):
            src.read(i)


def test_idx_past_end_names_record(tiny_pack, tmp_path):
    pack = tmp_path / "pack"
    shutil.copytree(tiny_pack, pack)
    idx = pack / "train.idx"
    lines = idx.read_text().splitlines()
    key = lines[3].split("\t")[0]
    lines[3] = f"{key}\t99999999"
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordIOError, match=rf"train.rec record {key} at byte 99999999"):
        open_source(str(pack))


def test_corrupt_jpeg_is_dropped_not_fatal(tiny_pack, tmp_path):
    folder = tmp_path / "imgs"
    _unpack_to_folder(tiny_pack, str(folder))
    bad = sorted((folder / "id002").iterdir())[0]
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    ds = build_dataset(str(folder))
    i = [k for k in range(len(ds)) if ds.describe(k) == str(bad)][0]
    assert ds[i][1] == -1
    images, labels, dropped = collate([ds[i], ds[0]])
    assert dropped == [i] and images.shape[0] == 1 and labels.tolist() == [0]


def test_sampler_resumes_mid_epoch_and_shards():
    s = ResumableBatchSampler(100, 8, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=5)
    assert list(s) == full[5:]
    s.set_epoch(3)
    assert list(s) != full
    r0, r1 = ResumableBatchSampler(100, 8, seed=3, rank=0, world_size=2), \
        ResumableBatchSampler(100, 8, seed=3, rank=1, world_size=2)
    b0, b1 = sum(list(r0), []), sum(list(r1), [])
    assert len(b0) == len(b1) == 48 and not set(b0) & set(b1)


def test_fixture_pack_starts_with_the_recordio_magic(tiny_pack):
    with open(os.path.join(tiny_pack, "train.rec"), "rb") as fh:
        magic, = struct.unpack("<I", fh.read(4))
    assert magic == 0xCED7230A
