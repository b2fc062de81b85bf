"""im2rec .lst files as a training source (train.py --data x.lst)."""

import cv2
import numpy as np
import pytest

from data.dataset import build_dataset
from data.sources import DataSourceError, open_source


def write_image(path, value: int) -> np.ndarray:
    """A flat 16x16 PNG (lossless) of one RGB colour; returns the RGB pixels."""
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = value, 255 - value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cv2.imencode(".png", rgb[..., ::-1])[1].tobytes())
    return rgb


@pytest.fixture
def lst(tmp_path):
    pixels = [write_image(tmp_path / "img" / f"{i}.png", 40 * i) for i in range(3)]
    (tmp_path / "train.lst").write_text("0\t2.000000\timg/0.png\n1\t0.000000\timg/1.png\n\n"
                                        "2\t2.000000\t1.5\timg/2.png\n")
    return tmp_path / "train.lst", pixels


def test_build_dataset_reads_images_and_labels_from_the_list(lst):
    path, pixels = lst
    ds = build_dataset(str(path), image_size=(16, 16))
    assert len(ds) == 3 and ds.num_classes == 3 and ds.labels.tolist() == [2, 0, 2]
    for i in range(3):
        img, label, _ = ds[i]
        assert label == [2, 0, 2][i]
        np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), pixels[i])


def test_property_beside_the_list_sets_the_class_count(lst):
    path, _ = lst
    (path.parent / "property").write_text("10,16,16")
    assert open_source(str(path)).num_classes == 10


def test_path_label_form_allows_spaces_in_paths(tmp_path):
    write_image(tmp_path / "a b" / "c d.png", 0)
    (tmp_path / "x.lst").write_text("a b/c d.png 4\n")
    src = open_source(str(tmp_path / "x.lst"))
    assert src.labels.tolist() == [4] and src.num_classes == 5 and src.read(0)[:4] == b"\x89PNG"


def test_lst_joined_with_another_source_offsets_labels(lst, tmp_path):
    path, _ = lst
    write_image(tmp_path / "folder" / "only" / "z.png", 9)
    ds = build_dataset(f"{path},{tmp_path / 'folder'}", image_size=(16, 16))
    assert ds.num_classes == 4 and ds.labels.tolist() == [2, 0, 2, 3]


def test_bad_label_names_file_and_line(tmp_path):
    (tmp_path / "x.lst").write_text("0\t1.0\ta.png\n1\t2.5\tb.png\n")
    with pytest.raises(DataSourceError, match=r"x\.lst line 2: label 2\.5 is not a class id"):
        open_source(str(tmp_path / "x.lst"))


def test_missing_image_is_one_line_naming_it(lst):
    path, _ = lst
    (path.parent / "img" / "1.png").unlink()
    src = open_source(str(path))
    with pytest.raises(DataSourceError, match=r"img/1\.png \(.*train\.lst line 2\): cannot read"):
        src.read(1)
    _, label, message = build_dataset(str(path), image_size=(16, 16))[1]
    assert label == -2 and "img/1.png" in message


@pytest.mark.parametrize("label", ["inf", "-inf", "nan", "1e300", "3e9", "9" * 400])
def test_inf_nan_and_huge_labels_are_one_line_errors(tmp_path, label):
    write_image(tmp_path / "img" / "0.png", 0)
    (tmp_path / "train.lst").write_text(f"0\t{label}\timg/0.png\n")
    with pytest.raises(DataSourceError, match=r"train\.lst line 1: label .* is not a class id"):
        open_source(str(tmp_path / "train.lst"))


def test_label_far_beyond_the_list_is_refused_before_allocating(tmp_path):
    write_image(tmp_path / "img" / "0.png", 0)
    (tmp_path / "train.lst").write_text("0\t2000000000\timg/0.png\n")  # fits int32, but 2e9 classes for 1 image
    with pytest.raises(DataSourceError, match=r"label 2000000000 is far beyond the 1 images"):
        open_source(str(tmp_path / "train.lst"))


def test_fifo_in_the_list_is_refused_unread(tmp_path):
    import os

    from utils.files import UnreadableFileError

    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    write_image(tmp_path / "img" / "0.png", 0)
    os.mkfifo(tmp_path / "img" / "1.png")  # open() would block forever
    (tmp_path / "train.lst").write_text("0\t0\timg/0.png\n1\t0\timg/1.png\n")
    source = open_source(str(tmp_path / "train.lst"))
    with pytest.raises(UnreadableFileError, match=r"1\.png: is a FIFO"):
        source.read(1)
    ds = build_dataset(str(tmp_path / "train.lst"), image_size=(16, 16))
    assert ds[1][1] in (-1, -2)  # a bad item for the loader to report, not a blocked worker
