"""The synthetic data generator: deterministic, right layout, held-out identities for the pairs."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from data.bins import load_bin
from data.facerec import FaceRec, read_property
from prepare import synth

IDS, PER_ID, PAIRS = 5, 3, 0.003  # 0.003 x 5000..7000 real pairs -> 20 pairs per set


def _generate(out, seed=0, workers=1):
    return synth.generate_dataset(str(out), identities=IDS, images_per_id=PER_ID, pairs=PAIRS, seed=seed,
                                  progress=False, workers=workers)


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, _generate(out)


def _files(folder) -> dict:
    names = sorted(os.listdir(folder))
    return {n: open(os.path.join(folder, n), "rb").read() for n in names}


def _decode(payload) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(bytes(payload), np.uint8), cv2.IMREAD_COLOR)


def test_same_seed_same_bytes_whatever_the_workers(pack, tmp_path):
    out, _ = pack
    _generate(tmp_path, workers=2)
    first, again = _files(out), _files(tmp_path)
    assert sorted(first) == sorted(again)
    for name in first:
        assert first[name] == again[name], name


def test_different_seed_different_images(pack, tmp_path):
    out, _ = pack
    _generate(tmp_path, seed=1)
    for name in ("train.rec", "lfw.bin", "cfp_fp.bin"):
        assert _files(out)[name] != _files(tmp_path)[name], name


def test_train_pack_counts_and_labels(pack):
    out, summary = pack
    assert read_property(os.path.join(out, "property"))[0] == IDS
    rec = FaceRec(os.path.join(out, "train.rec"))
    labels = [rec.read(i)[1] for i in range(len(rec))]
    assert labels == [c for c in range(IDS) for _ in range(PER_ID)]
    assert summary["train_images"] == IDS * PER_ID and summary["train_classes"] == IDS


@pytest.mark.parametrize("name", list(synth.VERIFICATION_PAIRS))
def test_bin_has_ten_balanced_contiguous_folds(pack, name):
    out, summary = pack
    images, issame = load_bin(os.path.join(out, f"{name}.bin"))[:2]
    issame = np.asarray(issame, bool)
    assert len(issame) == summary["sets"][name]["pairs"] == 20
    assert len(images) == 2 * len(issame)
    for fold in issame.reshape(10, -1):
        half = len(fold) // 2
        assert fold[:half].all() and not fold[half:].any()


def test_pair_counts_follow_real_counts():
    assert [synth.pair_count(n, 0.05) for n in synth.VERIFICATION_PAIRS] == [300, 360, 360, 300, 300, 300, 260]
    assert synth.pair_count("lfw", 1.0) == 6000 and synth.pair_count("vgg2_fp", 1e-6) == 20


def test_heldout_identities_are_disjoint_from_train_and_each_other(pack):
    _, summary = pack
    seen = set(range(IDS))
    train_traits = [synth.identity_traits(0, i) for i in range(IDS)]
    for name, info in summary["sets"].items():
        ids = set(info["identities"])
        assert ids and not ids & seen, name
        seen |= ids
        for g in ids:
            traits = synth.identity_traits(0, g, info["lookalike_of"].get(g, -1), synth.lookalike_keep(1.0))
            assert all(traits != t for t in train_traits), (name, g)


def test_images_decode_to_112x112x3(pack):
    out, _ = pack
    rec = FaceRec(os.path.join(out, "train.rec"))
    assert _decode(rec.read(0)[0]).shape == (112, 112, 3)
    images, _ = load_bin(os.path.join(out, "cplfw.bin"))[:2]
    assert all(_decode(b).shape == (112, 112, 3) for b in images[:4])


def test_render_face_is_a_pure_function_of_its_rng():
    traits = synth.render_identity_traits(np.random.default_rng(3))
    a = synth.render_face(traits, np.random.default_rng(7))
    b = synth.render_face(traits, np.random.default_rng(7))
    c = synth.render_face(traits, np.random.default_rng(8))
    assert a.shape == (112, 112, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_difficulty_zero_is_clean_and_identities_differ():
    rng = np.random.default_rng(0)
    t1, t2 = synth.render_identity_traits(rng), synth.render_identity_traits(rng)
    same = [synth.render_face(t1, np.random.default_rng(i), difficulty=0.0).astype(int) for i in range(2)]
    other = synth.render_face(t2, np.random.default_rng(0), difficulty=0.0).astype(int)
    face = np.s_[44:96, 36:76]  # inside the face: a clean image varies only its background and clothes
    assert np.abs(same[0][face] - same[1][face]).mean() < 1.0
    assert np.abs(same[0][face] - other[face]).mean() > 10.0
