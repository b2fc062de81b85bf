"""evaluation/ijb_faces.py: loose crops built by a known similarity are aligned back; the crop cache."""

import os
import struct
from collections import namedtuple

import cv2
import numpy as np
import pytest

from data.ijb import IJBFaces
from detection.align import ARCFACE_112
from evaluation import ijb_faces
from evaluation.ijb_faces import aligned_faces, entry_key, iter_aligned

Face = namedtuple("Face", "name landmarks")


def pattern(seed):
    """A smooth 112x112 RGB image (low frequencies: bilinear resampling barely changes it)."""
    y, x = np.mgrid[0:112, 0:112] / 111.0
    rng = np.random.default_rng(seed)
    chans = [127 + 100 * np.sin(2 * np.pi * (rng.uniform(0.5, 1.5) * x + rng.uniform(0.5, 1.5) * y + rng.random()))
             for _ in range(3)]
    return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


def similarity(scale, degrees, tx, ty):
    a = np.deg2rad(degrees)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


def loose_crop(folder, name, rgb, m, shape=(400, 380)):
    """Write rgb warped by m into a bigger BGR image; return the template's 5 points pushed through m."""
    big = cv2.warpAffine(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), m, (shape[1], shape[0]), flags=cv2.INTER_LINEAR)
    params = [cv2.IMWRITE_JPEG_QUALITY, 97] if name.endswith(".jpg") else []
    assert cv2.imwrite(os.path.join(folder, name), big, params)
    pts = ARCFACE_112 @ m[:, :2].T + m[:, 2]
    return Face(name, pts.astype(np.float32))


def faces_of(items, key="k" * 64):
    n = len(items)
    return IJBFaces(names=np.array([f.name for f in items]), landmarks=np.stack([f.landmarks for f in items]),
                    faceness=np.ones(n, np.float32), templates=np.arange(n, dtype=np.int64),
                    medias=np.arange(n, dtype=np.int64), key=key)


def collect(batches):
    batches = list(batches)
    starts = [b.start for b in batches]
    assert starts == sorted(starts) and all(b.images.dtype == np.uint8 for b in batches)
    return np.concatenate([b.images for b in batches]), np.concatenate([b.ok for b in batches])


@pytest.fixture
def release(tmp_path):
    folder = tmp_path / "loose_crop"
    folder.mkdir()
    items, truth = [], []
    for i, (m, ext) in enumerate([(similarity(1.6, 15, 80, 30), ".png"), (similarity(2.1, -30, 40, 150), ".jpg"),
                                  (similarity(1.3, 0, 40, 50), ".jpg"), (similarity(1.8, 170, 260, 260), ".png")]):
        rgb = pattern(i)
        items.append(loose_crop(str(folder), f"{i}{ext}", rgb, m))
        truth.append(rgb)
    return str(folder), items, np.stack(truth)


def test_alignment_recovers_the_pattern(release):
    folder, items, truth = release
    images, ok = collect(iter_aligned(faces_of(items), folder, batch_size=3, workers=0))
    assert ok.all() and images.shape == (4, 112, 112, 3)
    err = np.abs(images[:, 3:-3, 3:-3].astype(float) - truth[:, 3:-3, 3:-3]).mean(axis=(1, 2, 3))
    assert (err < 3.0).all(), err  # two bilinear resamplings (+ JPEG q97 for two of them)
    assert err[0] < 1.5 and err[3] < 1.5, err  # PNG: interpolation only


def test_missing_corrupt_and_degenerate_faces_are_zero_and_not_ok(release):
    folder, items, _ = release
    open(os.path.join(folder, "bad.jpg"), "wb").write(b"\xff\xd8\xff\xe0 not a jpeg")
    bad = [Face("nothere.jpg", items[0].landmarks), Face("bad.jpg", items[0].landmarks),
           Face(items[1].name, np.full((5, 2), 50, np.float32))]
    images, ok = collect(iter_aligned(faces_of([items[0], *bad]), folder, batch_size=2, workers=0))
    assert ok.tolist() == [True, False, False, False]
    assert not images[1:].any() and images[0].any()


def exif_jpeg(path, bgr, orientation):
    """A JPEG whose APP1 segment carries an EXIF Orientation tag, written byte by byte."""
    enc = cv2.imencode(".jpg", bgr)[1].tobytes()
    tiff = b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + b"\0" * 4
    app1 = b"\xff\xe1" + struct.pack(">H", len(tiff) + 8) + b"Exif\x00\x00" + tiff
    open(path, "wb").write(enc[:2] + app1 + enc[2:])


