"""Checkpoint files: read without running code, memory-mapped where possible, written atomically."""

import os
import pickle

import pytest
import torch

from backbones.weights import load_backbone_checkpoint
from engine.checkpoint import (
    load_training_checkpoint,
    numbered_checkpoints,
    resumable_checkpoint,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)
from utils.torchfile import CheckpointError, check_finite, load_file, save_file


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
        save_training_checkpoint(path, keep=3, step=step, model={"w": torch.full((2,), float(step))})
    assert [s for s, _ in numbered_checkpoints(str(tmp_path))] == [20, 30, 40]
    assert load_training_checkpoint(path)["step"] == 40
    assert load_training_checkpoint(str(tmp_path / "checkpoint-00000020.pt"))["model"]["w"][0] == 20.0
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-00000020.pt", "checkpoint-00000030.pt",
                                            "checkpoint-00000040.pt", "checkpoint.pt"]


def test_check_finite_names_the_tensor():
    check_finite({"a": torch.ones(3), "n": torch.tensor([1, 2])}, "x.pt")
    with pytest.raises(CheckpointError, match="x.pt.*'b'.*1 NaN/inf"):
        check_finite({"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])}, "x.pt")


# ---------------------------------------------------------------- integrity: the zip CRC-32s torch stores
def _flip_in_tensor(path, tensor):
    """Flip one byte of ``tensor``'s raw bytes inside the file (found by content, not by our reader)."""
    raw = bytearray(path.read_bytes())
    at = raw.find(tensor.numpy().tobytes())
    assert at > 0
    raw[at + 5] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("mmap", [False, True])
def test_a_flipped_weight_byte_is_refused_naming_the_entry(tmp_path, mmap):
    w = torch.arange(64, dtype=torch.float32)
    path = tmp_path / "backbone.pt"
    torch.save({"state_dict": {"w": w}}, path)
    _flip_in_tensor(path, w)
    altered = torch.load(path, weights_only=True)["state_dict"]["w"]
    assert not torch.equal(altered, w)  # torch alone loads the damage silently
    with pytest.raises(CheckpointError, match=r"backbone\.pt: damaged: entry 'backbone/data/0'.*CRC") as err:
        load_file(str(path), mmap=mmap)
    assert "\n" not in str(err.value)


def test_a_flipped_pickle_byte_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "facetrain-checkpoint", "step": 12345}, path)
    raw = bytearray(path.read_bytes())
    raw[raw.find(b"facetrain")] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"entry 'checkpoint/data\.pkl'"):
        load_file(str(path))


def test_foreign_and_legacy_files_still_load(tmp_path):
    """No checksum to check in the legacy format: it loads as before (only its structure is checked)."""
    sd = {"conv.weight": torch.ones(2, 3)}
    torch.save({"state_dict": sd}, tmp_path / "foreign.pth")
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    from backbones.weights import load_state_dict_file
    for name in ("foreign.pth", "legacy.pth"):
        assert torch.equal(load_state_dict_file(tmp_path / name)["conv.weight"], sd["conv.weight"])


# ------------------------------------------------------- torch's refusal text never reaches the user
@pytest.mark.parametrize("legacy", [False, True])
def test_refusal_is_one_short_line_naming_the_global(tmp_path, legacy):
    from backbones.weights import load_state_dict_file
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": _Boom()}}, path, pickle_module=pickle, _use_new_zipfile_serialization=not legacy)
    for load in (load_file, load_state_dict_file):
        with pytest.raises(CheckpointError) as err:
            load(str(path))
        msg = str(err.value)
        assert "evil.pth: refused to load: it needs code (os.system)" in msg
        assert "\n" not in msg and "2.6" not in msg and "weights_only` set" not in msg and len(msg) < 200


# --------------------------------------------------------------- malformed but safe files: one line each
def _rng():
    return rng_state()


