"""evaluate.py end to end against the published 10-fold protocol written out longhand.

The .bin is hand-built as Python 2 wrote insightface's files (protocol 2, images as BINSTRING,
bools as NEWTRUE/NEWFALSE); the reference decodes it with Pillow (not OpenCV), runs the raw network
on (x/255 - 0.5)/0.5 in the channel order the weights were trained on, sums e(x) + e(flip x) and
normalises in float64, takes squared L2 distances and runs KFold(10, shuffle=False) with the
thresholds 0.00 .. 3.99 (first maximum on ties, "same" = dist < threshold). Fold by fold, the
accuracies and thresholds must equal what eval.json reports.
"""

import io
import json
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.model_selection import KFold

import backbones
import evaluate

PAIRS = 20
GRID = np.arange(0, 4, 0.01)


def py2_bin(payloads, issame) -> bytes:
    """``pickle.dump((bins, issame), f, 2)`` as Python 2 wrote it, opcode by opcode."""
    out = b"\x80\x02" + b"]q\x00("  # PROTO 2, EMPTY_LIST, BINPUT 0, MARK
    for p in payloads:
        out += (b"U" + bytes([len(p)]) if len(p) < 256 else b"T" + struct.pack("<I", len(p))) + p
    out += b"e" + b"]q\x01(" + b"".join(b"\x88" if s else b"\x89" for s in issame) + b"e"  # APPENDS
    return out + b"\x86q\x02."  # TUPLE2, BINPUT, STOP


def encoded_images(rng, n):
    """``n`` 112x112 RGB images as JPEG (baseline, progressive, grayscale) and PNG bytes, made with Pillow.

    Pair i: a smooth random face-sized image, and for 'same' pairs the same image lightly noised."""
    kinds = [dict(format="JPEG", quality=92), dict(format="JPEG", quality=90, progressive=True),
             dict(format="PNG"), dict(format="JPEG", quality=95, mode="L")]
    issame = np.arange(n) % 3 != 0
    payloads = []
    for i in range(n):
        a = Image.fromarray((rng.random((14, 14, 3)) * 255).astype(np.uint8)).resize((112, 112), Image.BILINEAR)
        b = np.asarray(a, dtype=np.int16) + rng.integers(-25, 26, (112, 112, 3)) if issame[i] else \
            np.asarray(Image.fromarray((rng.random((14, 14, 3)) * 255).astype(np.uint8)).resize((112, 112)))
        for img in (a, Image.fromarray(np.clip(b, 0, 255).astype(np.uint8))):
            kind = dict(kinds[len(payloads) % len(kinds)])
            mode = kind.pop("mode", "RGB")
            buf = io.BytesIO()
            img.convert(mode).save(buf, **kind)
            payloads.append(buf.getvalue())
    return payloads, issame


def network_input(payloads, order):
    """(N, 3, 112, 112) float32: images decoded by Pillow, in ``order``, scaled to (x/255 - 0.5)/0.5."""
    rgb = np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in payloads])
    x = rgb[..., ::-1] if order == "bgr" else rgb
    x = (x.astype(np.float32) / 255.0 - 0.5) / 0.5
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def reference_embeddings(model, payloads, order):
    """normalise(e(x) + e(flip x)) in float64 on the raw network (no channel handling of ours)."""
    x = network_input(payloads, order)
    with torch.no_grad():
        e = model(x).double().numpy() + model(torch.flip(x, dims=[3])).double().numpy()
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def spread_out(net, payloads):
    """Set the last BatchNorm1d's statistics to its inputs' over these images: an untrained network
    maps every image to nearly one embedding, and the distances would all be ~0."""
    bn = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm1d)][-1]
    seen = []
    hook = bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    with torch.no_grad():
        net(network_input(payloads, "rgb"))
    hook.remove()
    feats = torch.cat(seen)
    with torch.no_grad():
        bn.running_mean.copy_(feats.mean(0))
        bn.running_var.copy_(feats.var(0) + 1e-3)
    return net


def reference_folds(emb, issame):
    """Per-fold (accuracy, threshold) of the published protocol, longhand."""
    dist = np.sum(np.square(emb[0::2] - emb[1::2]), axis=1)
    accs, thrs = [], []
    for train, test in KFold(n_splits=10, shuffle=False).split(dist):
        train_acc = [np.mean((dist[train] < t) == issame[train]) for t in GRID]
        best = GRID[int(np.argmax(train_acc))]
        thrs.append(best)
        accs.append(np.mean((dist[test] < best) == issame[test]))
    return np.array(accs), np.array(thrs), dist


@pytest.mark.slow
def test_eval_json_equals_the_longhand_protocol(tmp_path):
    order = "bgr"  # weights trained on BGR (InsightFace_Pytorch): the reference feeds the raw network BGR
    rng = np.random.default_rng(7)
    payloads, issame = encoded_images(rng, PAIRS)
    data = tmp_path / "data"
    data.mkdir()
    (data / "lfw.bin").write_bytes(py2_bin(payloads, issame))
    torch.manual_seed(3)
    net = spread_out(backbones.build("mobilefacenet", embedding_size=64).eval(), payloads)  # channel_order rgb: raw
    weights = tmp_path / "foreign.pth"
    torch.save(net.state_dict(), weights)

    report, emb_dir = tmp_path / "report", tmp_path / "emb"
    assert evaluate.main([str(weights), "--backbone", "mobilefacenet", "--embedding-size", "64", "--input-order",
                          order, "--data", str(data), "--targets", "lfw", "--device", "cpu", "--no-progress",
                          "--no-cache", "--report", str(report), "--save-embeddings", str(emb_dir)]) == 0

    ref_emb = reference_embeddings(net, payloads, order)
    accs, thrs, dist = reference_folds(ref_emb, issame)
    # the comparison is well posed: no pair sits within float32 noise of a grid threshold
    assert np.min(np.abs(dist[:, None] - GRID[None, :])) > 1e-4
    saved = np.load(emb_dir / "lfw.npy")
    np.testing.assert_allclose(saved, ref_emb, atol=2e-5)
    np.testing.assert_array_equal(np.load(emb_dir / "lfw_issame.npy"), issame)
    lfw = json.load(open(report / "eval.json"))["checkpoints"][0]["results"]["lfw"]
    assert lfw["num_pairs"] == PAIRS
    np.testing.assert_array_equal(lfw["fold_accuracies"], accs)
    np.testing.assert_array_equal(lfw["fold_thresholds"], thrs)
    assert lfw["accuracy"] == pytest.approx(np.mean(accs), abs=1e-12)
    assert lfw["accuracy_std"] == pytest.approx(np.std(accs), abs=1e-12)  # population std (ddof=0)
    assert 0.5 < lfw["accuracy"] < 1.0  # neither trivial nor chance: the folds' thresholds matter
    assert os.path.isfile(report / "eval.md")
