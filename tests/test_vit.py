"""ViT backbones against arcface_torch's published code (recognition/arcface_torch/backbones/vit.py and
the ViT entries of its get_model): state_dict layout, variant settings, attention and masking as
written there, drop path / masking only in training, activation checkpointing, cost, a short training run.

The layouts below are written by hand from their source, never read from our model:
  PatchEmbed.proj = Conv2d(3, D, 9, stride 9) (bias); pos_embed (1, 144, D); mask_token (1, 1, D);
  Block: norm1/norm2 LayerNorm(D); attn.qkv Linear(D, 3D, bias=False); attn.proj Linear(D, D);
  mlp.fc1 Linear(D, 4D); mlp.fc2 Linear(4D, D); final norm LayerNorm(D);
  feature = Sequential(Linear(144D, D, bias=False), BatchNorm1d(D), Linear(D, E, bias=False), BatchNorm1d(E)).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import backbones
from backbones.profile import profile
from backbones.vit import DropPath

# get_model(name): embed_dim, depth, drop_path_rate, mask_ratio, using_checkpoint (num_heads 8, patch 9,
# img 112, norm 'ln' for all). vit_h from the later get_model (insightface forks, LVFace); vit_l is our
# short name for their only L recipe, vit_l_dp005_mask_005.
PUBLISHED = {
    "vit_t": (256, 12, 0.1, 0.1, False),
    "vit_t_dp005_mask0": (256, 12, 0.05, 0.0, False),
    "vit_s": (512, 12, 0.1, 0.1, False),
    "vit_s_dp005_mask_0": (512, 12, 0.05, 0.0, False),
    "vit_b": (512, 24, 0.1, 0.1, True),
    "vit_b_dp005_mask_005": (512, 24, 0.05, 0.05, True),
    "vit_l": (768, 24, 0.05, 0.05, True),
    "vit_l_dp005_mask_005": (768, 24, 0.05, 0.05, True),
    "vit_h": (1024, 48, 0.1, 0.0, True),
}

# vit_t (D=256, E=512) written out in full: the keys outside the blocks, and one block.
VIT_T_OUTSIDE = {
    "pos_embed": [1, 144, 256],
    "mask_token": [1, 1, 256],
    "patch_embed.proj.weight": [256, 3, 9, 9],
    "patch_embed.proj.bias": [256],
    "norm.weight": [256],
    "norm.bias": [256],
    "feature.0.weight": [256, 36864],
    "feature.1.weight": [256],
    "feature.1.bias": [256],
    "feature.1.running_mean": [256],
    "feature.1.running_var": [256],
    "feature.1.num_batches_tracked": [],
    "feature.2.weight": [512, 256],
    "feature.3.weight": [512],
    "feature.3.bias": [512],
    "feature.3.running_mean": [512],
    "feature.3.running_var": [512],
    "feature.3.num_batches_tracked": [],
}
VIT_T_BLOCK = {
    "norm1.weight": [256],
    "norm1.bias": [256],
    "attn.qkv.weight": [768, 256],
    "attn.proj.weight": [256, 256],
    "attn.proj.bias": [256],
    "norm2.weight": [256],
    "norm2.bias": [256],
    "mlp.fc1.weight": [1024, 256],
    "mlp.fc1.bias": [1024],
    "mlp.fc2.weight": [256, 1024],
    "mlp.fc2.bias": [256],
}


def published_layout(d: int, depth: int, e: int = 512) -> dict:
    """Their key -> shape for embed_dim ``d``, ``depth`` blocks, ``e`` features (144 patches)."""
    out = {"pos_embed": [1, 144, d], "mask_token": [1, 1, d], "patch_embed.proj.weight": [d, 3, 9, 9],
           "patch_embed.proj.bias": [d], "norm.weight": [d], "norm.bias": [d], "feature.0.weight": [d, 144 * d],
           "feature.2.weight": [e, d]}
    for i, width in ((1, d), (3, e)):
        out.update({f"feature.{i}.{k}": [width] for k in ("weight", "bias", "running_mean", "running_var")})
        out[f"feature.{i}.num_batches_tracked"] = []
    for b in range(depth):
        out.update({f"blocks.{b}.norm1.weight": [d], f"blocks.{b}.norm1.bias": [d],
                    f"blocks.{b}.attn.qkv.weight": [3 * d, d], f"blocks.{b}.attn.proj.weight": [d, d],
                    f"blocks.{b}.attn.proj.bias": [d], f"blocks.{b}.norm2.weight": [d], f"blocks.{b}.norm2.bias": [d],
                    f"blocks.{b}.mlp.fc1.weight": [4 * d, d], f"blocks.{b}.mlp.fc1.bias": [4 * d],
                    f"blocks.{b}.mlp.fc2.weight": [d, 4 * d], f"blocks.{b}.mlp.fc2.bias": [d]})
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def shapes(model: torch.nn.Module) -> dict:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def on_meta(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return backbones.build(name, **kwargs)


def small(depth: int = 2, **kwargs) -> torch.nn.Module:
    """vit_t at reduced depth (same widths and layout per block), for CPU-sized checks."""
    return backbones.build("vit_t", depth=depth, **kwargs)


def faces(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, 112, 112) * 2 - 1


# ---------------------------------------------------------------- layout and variant settings

def test_vit_t_layout_written_out():
    expected = dict(VIT_T_OUTSIDE)
    for b in range(12):
        expected.update({f"blocks.{b}.{k}": v for k, v in VIT_T_BLOCK.items()})
    assert len(expected) == 18 + 12 * 11
    assert shapes(on_meta("vit_t")) == expected


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_every_variant_layout_and_settings_match_get_model(name):
    d, depth, drop_path, mask_ratio, ckpt = PUBLISHED[name]
    model = on_meta(name)
    assert shapes(model) == published_layout(d, depth)
    assert model.blocks[0].drop_path.p == 0.0 and model.blocks[-1].drop_path.p == pytest.approx(drop_path)
    assert model.blocks[depth // 2].drop_path.p == pytest.approx(drop_path * (depth // 2) / (depth - 1))
    assert (model.mask_ratio, model.activation_checkpointing) == (mask_ratio, ckpt)
    assert all(b.attn.num_heads == 8 for b in model.blocks)
    assert model.mask_token.requires_grad == (mask_ratio > 0), "an unused mask token must be frozen (DDP)"


def test_registered_vit_names_are_the_published_ones_and_vit_mini():
    assert sorted(n for n in backbones.names() if backbones.spec(n).family == "vit") == sorted([*PUBLISHED, "vit_mini"])
    assert backbones.spec("vit_mini").layout is None and backbones.spec("vit_t").layout == "arcface_torch/vit_t"


def test_vit_mini_is_vit_t_at_cpu_size():
    model = on_meta("vit_mini")
    assert shapes(model) == published_layout(128, 4)
    assert (model.mask_ratio, model.blocks[-1].drop_path.p) == (0.1, pytest.approx(0.1))
    want = 144 * 243 * 128 + 4 * (144 * 12 * 128 ** 2 + 2 * 144 ** 2 * 128) + 144 * 128 ** 2 + 128 * 512
    assert round(profile(lambda: backbones.build("vit_mini")).gmacs * 1e9) == want < 0.221e9  # below MobileFaceNet


def test_custom_embedding_size_changes_only_the_last_layers():
    got = shapes(on_meta("vit_s", embedding_size=128))
    want = published_layout(512, 12, e=128)
    assert got == want


def test_published_layout_loads_strictly(tmp_path):
    """A file with exactly their keys/shapes (values arbitrary), DDP-prefixed, loads strictly; from_file too."""
    sd = {k: torch.tensor(3) if not shape else torch.full(shape, 0.25) for k, shape in published_layout(256, 2).items()}
    path = tmp_path / "vit_t_depth2.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    model = backbones.load_weights(small(2), path, strict=True)
    assert all(torch.equal(model.state_dict()[k], v.to(model.state_dict()[k].dtype)) for k, v in sd.items())
    full = tmp_path / "vit_t.pth"
    torch.save({k: torch.zeros(s) if s else torch.tensor(0) for k, s in published_layout(256, 12).items()}, full)
    loaded = backbones.from_file(str(full), backbone="vit_t")
    assert loaded.name == "vit_t" and loaded.model.blocks[11].mlp.fc2.weight.abs().sum() == 0


# ---------------------------------------------------------------- forward, attention, masking

def test_forward_shapes_train_and_eval():
    torch.manual_seed(0)
    model = small(1)
    x = faces()
    assert model.train()(x).shape == (2, 512)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 512)
    with pytest.raises(ValueError, match="112x112"):
        model(torch.zeros(2, 3, 96, 96))


def test_attention_equals_their_formula_float64():
    """qkv split as theirs: rows [0:D) q, [D:2D) k, [2D:3D) v; head h = columns h*hd:(h+1)*hd; scale hd^-0.5."""
    torch.manual_seed(0)
    attn = small(1).blocks[0].attn.double()
    x = torch.randn(2, 144, 256, dtype=torch.float64)
    w, hd = attn.qkv.weight, 256 // 8
    q, k, v = (x @ w[i * 256:(i + 1) * 256].T for i in range(3))
    heads = []
    for h in range(8):
        cols = slice(h * hd, (h + 1) * hd)
        scores = q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(hd)
        heads.append(torch.softmax(scores, dim=-1) @ v[..., cols])
    want = torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(attn(x), want, rtol=1e-10, atol=1e-10)


def their_features(model, x: torch.Tensor) -> torch.Tensor:
    """arcface_torch forward_features in training, written out: argsort noise, keep int(L*(1-r)), blocks,
    norm, then cat(kept, mask tokens) and gather with ids_restore (drop path must be 0 here)."""
    b = x.shape[0]
    t = model.patch_embed.proj(x).flatten(2).transpose(1, 2) + model.pos_embed
    n, d = t.shape[1:]
    keep = int(n * (1 - model.mask_ratio))
    noise = torch.rand(b, n)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    t = torch.gather(t, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, d))
    for block in model.blocks:
        t = block(t)
    t = model.norm(t)
    t = torch.cat([t, model.mask_token.repeat(b, n - keep, 1)], dim=1)
    t = torch.gather(t, 1, ids_restore.unsqueeze(-1).repeat(1, 1, d))
    return t.reshape(b, n * d)


def test_masking_matches_their_procedure_and_fills_mask_token():
    torch.manual_seed(0)
    model = small(2, drop_path=0.0).train()
    x = faces()
    torch.manual_seed(7)
    ours = model.forward_features(x)
    torch.manual_seed(7)
    want = their_features(model, x)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    tokens = ours.detach().reshape(2, 144, 256)
    is_mask = (tokens == model.mask_token.detach()).all(-1)
    assert is_mask.sum(1).tolist() == [144 - int(144 * 0.9)] * 2 == [15, 15]


def test_masking_and_drop_path_only_in_training():
    torch.manual_seed(0)
    model = small(2, drop_path=0.5)
    x = faces()
    with torch.no_grad():
        model.eval()
        a, b = model(x), model(x)
        assert torch.equal(a, b), "eval must be deterministic"
        plain = small(2, drop_path=0.0, mask_ratio=0.0)
        plain.load_state_dict(model.state_dict())
        torch.testing.assert_close(plain.eval()(x), a, rtol=0, atol=0)
        model.train()
        assert not torch.equal(model(x), model(x)), "masking / drop path must act in training"
        assert torch.equal(plain.train()(x), plain(x)), "training without masking / drop path is deterministic"


def test_drop_path_keeps_whole_samples_and_the_mean():
    torch.manual_seed(0)
    dp = DropPath(0.25).train()
    x = torch.ones(4000, 3, 5)
    y = dp(x)
    per_sample = y.reshape(4000, -1)
    assert set(per_sample.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}  # float32 1/(1-p)
    assert (per_sample == per_sample[:, :1]).all(), "a sample is dropped whole"
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.03
    assert torch.equal(dp.eval()(x), x)


def test_activation_checkpointing_same_output_and_gradients():
    torch.manual_seed(0)
    plain = small(2, drop_path=0.3)
    ckpt = small(2, drop_path=0.3, activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = faces()
    results = []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(3)  # same masks and drop-path draws
        out = model(x)
        out.square().mean().backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-5, atol=1e-7, msg=k)


def test_embedding_is_float32_under_autocast():
    model = small(1).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        emb = model(faces())
    assert emb.dtype == torch.float32 and torch.isfinite(emb).all()


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="mask_ratio must be a fraction in"):
        backbones.build("vit_t", mask_ratio=1.0)
    with pytest.raises(ValueError, match="drop_path"):
        backbones.build("vit_t", drop_path=-0.1)
    with pytest.raises(ValueError, match="depth"):
        backbones.build("vit_t", depth=0)
    with pytest.raises(TypeError, match="unknown option"):
        backbones.build("vit_t", patch_size=16)


# ---------------------------------------------------------------- cost and training

@pytest.mark.parametrize("name", ["vit_t", "vit_s", "vit_b", "vit_l", "vit_h"])
def test_macs_equal_the_hand_count(name):
    """Per image: patch conv 144*243*D; per block qkv 3D^2, proj D^2, mlp 8D^2 per token (12 D^2 * 144)
    plus q k^T and attn v 2 * 144^2 * D; feature 144D*D + D*512."""
    d, depth = PUBLISHED[name][:2]
    want = 144 * 243 * d + depth * (144 * 12 * d * d + 2 * 144 * 144 * d) + 144 * d * d + d * 512
    assert round(profile(lambda: backbones.build(name)).gmacs * 1e9) == want


@pytest.mark.parametrize("name,published", [("vit_t", 1.5), ("vit_b", 11.0)])
def test_macs_round_to_the_published_labels(name, published):
    """arcface_torch's model zoo names them ViT-T-1.5G and ViT-B-11G."""
    assert round(profile(lambda: backbones.build(name)).gmacs, 0 if published >= 10 else 1) == published


def test_reduced_depth_vit_t_learns_a_few_steps():
    """2 blocks of vit_t, AdamW, cross-entropy on 4 fixed images of 4 classes: the loss falls."""
    torch.manual_seed(0)
    model = small(2, embedding_size=32)
    head = torch.nn.Linear(32, 4)
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=1e-3, weight_decay=0.1)
    x, y = faces(4), torch.arange(4)
    losses = []
    model.train()
    for _ in range(8):
        loss = F.cross_entropy(head(F.normalize(model(x))) * 16, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