def _train(**over):
    obj = {"format": "facetrain-checkpoint", "version": 1, "step": 3, "model": {"w": torch.ones(2)},
           "head": {}, "optimizer": {"state": {}, "param_groups": []}, "best": -1.0, "skipped": 0,
           "history": {"step": [1], "loss": [0.5]}, "rng": _rng(), "config": {"backbone": "mbf"}}
    for k, v in over.items():
        if v is _DROP:
            obj.pop(k)
        else:
            obj[k] = v
    return obj


_DROP = object()


def _bad_rng(**over):
    r = _rng()
    r.update(over)
    return r


@pytest.mark.parametrize("over,needle", [
    ({"model": _DROP}, "no 'model' field"),
    ({"model": {"w": [1.0]}}, "model entry 'w' is a list, not a tensor"),
    ({"model": "weights"}, "field 'model' is a str"),
    ({"step": -5}, "field 'step' is -5"),
    ({"step": 10**12}, "field 'step' is 1000000000000"),
    ({"step": "7"}, "field 'step' is '7'"),
    ({"step": True}, "field 'step' is True"),
    ({"step": _DROP}, "no 'step' field"),
    ({"version": 99}, "version 99 is newer than this code"),
    ({"version": 0}, "field 'version' is 0"),
    ({"version": "one"}, "field 'version' is 'one'"),
    ({"format": "other"}, "not a training checkpoint"),
    ({"config": "backbone=mbf"}, "field 'config' is a str, not a mapping"),
    ({"history": "loss"}, "field 'history' is a str"),
    ({"history": {"loss": 0.5}}, "history['loss'] is a float, not a list"),
    ({"best": "0.9"}, "field 'best' is a str"),
    ({"skipped": -1}, "field 'skipped' is -1"),
    ({"skipped": 2.5}, "field 'skipped' is 2.5"),
    ({"rng": [1, 2]}, "rng is not a mapping"),
    ({"rng": _bad_rng(torch=torch.zeros(10, dtype=torch.uint8))}, "rng.torch is not a uint8 tensor"),
    ({"rng": _bad_rng(torch=torch.zeros(5056))}, "rng.torch is not a uint8 tensor"),
    ({"rng": _bad_rng(python=(3, (1, 2), None))}, "rng.python is not"),
    ({"rng": _bad_rng(numpy={"keys": torch.zeros(3, dtype=torch.int64), "pos": 0, "has_gauss": 0,
                             "cached_gaussian": 0.0})}, "rng.numpy.keys"),
])
def test_malformed_training_checkpoint_is_one_line(tmp_path, over, needle):
    path = tmp_path / "checkpoint.pt"
    torch.save(_train(**over), path)
    with pytest.raises(CheckpointError) as err:
        load_training_checkpoint(str(tmp_path))
    msg = str(err.value)
    assert "checkpoint.pt" in msg and needle in msg and "\n" not in msg, msg


def test_a_valid_hand_built_training_checkpoint_loads(tmp_path):
    torch.save(_train(), tmp_path / "checkpoint.pt")
    state = load_training_checkpoint(str(tmp_path))
    assert state["step"] == 3 and torch.equal(state["model"]["w"], torch.ones(2))


def test_set_rng_state_restores_and_refuses_a_bad_state():
    import random
    state = rng_state()
    first = (torch.rand(2), random.random())
    set_rng_state(state)
    assert torch.equal(torch.rand(2), first[0]) and random.random() == first[1]
    py = list(state["python"])
    py[1] = tuple(py[1][:-1]) + (10**6,)  # the index past the 624-word state
    with pytest.raises(CheckpointError, match="rng.python"):
        set_rng_state(dict(state, python=tuple(py)), "x.pt")


def _backbone(**over):
    obj = {"format": "facetrain-backbone", "version": 1, "backbone": "mbf", "embedding_size": 512,
           "channel_order": "rgb", "config": {}, "state_dict": {"w": torch.ones(2)}}
    for k, v in over.items():
        if v is _DROP:
            obj.pop(k)
        else:
            obj[k] = v
    return obj


