"""engine/ema.py and its place in the trainer: the average by its formula, skipped steps left out,
exact resume with AdamW + EMA, backbone_ema.pt, the EMA evaluated beside the live weights."""

import pytest
import torch
import torch.nn as nn

from backbones.weights import load_backbone_checkpoint
from engine.checkpoint import load_training_checkpoint, validate_training_checkpoint
from engine.ema import BackboneEMA
from tests.test_trainer import _NanAfter, _trainer
from utils.torchfile import CheckpointError


def test_the_average_follows_its_formula_and_buffers_are_copied():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = BackboneEMA(model, 0.9)
    want = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(5, 3))  # moves the BatchNorm statistics
        ema.update(model)
        for n, p in model.named_parameters():
            want[n] = 0.9 * want[n] + 0.1 * p.detach().double()
    got = dict(ema.module.named_parameters())
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], atol=1e-6, rtol=1e-6, msg=n)
    for (n, b), b_ema in zip(model.named_buffers(), ema.module.buffers()):
        assert torch.equal(b, b_ema), n
    assert ema.updates == 3 and not any(p.requires_grad for p in ema.module.parameters())


def _ema_state(tr):
    return {k: v.clone() for k, v in tr.ema.module.state_dict().items()}


def test_a_skipped_step_leaves_the_average(tiny_pack, tmp_path):
    tr, _ = _trainer(tiny_pack, tmp_path, criterion=_NanAfter(2), ema_decay=0.5)
    micro = next(iter(tr.feeder.steps()))
    tr.train_step(micro)
    before = _ema_state(tr)
    tr.train_step(micro)
    assert tr.last_bad is not None and tr.ema.updates == 1
    for k, v in tr.ema.module.state_dict().items():
        assert torch.equal(v, before[k]), k
    tr.feeder.close()


def test_resume_with_adamw_and_ema_is_exact(tiny_pack, tmp_path):
    over = dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, ema_decay=0.8)
    a, _ = _trainer(tiny_pack, tmp_path / "a", **over)
    a.fit()
    b, _ = _trainer(tiny_pack, tmp_path / "b", **over)
    b.fit(stop_at=4)  # mid-epoch (3 steps per epoch)
    c, _ = _trainer(tiny_pack, tmp_path / "b", **over)
    c.load_state_dict(load_training_checkpoint(str(tmp_path / "b")))
    c.fit()
    assert c.step == a.step == 9 and c.ema.updates == a.ema.updates == 9
    for name, x, y in (("model", a.model, c.model), ("ema", a.ema.module, c.ema.module), ("head", a.objective,
                                                                                          c.objective)):
        for (k, va), vc in zip(x.state_dict().items(), y.state_dict().values()):
            assert torch.equal(va, vc), (name, k)
    sa, sc = a.optimizer.state_dict(), c.optimizer.state_dict()
    assert sa["param_groups"] == sc["param_groups"]
    for i, entry in sa["state"].items():
        assert sorted(entry) == ["exp_avg", "exp_avg_sq", "step"]
        for k, v in entry.items():
            assert torch.equal(v, sc["state"][i][k]), (i, k)
    # the average differs from the live weights (it lags them)
    assert any(not torch.equal(v, a.ema.module.state_dict()[k]) for k, v in a.model.state_dict().items())


def test_backbone_ema_pt_is_written_like_backbone_pt(tiny_pack, tmp_path):
    tr, cfg = _trainer(tiny_pack, tmp_path, ema_decay=0.9, max_steps=2)
    tr.fit()
    live = load_backbone_checkpoint(str(tmp_path / "backbone.pt"))
    ema = load_backbone_checkpoint(str(tmp_path / "backbone_ema.pt"))
    assert {k: live[k] for k in live if k != "state_dict"} == {k: ema[k] for k in ema if k != "state_dict"}
    for k, v in tr.ema.module.state_dict().items():
        assert torch.equal(ema["state_dict"][k], v), k
    state = load_training_checkpoint(str(tmp_path))
    assert state["ema"]["updates"] == 2


def test_the_average_is_evaluated_beside_the_live_weights(tiny_pack, tmp_path):
    seen = []

    def evaluator(model):
        seen.append(model)
        return {"mean_accuracy": 0.5 if len(seen) % 2 else 0.75, "results": {"lfw": {"accuracy": 0.5}}}

    tr, _ = _trainer(tiny_pack, tmp_path, evaluator=evaluator, ema_decay=0.9, epochs=1, eval_every=0)
    tr.fit()
    assert seen == [tr.model, tr.ema.module]
    assert tr.history["eval_ema"] == [{"step": 3, "mean_accuracy": 0.75, "accuracy": {"lfw": 0.5}}]
    assert tr.best == 0.5  # best.pt follows the live weights
    line = "step 3: EMA weights (decay 0.9) verification lfw 50.00 | mean 75.00%"
    assert line in (tmp_path / "train.log").read_text()


def test_a_damaged_ema_field_is_refused_by_name(tiny_pack, tmp_path):
    tr, _ = _trainer(tiny_pack, tmp_path, ema_decay=0.9, max_steps=1)
    tr.fit()
    state = load_training_checkpoint(str(tmp_path))
    state["ema"] = dict(state["ema"], model={"0.weight": "not a tensor"})
    with pytest.raises(CheckpointError, match="ema.model entry '0.weight'"):
        validate_training_checkpoint(state, "ck.pt")
