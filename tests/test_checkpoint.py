"""Checkpoint files: read without running code, memory-mapped where possible, written atomically."""

import os
import pickle

import pytest
import torch

from utils import checkpoint as ckpt
from utils.checkpoint import CheckpointError, load_file, save_file


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("mmap", [False, True])
def test_zip_and_legacy_files_load_with_and_without_mmap(tmp_path, mmap):
    obj = {"w": torch.arange(12.0).view(3, 4), "step": 7, "names": ["a", "b"]}
    torch.save(obj, tmp_path / "zip.pt")
    torch.save(obj, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "legacy.pt"):
        got = load_file(str(tmp_path / name), mmap=mmap)
        assert got["step"] == 7 and got["names"] == ["a", "b"]
        torch.testing.assert_close(got["w"], obj["w"], rtol=0, atol=0)


@pytest.mark.parametrize("mmap", [False, True])
def test_code_in_the_pickle_is_refused(tmp_path, mmap):
    path = tmp_path / "evil.pt"
    torch.save({"x": _Boom()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_file(str(path), mmap=mmap)


def test_mapped_checkpoint_can_be_replaced_by_the_next_save(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    save_file({"w": torch.ones(4)}, path)
    old = load_file(path, mmap=True)
    save_file({"w": torch.zeros(4)}, path)
    assert old["w"].sum() == 4 and load_file(path)["w"].sum() == 0
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temp file left behind


def test_a_failed_save_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    save_file({"w": torch.ones(4)}, path)
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        save_file({"w": lambda: 0}, path)  # not picklable
    assert load_file(path)["w"].sum() == 4 and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_missing_and_damaged_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_file(str(tmp_path / "nope.pt"))
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=r"torn\.pt: damaged: entry .the zip directory."):
        load_file(str(tmp_path / "torn.pt"), mmap=True)


def test_keep_k_numbered_checkpoints(tmp_path):
    """keep=3: the three newest saves stay as checkpoint-<step>.pt; checkpoint.pt is the newest's content."""
    path = str(tmp_path / "checkpoint.pt")
    for step in (10, 20, 30, 40):
        ckpt.save_training_checkpoint(path, keep=3, step=step, model={"w": torch.full((2,), float(step))})
    assert [s for s, _ in ckpt.numbered_checkpoints(str(tmp_path))] == [20, 30, 40]
    assert ckpt.load_training_checkpoint(path)["step"] == 40
    assert ckpt.load_training_checkpoint(str(tmp_path / "checkpoint-00000020.pt"))["model"]["w"][0] == 20.0
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-00000020.pt", "checkpoint-00000030.pt",
                                            "checkpoint-00000040.pt", "checkpoint.pt"]


def test_check_finite_names_the_tensor():
    ckpt.check_finite({"a": torch.ones(3), "n": torch.tensor([1, 2])}, "x.pt")
    with pytest.raises(ckpt.CheckpointError, match="x.pt.*'b'.*1 NaN/inf"):
        ckpt.check_finite({"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])}, "x.pt")