def test_images_are_read_as_cv2_imread_reads_them(tmp_path):
    """The reference calls cv2.imread: EXIF orientation applied, grey -> 3 channels. Ours must match it."""
    bgr = cv2.resize(cv2.cvtColor(pattern(7), cv2.COLOR_RGB2BGR), (200, 120))
    exif_jpeg(str(tmp_path / "rot.jpg"), bgr, 6)
    cv2.imwrite(str(tmp_path / "grey.jpg"), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    pts = (ARCFACE_112 + 10).astype(np.float32)
    assert cv2.imread(str(tmp_path / "rot.jpg")).shape == (200, 120, 3)  # the tag is honoured by imread
    images, ok = collect(iter_aligned(faces_of([Face("rot.jpg", pts), Face("grey.jpg", pts)]), str(tmp_path),
                                      workers=0))
    assert ok.all()
    for k, name in enumerate(["rot.jpg", "grey.jpg"]):
        ref_img = cv2.imread(str(tmp_path / name))
        m = cv2.estimateAffinePartial2D(pts, ARCFACE_112.astype(np.float32))[0]  # an independent fit, LMedS/RANSAC
        expected = cv2.cvtColor(cv2.warpAffine(ref_img, m, (112, 112), borderValue=0.0), cv2.COLOR_BGR2RGB)
        assert np.abs(images[k].astype(int) - expected).max() <= 1, name


def test_workers_give_the_same_bytes(release):
    folder, items, _ = release
    faces = faces_of(items * 3)
    in_process, ok0 = collect(iter_aligned(faces, folder, batch_size=5, workers=0))
    two, ok2 = collect(iter_aligned(faces, folder, batch_size=5, workers=2))
    assert in_process.tobytes() == two.tobytes() and ok0.tolist() == ok2.tolist()


def test_cache_second_call_reads_the_entry_without_decoding(release, tmp_path, monkeypatch):
    folder, items, _ = release
    faces, logs = faces_of(items + [Face("gone.jpg", items[0].landmarks)]), []
    first, ok1 = collect(aligned_faces(faces, folder, str(tmp_path / "cache"), batch_size=2, workers=0,
                                       log=logs.append))
    entry = tmp_path / "cache" / "ijb" / entry_key(faces, folder)
    assert sorted(os.listdir(entry)) == ["crops.npy", "entry.json", "ok.npy"]
    assert os.listdir(tmp_path / "cache" / "ijb") == [entry.name]  # no temporary folder left
    assert sum("1 of 5" in line and "gone.jpg" in line for line in logs) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cache hit decoded an image")

    monkeypatch.setattr(ijb_faces, "align_one", no_decoding)
    second, ok2 = collect(aligned_faces(faces, folder, str(tmp_path / "cache"), batch_size=3, workers=0,
                                        log=logs.append))
    assert second.tobytes() == first.tobytes() and ok2.tolist() == ok1.tolist() == [True] * 4 + [False]


def test_replaced_images_with_the_same_meta_are_aligned_again(release, tmp_path):
    """Same meta files, other pixels (a synthetic set regenerated at another difficulty): not the old crops."""
    folder, items, _ = release
    faces, cache = faces_of(items), str(tmp_path / "cache")
    first, _ = collect(aligned_faces(faces, folder, cache, batch_size=2, workers=0, log=lambda s: None))
    path = os.path.join(folder, items[0].name)
    img = cv2.imread(path)
    assert cv2.imwrite(path, 255 - img)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    second, ok = collect(aligned_faces(faces, folder, cache, batch_size=2, workers=0, log=lambda s: None))
    assert ok.all() and second[1:].tobytes() == first[1:].tobytes()
    assert np.abs(second[0].astype(int) - first[0].astype(int)).mean() > 20
    assert len(os.listdir(os.path.join(cache, "ijb"))) == 2  # a second entry, the first left as it was


def test_interrupted_run_leaves_no_entry(release, tmp_path):
    folder, items, _ = release
    faces = faces_of(items)
    gen = aligned_faces(faces, folder, str(tmp_path / "cache"), batch_size=1, workers=0, log=lambda s: None)
    next(gen)
    gen.close()
    assert os.listdir(tmp_path / "cache" / "ijb") == []


@pytest.mark.parametrize("damage", ["no_json", "truncated", "flipped"])
def test_damaged_entry_is_not_used(release, tmp_path, damage):
    folder, items, _ = release
    faces, cache, logs = faces_of(items), str(tmp_path / "cache"), []
    truth, _ = collect(aligned_faces(faces, folder, cache, batch_size=2, workers=0, log=logs.append))
    entry = os.path.join(cache, "ijb", entry_key(faces, folder))
    crops = os.path.join(entry, "crops.npy")
    if damage == "no_json":
        os.remove(os.path.join(entry, "entry.json"))
    elif damage == "truncated":
        os.truncate(crops, os.path.getsize(crops) - 1000)
    else:
        with open(crops, "r+b") as fh:
            fh.seek(os.path.getsize(crops) - 5000)
            fh.write(bytes([fh.read(1)[0] ^ 0xFF]))
    again, ok = collect(aligned_faces(faces, folder, cache, batch_size=2, workers=0, log=logs.append))
    assert again.tobytes() == truth.tobytes() and ok.all()
    if damage == "flipped":
        assert any("does not match its checksums" in line for line in logs)


def test_too_little_disk_runs_uncached(release, tmp_path, monkeypatch):
    folder, items, _ = release
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ijb_faces.shutil, "disk_usage", lambda p: usage(10, 10, 1000))
    logs = []
    images, ok = collect(aligned_faces(faces_of(items), folder, str(tmp_path / "cache"), workers=0, log=logs.append))
    assert ok.all() and not os.path.exists(tmp_path / "cache" / "ijb")
    assert len(logs) == 1 and "not caching" in logs[0]


def test_no_cache_dir_means_uncached(release, tmp_path):
    folder, items, _ = release
    images, ok = collect(aligned_faces(faces_of(items), folder, None, workers=0, log=lambda s: None))
    assert ok.all() and images.shape == (4, 112, 112, 3)
