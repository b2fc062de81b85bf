"""Backbones: build/forward/backward, published layouts, checkpoint loading, channel order, fp32 head, FLOPs."""

from __future__ import annotations

import importlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import backbones
from backbones.profile import profile

LAYOUTS_JSON = Path(os.environ.get("FACE_REFERENCE_DIR", "/work/shared/reference")) / "state_dict_layouts.json"
# Biggest nets, to keep the file cheap on CPU: the deep IRs get key set + one eval forward at
# batch 2; the big face EfficientNets one train step (forward + backward) at batch 2.
HUGE = {"ir152", "ir_se152", "iresnet200"}
BIG_EFFICIENTNETS = {"efficientnet_b5", "efficientnet_b6", "efficientnet_b7"}
# ViTs: tests/test_vit.py trains the architecture at reduced depth and checks every variant's layout
# against arcface_torch's key list written there; here the generic step runs on vit_t and vit_s only.
BIG_VITS = {"vit_s_dp005_mask_0", "vit_b", "vit_b_dp005_mask_005", "vit_l", "vit_l_dp005_mask_005", "vit_h"}
ALL = backbones.names()
TRAINABLE = [n for n in ALL if n not in HUGE | BIG_EFFICIENTNETS | BIG_VITS]
WITH_LAYOUT = [n for n in ALL if backbones.spec(n).layout and backbones.spec(n).family != "vit"]


