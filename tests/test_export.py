"""infer.py export: parity with the torch model is checked before the file gets its name; the .onnx is a MODEL."""

import json
import os

import numpy as np
import onnx
import pytest
import torch

import backbones
import infer
import inference.export as export
from backbones.weights import save_backbone
from inference.model import load_model
from tests.cli_helpers import script_error
from tests.test_infer import write_faces


def saved(tmp_path, name, emb=32):
    torch.manual_seed(0)
    model = backbones.build(name, embedding_size=emb).eval()
    path = tmp_path / f"{name}.pt"
    save_backbone(str(path), model.state_dict(), name, emb, "rgb")
    return str(path), model


def rows_cosine(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def check_parity(tmp_path, name, exporter):
    path, module = saved(tmp_path, name)
    out = str(tmp_path / f"{name}.onnx")
    assert infer.main(["export", path, "--onnx", out, "--exporter", exporter]) == 0
    onnx_model = load_model(out)
    for batch in (1, 5):  # the dynamic batch axis, checked here with inputs the export never saw
        x = torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref = module(x).numpy()
        got = onnx_model.forward(x.numpy())
        assert got.shape == (batch, 32) and rows_cosine(ref, got).min() >= 0.9999


@pytest.mark.parametrize("name", ["mobilefacenet", "iresnet18"])
def test_export_parity_small(tmp_path, name, capsys):
    check_parity(tmp_path, name, "dynamo")
    assert "min cosine" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ir_se50", "iresnet50", "efficientnet_b0"])
def test_export_parity_large(tmp_path, name):
    check_parity(tmp_path, name, "torchscript")  # the legacy exporter: ~4x faster to export, same parity rule


def test_metadata_and_torchscript(tmp_path, capsys):
    path, module = saved(tmp_path, "mobilefacenet")
    out, ts = str(tmp_path / "m.onnx"), str(tmp_path / "m.ts.pt")
    faces = write_faces(str(tmp_path / "faces"), 1, 2)
    assert infer.main(["export", path, "--onnx", out, "--torchscript", ts, "--exporter", "torchscript",
                       "--check-images", *faces]) == 0
    printed = capsys.readouterr().out
    assert "real x2" in printed and "max abs diff" in printed
    proto = onnx.load(out)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["input_name"] == proto.graph.input[0].name == "input"
    assert meta["input_size"] == "112x112" and meta["input_channel_order"] == "rgb"
    assert meta["normalisation"] == "(x/255 - 0.5) / 0.5" and meta["embedding_size"] == "32"
    assert proto.opset_import[0].version >= 17
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        assert rows_cosine(module(x).numpy(), torch.jit.load(ts)(x).numpy()).min() >= 0.9999


def test_a_failed_parity_leaves_no_file(tmp_path, capsys, monkeypatch):
    path, _ = saved(tmp_path, "mobilefacenet")
    monkeypatch.setattr(export, "MIN_COSINE", 1.5)  # no row can reach it
    out = tmp_path / "m.onnx"
    script_error(capsys, infer.main, ["export", path, "--onnx", str(out), "--exporter", "torchscript"],
                 "infer.py: error:", "export refused", "min cosine")
    assert sorted(os.listdir(tmp_path)) == ["mobilefacenet.pt"]


def test_identify_with_onnx_answers_as_torch(tmp_path, capsys):
    path, _ = saved(tmp_path, "mobilefacenet")
    root = tmp_path / "bank"
    for ident, name in ((1, "ann"), (2, "bob"), (3, "cyd")):
        write_faces(str(root / name), ident, 2)
    queries = write_faces(str(tmp_path / "q"), 1, 2, offset=50) + write_faces(str(tmp_path / "q"), 9, 2, offset=60)
    bank = str(tmp_path / "bank.npz")
    assert infer.main(["facebank", "build", path, str(root), "--out", bank, "--no-progress"]) == 0
    out = str(tmp_path / "m.onnx")
    assert infer.main(["export", path, "--onnx", out, "--exporter", "torchscript"]) == 0
    results = {}
    for label, model in (("torch", path), ("onnx", out)):
        res = tmp_path / f"{label}.json"
        assert infer.main(["identify", model, bank, *queries, "--top-k", "3", "--threshold", "0.9",
                           "--out", str(res), "--no-progress"]) == 0
        results[label] = json.loads(res.read_text())
    for t, o in zip(results["torch"], results["onnx"]):
        assert t["path"] == o["path"] and t["identity"] == o["identity"]
        assert [n for n, _ in t["top_k"]] == [n for n, _ in o["top_k"]]
        assert o["score"] == pytest.approx(t["score"], abs=1e-5)
