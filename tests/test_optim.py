"""engine/optim.py: which parameters decay (by name), the lr of each, AdamW's step by its formula,
and a sharded head's AdamW state through a checkpoint."""

import pytest
import torch
import torch.nn as nn

from config import ConfigError, build_config, choices_of
from engine.checkpoint import load_training_checkpoint
from engine.optim import OPTIMIZERS, base_lr, build_optimizer, param_groups, per_parameter_state
from tests.distributed import run_ranks
from tests.test_ddp import make_trainer


class TinyViT(nn.Module):
    """arcface_torch vit.py's parameter names at toy size: patch_embed, pos_embed, cls/mask tokens,
    blocks.<i> (LayerNorm + Linear), norm, feature (Linear + BatchNorm1d), a PReLU."""

    def __init__(self, depth=3, dim=4):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 2, stride=2)
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.feature = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.PReLU())


def _names(groups, module, pred):
    ids = {id(p) for g in groups if pred(g) for p in g["params"]}
    return {n for n, p in module.named_parameters() if id(p) in ids}


def _cfg(**over):
    return build_config(overrides=dict(dict(lr=0.01, weight_decay=0.1), **over))


DECAYED = {"patch_embed.proj.weight", "blocks.0.1.weight", "blocks.1.1.weight", "blocks.2.1.weight",
           "feature.0.weight"}


def test_adamw_decays_matrices_only_not_norms_biases_tokens_or_position_embeddings():
    net, head = TinyViT(), nn.Linear(4, 7, bias=False)
    opt = build_optimizer(_cfg(optimizer="adamw"), net, head)
    assert isinstance(opt, torch.optim.AdamW)
    groups = opt.param_groups
    assert _names(groups, net, lambda g: g["weight_decay"] == 0.1) == DECAYED
    every = {n for n, _ in net.named_parameters()}
    assert _names(groups, net, lambda g: g["weight_decay"] == 0.0) == every - DECAYED
    assert _names(groups, head, lambda g: g["weight_decay"] == 0.1) == {"weight"}  # the class centres decay


def test_sgd_keeps_the_ndim_rule_so_the_3d_tokens_decay():
    net = TinyViT()
    opt = build_optimizer(_cfg(optimizer="sgd", momentum=0.9), net, nn.Linear(4, 7))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert _names(opt.param_groups, net, lambda g: g["weight_decay"] > 0) == \
        DECAYED | {"pos_embed", "cls_token", "mask_token"}


def test_layer_decay_lrs_by_hand():
    net, head = TinyViT(depth=3), nn.Linear(4, 7, bias=False)
    opt = build_optimizer(_cfg(optimizer="adamw", layer_decay=0.5, head_lr_mult=2.0), net, head)
    lr_of = {n: g["lr"] for g in opt.param_groups for n, p in net.named_parameters()
             if any(p is q for q in g["params"])}
    # L = 3 blocks: block i at 0.5**(3 - i); patch embedding and tokens at 0.5**4; after the blocks 1
    want = {"blocks.0": 0.01 * 0.125, "blocks.1": 0.01 * 0.25, "blocks.2": 0.01 * 0.5, "patch_embed": 0.01 / 16,
            "pos_embed": 0.01 / 16, "cls_token": 0.01 / 16, "mask_token": 0.01 / 16, "norm": 0.01, "feature": 0.01}
    for name, lr in lr_of.items():
        key = ".".join(name.split(".")[:2]) if name.startswith("blocks.") else name.split(".")[0]
        assert lr == pytest.approx(want[key]), name
    head_lr = [g["lr"] for g in opt.param_groups if any(p is head.weight for p in g["params"])]
    assert head_lr == [pytest.approx(0.02)]
    assert base_lr(opt) == pytest.approx(0.01)  # what the log reports, whatever group 0 is


def test_layer_decay_without_blocks_is_one_line_naming_the_flag():
    with pytest.raises(ConfigError, match=r"--layer-decay 0\.75: the backbone has no transformer blocks"):
        build_optimizer(_cfg(optimizer="adamw", layer_decay=0.75), nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 3))


def test_betas_must_be_two_values():
    with pytest.raises(ConfigError, match="--betas 0.9: give two values"):
        build_optimizer(_cfg(optimizer="adamw", betas=(0.9,)), nn.Linear(2, 2), nn.Linear(2, 3))


