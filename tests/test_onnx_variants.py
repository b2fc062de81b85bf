"""`infer.py export` read back by a bare onnxruntime session, as another team's runtime would read it.

For three backbone families (iresnet and mobilefacenet, both ending in BatchNorm1d features, and
vit_mini), with batch-norm statistics moved off their defaults so that a layer exported in training
mode would show: the exported graph, fed through the input name its metadata records with photos
decoded by Pillow and normalised by hand as the metadata says, must give the torch module's
embeddings within the stated tolerance (max |diff| <= 1e-4 of the largest |value|, every row cosine
>= 0.99999; measured: ~3e-6 relative). A BGR-trained model is checked against an RGB twin fed BGR
input, not against its own internal flip; and `infer.py embed` on the .onnx against a longhand
flip-sum in float64.
"""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import backbones
import infer
from backbones.weights import save_backbone
from tests.cli_helpers import script_error

REL_TOL, MIN_COS = 1e-4, 0.99999


def moved_stats(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model.eval()


def photos(folder, n=3):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = os.path.join(folder, f"p{i}.png")
        Image.fromarray((rng.random((112, 112, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def by_hand(paths, meta):
    """Pillow RGB, then the recorded normalisation, NCHW float32 (the metadata is what a runtime has)."""
    assert meta["input_channel_order"] == "rgb" and meta["input_layout"] == "NCHW float32, RGB"
    assert meta["normalisation"] == "(x/255 - 0.5) / 0.5" and meta["input_size"] == "112x112"
    x = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) for p in paths])
    return ((x / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()


def close(ref, got):
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    return np.abs(ref - got).max() <= REL_TOL * np.abs(ref).max() and cos.min() >= MIN_COS


@pytest.mark.parametrize("name, order, exporter", [
    pytest.param("iresnet18", "rgb", "torchscript", marks=pytest.mark.slow),
    ("mobilefacenet", "bgr", "torchscript"),
    pytest.param("vit_mini", "rgb", "dynamo", marks=pytest.mark.slow),
])
def test_onnxruntime_matches_torch(tmp_path, capsys, name, order, exporter):
    torch.manual_seed(0)
    model = moved_stats(backbones.build(name, embedding_size=32, channel_order=order))
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
    pt, onx = str(tmp_path / "m.pt"), str(tmp_path / "m.onnx")
    save_backbone(pt, model.state_dict(), name, 32, order)
    assert infer.main(["export", pt, "--onnx", onx, "--exporter", exporter]) == 0
    session = ort.InferenceSession(onx, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["weights_channel_order"] == order and meta["embedding_size"] == "32"
    paths = photos(str(tmp_path))
    x = by_hand(paths, meta)
    twin = backbones.build(name, embedding_size=32, channel_order="rgb").eval()  # no internal flip
    twin.load_state_dict(model.state_dict())
    for batch in (x, np.concatenate([x, x[:, :, ::-1].copy(), x[:, :, :, ::-1].copy()])[:7]):  # 3 and 7 rows
        fed = torch.from_numpy(batch[:, ::-1].copy() if order == "bgr" else batch)
        with torch.no_grad():
            ref = twin(fed).numpy()
        got = session.run(None, {meta["input_name"]: batch})[0]
        assert got.shape == ref.shape and close(ref, got), (name, np.abs(ref - got).max())
    # infer.py embed on the .onnx: normalise(e(x) + e(flip x)) in float64, written out
    out = str(tmp_path / "e.npy")
    assert infer.main(["embed", onx, *paths, "--out", out, "--no-progress"]) == 0
    xt = torch.from_numpy(x[:, ::-1].copy() if order == "bgr" else x)
    with torch.no_grad():
        e = twin(xt).double() + twin(xt.flip(3)).double()
    expect = (e / e.norm(dim=1, keepdim=True)).numpy()
    np.testing.assert_allclose(np.load(out).astype(np.float64), expect, atol=1e-5)
    capsys.readouterr()


def test_onnx_whose_metadata_asks_another_input_is_refused(tmp_path, capsys):
    torch.manual_seed(0)
    model = backbones.build("mobilefacenet", embedding_size=32).eval()
    pt, onx = str(tmp_path / "m.pt"), str(tmp_path / "m.onnx")
    save_backbone(pt, model.state_dict(), "mobilefacenet", 32, "rgb")
    assert infer.main(["export", pt, "--onnx", onx, "--exporter", "torchscript"]) == 0
    proto = onnx.load(onx)
    for prop in proto.metadata_props:
        if prop.key == "normalisation":
            prop.value = "x/255"  # another tool's convention: feeding ours would give wrong embeddings
    onnx.save(proto, onx)
    script_error(capsys, infer.main, ["embed", onx, *photos(str(tmp_path)), "--out", str(tmp_path / "e.npy")],
                 "infer.py: error:", "m.onnx", "normalised x/255")
