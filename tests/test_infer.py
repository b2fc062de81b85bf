"""infer.py embed / verify / facebank / identify on a tiny model, against evaluation's own code paths."""

import json
import os

import cv2
import numpy as np
import pytest
import torch

import backbones
import infer
from backbones.weights import save_backbone
from data.dataset import decode_image
from evaluation.embed import embed as eval_embed
from evaluation.protocol import pair_distances
from evaluation.report import SCHEMA
from prepare.synth import identity_traits
from prepare.synth.render import render_face
from tests.cli_helpers import script_error
from utils.torchfile import sha256_file


def write_faces(folder, identity, n, offset=0, size=112):
    """``n`` synthetic images of ``identity`` as files (JPEG, PNG at other sizes too); their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        img = render_face(identity_traits(7, identity), np.random.default_rng([7, identity, offset + i]), 0.0)
        ext = ".png" if i % 2 else ".jpg"
        if size != 112:
            img = cv2.resize(img, (size, size))
        path = os.path.join(folder, f"img{offset + i:03d}{ext}")
        cv2.imwrite(path, np.ascontiguousarray(img[..., ::-1]))
        paths.append(path)
    return paths


def save_model(path, name="mobilefacenet", emb=32, seed=0):
    torch.manual_seed(seed)
    model = backbones.build(name, embedding_size=emb).eval()
    save_backbone(str(path), model.state_dict(), name, emb, "rgb")
    return model


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "backbone.pt"
    save_model(path)
    return str(path)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    paths = write_faces(str(root / "a"), 1, 3) + write_faces(str(root / "b"), 2, 2, size=150)
    return str(root), sorted(paths)


def reference(model_file, paths, tta):
    """evaluation.embed on the same decoded images (the evaluate.py path)."""
    model = backbones.build("mobilefacenet", embedding_size=32)
    model.load_state_dict(torch.load(model_file, weights_only=True)["state_dict"])
    images = np.stack([decode_image(open(p, "rb").read()) for p in paths])
    return eval_embed(model, images, batch_size=64, tta=tta)


@pytest.mark.parametrize("tta", ["sum", "concat", "none"])
def test_embed_rows_equal_evaluation_embed(model_file, faces, tmp_path, tta, capsys):
    root, paths = faces
    out = tmp_path / "emb.npy"
    assert infer.main(["embed", model_file, root, "--out", str(out), "--tta", tta, "--no-progress"]) == 0
    emb = np.load(out, allow_pickle=False)
    assert (tmp_path / "emb.txt").read_text().splitlines() == paths
    ref = reference(model_file, paths, tta)
    assert emb.dtype == np.float32 and emb.shape == ref.shape == (5, 64 if tta == "concat" else 32)
    np.testing.assert_allclose(emb, ref, rtol=0, atol=1e-6)  # float32 storage of the same float64 rows
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float64), axis=1), 1.0, atol=1e-6)
    assert "5 embeddings" in capsys.readouterr().out


def test_embed_lists_bad_images_and_exits_1(model_file, faces, tmp_path, capsys):
    root, paths = faces
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    out = tmp_path / "emb.npy"
    assert infer.main(["embed", model_file, paths[0], str(bad), str(tmp_path / "missing.png"),
                       "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"bad image: {bad}" in err and "missing.png" in err and "2 image(s) could not be used" in err
    assert np.load(out).shape == (1, 32) and (tmp_path / "emb.txt").read_text() == paths[0] + "\n"


def test_verify_distance_is_the_protocol_distance(model_file, faces, capsys):
    _, paths = faces
    a, b = paths[0], paths[-1]
    assert infer.main(["verify", model_file, a, b]) == 0
    out = capsys.readouterr().out
    line = next(s for s in out.splitlines() if s.startswith("cosine"))
    cos, d = float(line.split()[1]), float(line.split("distance ")[1].split(")")[0])
    ref = reference(model_file, [a, b], "sum")
    d_ref = float(pair_distances(ref[:1], ref[1:])[0])
    assert d_ref == pytest.approx(2 - 2 * cos, abs=1e-4) and d == pytest.approx(d_ref, abs=1e-4)
    assert "threshold: cosine 0.2500" in out and "the default" in out


def test_verify_threshold_from_the_models_eval_json(model_file, faces, tmp_path, capsys):
    model = tmp_path / "backbone.pt"
    model.write_bytes(open(model_file, "rb").read())
    results = {"lfw": {"best_threshold": 1.2}, "cfp_fp": {"best_threshold": 1.0}}
    (tmp_path / "eval.json").write_text(json.dumps({"schema": SCHEMA, "tta": "sum", "checkpoints": [
        {"path": "/elsewhere/other.pt", "sha256": "0" * 64, "results": {"lfw": {"best_threshold": 3.0}}},
        {"path": str(model), "sha256": sha256_file(str(model)), "results": results}]}))
    _, paths = faces
    assert infer.main(["verify", str(model), paths[0], paths[1]]) == 0
    out = capsys.readouterr().out
    # mean squared-L2 threshold 1.1 -> cosine 1 - 1.1/2 = 0.45
    assert "threshold: cosine 0.4500 (squared L2 1.1000)" in out
    assert str(tmp_path / "eval.json") in out and "cfp_fp, lfw" in out
    assert infer.main(["verify", str(model), paths[0], paths[1], "--threshold", "-1"]) == 0
    assert "from --threshold" in capsys.readouterr().out


def test_facebank_add_remove_keep_the_other_rows(model_file, faces, tmp_path, capsys):
    root, _ = faces
    bank = str(tmp_path / "bank.npz")
    assert infer.main(["facebank", "build", model_file, root, "--out", bank, "--no-progress"]) == 0
    z = dict(np.load(bank, allow_pickle=False))
    assert list(z["names"]) == ["a", "b"] and list(z["counts"]) == [3, 2]
    # each identity: normalise(mean of the normalised image rows), computed here from evaluation.embed
    rows = reference(model_file, sorted(os.path.join(root, "a", f) for f in os.listdir(os.path.join(root, "a"))), "sum")
    mean = rows.mean(0)
    np.testing.assert_allclose(z["embeddings"][0], mean / np.linalg.norm(mean), atol=1e-6)
    write_faces(str(tmp_path / "new" / "c"), 3, 2)
    assert infer.main(["facebank", "add", model_file, bank, str(tmp_path / "new" / "c"), "--no-progress"]) == 0
    z2 = dict(np.load(bank, allow_pickle=False))
    assert list(z2["names"]) == ["a", "b", "c"] and list(z2["counts"]) == [3, 2, 2]
    assert np.array_equal(z2["embeddings"][:2], z["embeddings"])
    assert infer.main(["facebank", "remove", bank, "a"]) == 0
    z3 = dict(np.load(bank, allow_pickle=False))
    assert list(z3["names"]) == ["b", "c"] and np.array_equal(z3["embeddings"], z2["embeddings"][1:])
    script_error(capsys, infer.main, ["facebank", "remove", bank, "zed"], "infer.py: error:", bank, "'zed'")


def test_a_bank_of_another_model_is_refused(model_file, faces, tmp_path, capsys):
    root, paths = faces
    bank = str(tmp_path / "bank.npz")
    assert infer.main(["facebank", "build", model_file, root, "--out", bank, "--no-progress"]) == 0
    other = tmp_path / "other.pt"
    save_model(other, seed=1)
    script_error(capsys, infer.main, ["identify", str(other), bank, paths[0]],
                 "infer.py: error:", bank, "another model")
    not_a_bank = tmp_path / "x.npz"
    np.savez(not_a_bank, names=np.array(["a"]))
    script_error(capsys, infer.main, ["identify", model_file, str(not_a_bank), paths[0]],
                 "infer.py: error:", "not a facebank")


def test_identify_table_and_files(model_file, faces, tmp_path, capsys):
    root, paths = faces
    bank = str(tmp_path / "bank.npz")
    assert infer.main(["facebank", "build", model_file, root, "--out", bank, "--no-progress"]) == 0
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    for out in (out_json, out_csv):
        assert infer.main(["identify", model_file, bank, *paths, "--top-k", "2", "--out", str(out),
                           "--threshold", "2", "--no-progress"]) == 0
    rows = json.loads(out_json.read_text())
    assert [r["path"] for r in rows] == paths and all(r["identity"] == "unknown" for r in rows)  # cos < 2 always
    assert all(len(r["top_k"]) == 2 and r["top_k"][0][1] >= r["top_k"][1][1] for r in rows)
    assert out_csv.read_text().splitlines()[0] == "path,identity,score,top_k"
    assert "unknown" in capsys.readouterr().out