def test_the_config_choices_are_the_registry():
    assert sorted(choices_of("optimizer")) == OPTIMIZERS.names() == ["adamw", "sgd"]


def test_group_numbering_of_earlier_checkpoints_is_kept():
    """Without multipliers: [decay, no decay] over backbone then head; with --backbone-lr-mult the head's
    pair first (as fine-tuning numbered them), empty groups kept."""
    net, head = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)), nn.Linear(3, 4, bias=False)
    plain = param_groups(net, head, 5e-4, 0.1)
    assert [[p.shape for p in g["params"]] for g in plain] == [[(3, 2), (4, 3)], [(3,), (3,), (3,)]]
    ft = param_groups(net, head, 5e-4, 0.1, backbone_lr_mult=0.1)
    assert [len(g["params"]) for g in ft] == [1, 0, 1, 3]
    assert [g["lr"] for g in ft] == pytest.approx([0.1, 0.1, 0.01, 0.01])


def test_adamw_first_step_is_the_decoupled_formula():
    """p1 = p0 (1 - lr wd) - lr * m_hat / (sqrt(v_hat) + eps), m_hat = g, v_hat = g^2 after one step (float64)."""
    torch.manual_seed(0)
    net, head = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), nn.Linear(4, 5, bias=False)
    lr, wd, eps, b1, b2 = 0.01, 0.1, 1e-3, 0.8, 0.9
    opt = build_optimizer(_cfg(optimizer="adamw", lr=lr, weight_decay=wd, eps=eps, betas=(b1, b2)), net, head)
    named = list(net.named_parameters()) + [("head.weight", head.weight)]
    before = {n: p.detach().double().clone() for n, p in named}
    for _, p in named:
        p.grad = torch.randn_like(p)
    opt.step()
    for n, p in named:
        g = p.grad.double()
        m_hat = (1 - b1) * g / (1 - b1)
        v_hat = (1 - b2) * g * g / (1 - b2)
        decay = 0.0 if p.ndim <= 1 else wd
        want = before[n] * (1 - lr * decay) - lr * m_hat / (v_hat.sqrt() + eps)
        torch.testing.assert_close(p.detach().double(), want, atol=1e-7, rtol=1e-6, msg=n)


def test_per_parameter_state_is_the_tensors_shaped_like_the_parameter():
    p = torch.zeros(6, 4)
    state = {"step": torch.tensor(3.0), "exp_avg": torch.ones(6, 4), "exp_avg_sq": torch.ones(12, 4),
             "momentum_buffer": torch.ones(3, 4), "other": torch.ones(4)}
    assert sorted(per_parameter_state(state, p)) == ["exp_avg", "exp_avg_sq", "momentum_buffer"]


def _adamw_pfc(rank, world_size, pack, out, load):
    tr, _ = make_trainer(pack, out, True, world_size, rank, batch_size=6, max_steps=3, optimizer="adamw", lr=1e-3,
                         weight_decay=0.1)
    if load:
        tr.load_state_dict(load_training_checkpoint(out))
    else:
        tr.fit(stop_at=2)
    state = tr.optimizer.state[tr.objective.weight]
    return {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq", "step")}


def test_partial_fc_adamw_state_is_gathered_into_the_checkpoint_and_sharded_back(tiny_pack, tmp_path):
    out = str(tmp_path / "run")
    saved = run_ranks(_adamw_pfc, 2, tiny_pack, out, False, init_group=False)
    ckpt = load_training_checkpoint(out)
    full = {k: torch.cat([s[k] for s in saved]) for k in ("exp_avg", "exp_avg_sq")}
    rows = [e for e in ckpt["optimizer"]["state"].values() if e["exp_avg"].shape == full["exp_avg"].shape]
    assert len(rows) == 1 and rows[0]["exp_avg"].shape[0] == 6  # the 6 identities of tiny_pack, both shards
    for k in full:
        assert torch.equal(rows[0][k], full[k]), k
        assert full[k].abs().sum() > 0, k
    loaded = run_ranks(_adamw_pfc, 2, tiny_pack, out, True, init_group=False)
    for before, after in zip(saved, loaded):
        for k in before:
            assert torch.equal(before[k], after[k]), k
