"""evaluation.targets.load_targets: every problem of a target shows when it is loaded, before any training."""

import os
import pickle

import cv2
import numpy as np
import pytest

from data.bins import BinFormatError
from evaluation.targets import evaluate_targets, load_targets
from utils.files import UnreadableFileError


def jpegs(n: int) -> list[bytes]:
    rng = np.random.default_rng(3)
    return [cv2.imencode(".jpg", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))[1].tobytes() for _ in range(n)]


@pytest.mark.parametrize("pairs", [0, 1, 5])
def test_fewer_than_10_pairs_fail_at_load(tmp_path, pairs):
    (tmp_path / "lfw.bin").write_bytes(pickle.dumps((jpegs(2 * pairs), ([True, False] * pairs)[:pairs]), protocol=4)
                                       if pairs else pickle.dumps(([], []), protocol=4))
    with pytest.raises(BinFormatError, match=rf"lfw\.bin: {pairs} pairs?; needs at least 10 pairs for 10-fold"):
        load_targets(str(tmp_path), image_size=(8, 8), cache_dir=None)


@pytest.mark.parametrize("label, word", [(True, "same"), (False, "different")])
def test_one_label_set_warns_by_name_and_flags_the_result(tmp_path, label, word):
    (tmp_path / "agedb_30.bin").write_bytes(pickle.dumps((jpegs(40), [label] * 20), protocol=2))
    lines = []
    targets = load_targets(str(tmp_path), image_size=(8, 8), cache_dir=None, log=lines.append)
    t = targets.targets[0]
    assert t.warning == f"all 20 pairs are '{word}'"
    assert lines == [f"warning: verification target agedb_30 ({tmp_path / 'agedb_30.bin'}): all 20 pairs are "
                     f"'{word}'; its accuracy does not measure the model (one threshold can accept or "
                     "reject every pair)"]

    class Flat(torch_module()):  # any model scores ~100% on such a set
        def forward(self, x):
            return x.flatten(1)[:, :4].float()

    result = evaluate_targets(Flat(), targets.targets)["agedb_30"]
    assert result.accuracy >= 0.9 and result.to_dict()["warning"] == f"all 20 pairs are '{word}'"


def torch_module():
    import torch.nn as nn

    return nn.Module


def test_balanced_set_has_no_warning(tmp_path):
    (tmp_path / "lfw.bin").write_bytes(pickle.dumps((jpegs(24), [True, False] * 6), protocol=4))
    lines = []
    t = load_targets(str(tmp_path), image_size=(8, 8), cache_dir=None, log=lines.append).targets[0]
    assert t.warning is None and lines == []


@pytest.mark.parametrize("cache", [None, "dir"])
def test_fifo_or_device_target_refused_unread(tmp_path, cache):
    data = tmp_path / "data"
    data.mkdir()
    os.mkfifo(data / "lfw.bin")
    cache_dir = None if cache is None else str(tmp_path / "cache")
    with pytest.raises(UnreadableFileError, match=r"lfw\.bin: is a FIFO"):
        load_targets(str(data), cache_dir=cache_dir)
    os.unlink(data / "lfw.bin")
    os.symlink("/dev/zero", data / "lfw.bin")
    with pytest.raises(UnreadableFileError, match=r"lfw\.bin: is a device"):
        load_targets(str(data), cache_dir=cache_dir)