@pytest.mark.parametrize("over,needle", [
    ({"state_dict": _DROP}, "no 'state_dict' field"),
    ({"state_dict": {"w": "x"}}, "state_dict entry 'w' is a str, not a tensor"),
    ({"backbone": 5}, "field 'backbone' is 5"),
    ({"backbone": _DROP}, "field 'backbone' is None"),
    ({"embedding_size": -1}, "field 'embedding_size' is -1, not an integer in 1..65536"),
    ({"embedding_size": 10**9}, "field 'embedding_size' is 1000000000"),
    ({"embedding_size": 512.0}, "field 'embedding_size' is 512.0"),
    ({"channel_order": "gbr"}, "field 'channel_order' is 'gbr', not one of ('rgb', 'bgr')"),
    ({"config": "x"}, "field 'config' is a str, not a mapping"),
    ({"version": 99}, "version 99 is newer"),
])
def test_malformed_backbone_file_is_one_line(tmp_path, over, needle):
    path = tmp_path / "backbone.pt"
    torch.save(_backbone(**over), path)
    with pytest.raises(CheckpointError) as err:
        load_backbone_checkpoint(str(path))
    msg = str(err.value)
    assert "backbone.pt" in msg and needle in msg and "\n" not in msg, msg


def test_backbone_file_and_training_checkpoint_describe_the_model(tmp_path):
    torch.save(_backbone(channel_order="bgr", embedding_size=128), tmp_path / "backbone.pt")
    got = load_backbone_checkpoint(str(tmp_path / "backbone.pt"))
    assert (got["backbone"], got["embedding_size"], got["channel_order"]) == ("mbf", 128, "bgr")
    torch.save(_train(config={"backbone": "r50", "input_order": "bgr"}), tmp_path / "checkpoint.pt")
    got = load_backbone_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert (got["backbone"], got["embedding_size"], got["channel_order"]) == ("r50", 512, "bgr")
    torch.save(_train(config={"backbone": "r50", "embedding_size": 0}), tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="config.embedding_size' is 0"):
        load_backbone_checkpoint(str(tmp_path / "bad.pt"))
    torch.save({"w": torch.ones(1)}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="not a backbone file of this project"):
        load_backbone_checkpoint(str(tmp_path / "foreign.pth"))


def test_evaluate_refuses_nan_weights(tmp_path):
    import argparse

    import backbones
    import evaluate
    sd = backbones.build("mbf").state_dict()
    key = next(k for k, v in sd.items() if v.is_floating_point())
    sd[key] = sd[key].clone().fill_(float("nan"))
    torch.save(_backbone(state_dict=sd), tmp_path / "backbone.pt")
    args = argparse.Namespace(backbone="", input_order="", embedding_size=512)
    with pytest.raises(CheckpointError, match=f"backbone.pt: tensor '{key}' holds"):
        evaluate.load_model(str(tmp_path / "backbone.pt"), args)


# ------------------------------------------------------------------- --resume auto: never a torn file
def _save_steps(tmp_path, steps):
    for step in steps:
        save_training_checkpoint(str(tmp_path / "checkpoint.pt"), keep=3, step=step,
                                      model={"w": torch.full((64,), float(step))})


def test_resumable_checkpoint_prefers_checkpoint_pt(tmp_path):
    assert resumable_checkpoint(str(tmp_path)) is None  # nothing yet: a fresh start
    _save_steps(tmp_path, (10, 20))
    (tmp_path / ".checkpoint.pt.999999.tmp").write_bytes(b"PK\x03\x04torn")  # a killed writer's leftover
    assert resumable_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint.pt")


def test_resumable_checkpoint_skips_a_damaged_newest_with_a_note(tmp_path):
    _save_steps(tmp_path, (10, 20))
    _flip_in_tensor(tmp_path / "checkpoint-00000020.pt", torch.full((64,), 20.0))  # also checkpoint.pt: a hard link
    notes = []
    got = resumable_checkpoint(str(tmp_path), note=notes.append)
    assert got == str(tmp_path / "checkpoint-00000010.pt")
    assert len(notes) == 1 and "checkpoint.pt" in notes[0] and "damaged" in notes[0]


def test_resumable_checkpoint_refuses_when_nothing_loads(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match="no checkpoint here loads"):
        resumable_checkpoint(str(tmp_path), note=lambda line: None)