@pytest.fixture(autouse=True)
def _one_thread():
    """The box is shared: one intra-op thread keeps timings predictable and polite."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def layouts() -> dict:
    if not LAYOUTS_JSON.exists():
        pytest.skip(f"reference layouts not found at {LAYOUTS_JSON}")
    return json.loads(LAYOUTS_JSON.read_text())["layouts"]


def reference_layout(name: str, layouts: dict) -> dict:
    """key -> shape the published checkpoint of ``name`` has (stock efficientnet_pytorch for *_plain)."""
    layout = backbones.spec(name).layout
    if layout.startswith("efficientnet_pytorch/"):
        from efficientnet_pytorch import EfficientNet

        with torch.device("meta"):
            stock = EfficientNet.from_name(layout.split("/")[1], num_classes=512)
        return {k: list(v.shape) for k, v in stock.state_dict().items()}
    return layouts[layout]


def shapes(model: nn.Module) -> dict:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def faces(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, 112, 112) * 2 - 1  # RGB, (x/255 - 0.5)/0.5 range


def check_train_step(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    out = model(x)
    assert out.shape == (2, 512) and out.dtype == torch.float32
    out.square().mean().backward()
    stem = next(p for p in model.parameters() if p.dim() == 4)
    assert stem.grad is not None and stem.grad.abs().sum() > 0, "no gradient reached the stem conv"
    missing = [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


@pytest.mark.parametrize("name", TRAINABLE)
def test_train_step_and_eval_shapes(name):
    model = backbones.build(name)
    x = faces()
    check_train_step(model, x)
    model.eval()
    with torch.no_grad():
        emb = model(x)
    assert emb.shape == (2, 512) and torch.isfinite(emb).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HUGE))
def test_huge_eval_forward(name):
    model = backbones.build(name).eval()
    with torch.no_grad():
        emb = model(faces())
    assert emb.shape == (2, 512) and torch.isfinite(emb).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BIG_EFFICIENTNETS))
def test_big_efficientnet_trains_at_112(name):
    check_train_step(backbones.build(name), faces())


@pytest.mark.parametrize("name", ALL)
def test_surface_and_custom_embedding_size(name):
    with torch.device("meta"):
        model = backbones.build(name, embedding_size=128, dropout=0.3, channel_order="bgr")
        out = model.eval()(torch.empty(2, 3, 112, 112))
    assert isinstance(model, backbones.FaceBackbone)
    assert (model.embedding_size, model.input_size, model.channel_order) == (128, (112, 112), "bgr")
    assert out.shape == (2, 128)
    assert any(isinstance(m, nn.Dropout) and m.p == 0.3 for m in model.modules()), "dropout option ignored"


@pytest.mark.parametrize("name", WITH_LAYOUT)
def test_state_dict_equals_published_layout(name, layouts):
    with torch.device("meta"):
        model = backbones.build(name)
    assert shapes(model) == reference_layout(name, layouts)


def test_channel_order_bgr_flips_input_once():
    # train mode: BN uses batch statistics, so the untrained net's embeddings are O(1)
    rgb = backbones.build("mobilefacenet").train()
    bgr = backbones.build("mobilefacenet", channel_order="bgr").train()
    assert list(bgr.state_dict()) == list(rgb.state_dict()), "the flip must not add state"
    bgr.load_state_dict(rgb.state_dict())
    x = faces(4)
    with torch.no_grad():
        expected = rgb(x[:, [2, 1, 0]])
        torch.testing.assert_close(bgr(x), expected, rtol=1e-4, atol=1e-4)
        assert (bgr(x) - rgb(x)).abs().max() > 0.1


def test_bad_channel_order_is_named():
    with pytest.raises(ValueError, match="channel_order 'gbr'"):
        backbones.build("mbf", channel_order="gbr")


def test_unknown_name_suggests_closest():
    with pytest.raises(KeyError, match="did you mean 'ir_se50'"):
        backbones.build("ir_se_50")


@pytest.mark.parametrize("name", ["mobilefacenet", "mbf", "ir_se50", "iresnet50", "efficientnet_b0",
                                  "efficientnet_b0_plain"])
def test_head_is_fp32_under_autocast(name):
    model = backbones.build(name).eval()
    channels = {"mobilefacenet": 512, "mbf": 512, "ir_se50": 512, "iresnet50": 512,
                "efficientnet_b0": 1280, "efficientnet_b0_plain": 1280}[name]
    side = 4 if name.endswith("_plain") else 7
    feats = torch.randn(2, channels, side, side, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.forward_head(feats).dtype == torch.float32


def test_whole_model_autocast_embedding_is_fp32():
    model = backbones.build("mobilefacenet").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        emb = model(faces())
    assert emb.dtype == torch.float32 and emb.shape == (2, 512)


def test_load_weights_unwraps_and_strips_module_prefix(tmp_path):
    src = backbones.build("mobilefacenet").eval()
    for m in src.modules():  # non-default BN statistics so a silent skip would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    path = tmp_path / "ddp.pth"
    torch.save({"net_state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    dst = backbones.load_weights(backbones.build("mobilefacenet"), path)
    assert dst.state_dict().keys() == src.state_dict().keys()
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "backbone"])
def test_load_weights_wrappers(tmp_path, wrapper):
    src = backbones.build("mbf")
    sd = src.state_dict()
    path = tmp_path / "w.pth"
    torch.save(sd if wrapper is None else {wrapper: sd, "epoch": 3}, path)
    dst = backbones.load_weights(backbones.build("mbf"), path)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in sd.items())


def test_wrong_shapes_give_short_report(tmp_path):
    path = tmp_path / "emb256.pth"
    torch.save(backbones.build("mobilefacenet", embedding_size=256).state_dict(), path)
    with pytest.raises(ValueError) as err:
        backbones.load_weights(backbones.build("mobilefacenet"), path)
    msg = str(err.value)
    assert "emb256.pth" in msg and "5 wrong shape" in msg
    assert "linear.weight: checkpoint (256, 512) vs model (512, 512)" in msg
    assert len(msg) < 800 and "\n" not in msg


def test_missing_and_unexpected_keys_reported(tmp_path):
    sd = backbones.build("mobilefacenet").state_dict()
    sd.pop("bn.weight")
    sd["head.kernel"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"1 missing: bn\.weight.*1 unexpected: head\.kernel"):
        backbones.load_weights(backbones.build("mobilefacenet"), path)


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_checkpoint_needing_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    with pytest.raises(ValueError, match="evil.pth") as err:
        backbones.load_weights(backbones.build("mbf"), path)
    assert "\n" not in str(err.value)
    assert "pickled code ran" not in capsys.readouterr().out


def test_non_tensor_entries_are_refused(tmp_path):
    path = tmp_path / "junk.pth"
    torch.save({"conv1.weight": [1, 2, 3]}, path)
    with pytest.raises(ValueError, match=r"junk.pth: entry 'conv1.weight' is a list"):
        backbones.load_weights(backbones.build("mbf"), path)


# Published numbers: FORMATS.md (arcface_torch GFLOPs at 112x112, IR-SE50 params) and the
# MobileFaceNet paper (Chen et al. 2018: 221M multiply-adds).
@pytest.mark.parametrize("name,field,published", [
    ("iresnet18", "gflops", 2.6), ("iresnet34", "gflops", 4.5), ("iresnet50", "gflops", 6.3),
    ("iresnet100", "gflops", 12.1), ("iresnet200", "gflops", 23.4), ("mbf", "gflops", 0.45),
    ("ir_se50", "params_m", 43.8), ("mobilefacenet", "gmacs", 0.221),
])
def test_measured_cost_matches_published(name, field, published):
    measured = getattr(profile(lambda: backbones.build(name)), field)
    assert abs(measured - published) / published < 0.02, f"{name} {field}: measured {measured:.3f} vs {published}"


@pytest.mark.parametrize("name", ["mobilefacenet", "mbf"])
def test_checkpoint_built_from_published_layout_loads_strictly(name, layouts, tmp_path):
    """A file with exactly the published keys/shapes (values arbitrary) loads with strict=True."""
    sd = {k: (torch.tensor(7) if k.endswith("num_batches_tracked") else torch.full(shape, 0.5))
          for k, shape in layouts[backbones.spec(name).layout].items()}
    path = tmp_path / "published.pth"
    torch.save({"state_dict": sd}, path)
    model = backbones.load_weights(backbones.build(name), path, strict=True)
    assert all(torch.equal(model.state_dict()[k], v.to(model.state_dict()[k].dtype)) for k, v in sd.items())


# ---------------------------------------------------------------- float64

# the smallest variant of each family (both layouts where a family has two)
SMALLEST = {"iresnet": ["iresnet18"], "irse": ["ir50"], "mobilefacenet": ["mobilefacenet", "mbf"],
            "efficientnet": ["efficientnet_b0", "efficientnet_b0_plain"], "vit": ["vit_t"]}


def test_float64_cases_cover_every_family():
    assert {backbones.spec(n).family for n in ALL} == set(SMALLEST)


@pytest.mark.parametrize("name", [n for names in SMALLEST.values() for n in names])
def test_double_model_gives_float64_embeddings(name):
    torch.manual_seed(0)
    model = backbones.build(name, embedding_size=8).eval()
    x = faces()
    with torch.no_grad():
        want = model(x).double()
        got = model.double()(x.double())
    assert got.dtype == torch.float64 and got.shape == (2, 8)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * want.abs().max().item())


def test_double_head_is_float64_and_exact():
    """The embedding head of a .double() model against F.linear / F.batch_norm written out in float64."""
    model = backbones.build("mbf", embedding_size=8).double().eval()
    gdc, flatten, linear, bn = model.features.layers
    feats = torch.randn(2, 512, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        pooled = flatten(gdc(feats))
        want = (pooled @ linear.weight.T - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        got = model.forward_head(feats)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- argument validation

def forbid_layers(monkeypatch) -> None:
    """Make building any Conv2d fail loudly: the argument check must come first."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("a layer was built before the arguments were checked")

    monkeypatch.setattr(nn.Conv2d, "__init__", refuse)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"embedding_size": 0}, ValueError, r"embedding_size must be an integer in \[1, 65536\], got 0"),
    ({"embedding_size": -512}, ValueError, "embedding_size"),
    ({"embedding_size": 10**9}, ValueError, "embedding_size must be an integer in"),
    ({"embedding_size": 512.0}, TypeError, "embedding_size"),
    ({"embedding_size": True}, TypeError, "embedding_size"),
    ({"dropout": 1.0}, ValueError, r"dropout must be a probability in \[0, 1\), got 1.0"),
    ({"dropout": -0.1}, ValueError, "dropout"),
    ({"dropout": float("nan")}, ValueError, "dropout"),
    ({"dropout": "0.4"}, TypeError, "dropout"),
])
@pytest.mark.parametrize("name", ["iresnet18", "ir50", "mobilefacenet", "mbf", "efficientnet_b0",
                                  "efficientnet_b0_plain"])
def test_bad_arguments_raise_before_building(name, kwargs, error, match, monkeypatch):
    forbid_layers(monkeypatch)
    with pytest.raises(error, match=match) as info:
        backbones.build(name, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("cls_args", [("iresnet", "IResNet", (18,)), ("irse", "IRBackbone", (50, False)),
                                      ("mobilefacenet", "MobileFaceNet", ()),
                                      ("mobilefacenet", "MobileFaceNetArcface", ()),
                                      ("efficientnet", "EfficientNetFace", (0,)),
                                      ("efficientnet", "EfficientNetPlain", (0,))])
def test_classes_used_directly_check_their_arguments_first(cls_args, monkeypatch):
    module, cls, args = cls_args
    klass = getattr(importlib.import_module(f"backbones.{module}"), cls)
    forbid_layers(monkeypatch)
    with pytest.raises(ValueError, match="embedding_size"):
        klass(*args, embedding_size=10**9)
    with pytest.raises(ValueError, match="dropout"):
        klass(*args, dropout=1.5)
