"""The training loop: loss falls, resume continues exactly, checkpoints are complete."""

import os

import torch

import heads
import losses
from config import build_config
from data.dataset import build_dataset
from engine.checkpoint import load_training_checkpoint
from engine.trainer import Trainer, param_groups
from tests.small_nets import SmallNet


def _trainer(pack, out, **over):
    cfg = build_config(overrides=dict(dict(batch_size=12, lr=0.1, epochs=3, warmup_epochs=1, num_workers=0,
                                           progress=False, log_every=1, seed=5), **over))
    torch.manual_seed(0)
    ds = build_dataset(pack)
    head = heads.build("cosface", 32, ds.num_classes, s=16.0, m=0.2)
    return Trainer(cfg, SmallNet(32), head, losses.build("cross_entropy"), ds, torch.device("cpu"), str(out),
                   log=lambda m: None), cfg


def test_loss_falls(tiny_pack, tmp_path):
    tr, cfg = _trainer(tiny_pack, tmp_path, epochs=12)
    tr.fit({})
    loss = tr.history["loss"]
    assert len(loss) == tr.total_steps == 36
    assert sum(loss[-4:]) / 4 < 0.8 * sum(loss[:4]) / 4
    assert os.path.isfile(tmp_path / "checkpoint.pt") and os.path.isfile(tmp_path / "loss.png")


def test_resume_gives_identical_weights(tiny_pack, tmp_path):
    a, _ = _trainer(tiny_pack, tmp_path / "a")
    a.fit({})
    b, _ = _trainer(tiny_pack, tmp_path / "b")
    b.fit({}, stop_at=4)  # interrupted mid-epoch (3 steps per epoch)
    assert b.step == 4
    c, _ = _trainer(tiny_pack, tmp_path / "b")
    c.load_state_dict(load_training_checkpoint(str(tmp_path / "b")))
    assert c.step == 4
    c.fit({})
    assert c.step == a.step == 9
    for (k, va), vc in zip(a.model.state_dict().items(), c.model.state_dict().values()):
        assert torch.equal(va, vc), k
    assert torch.equal(a.head.weight, c.head.weight)
    assert a.optimizer.param_groups[0]["lr"] == c.optimizer.param_groups[0]["lr"]


def test_checkpoint_holds_everything_to_resume(tiny_pack, tmp_path):
    tr, _ = _trainer(tiny_pack, tmp_path)
    tr.fit({"note": "cfg"}, stop_at=2)
    state = load_training_checkpoint(str(tmp_path / "checkpoint.pt"))
    for key in ("model", "head", "optimizer", "scheduler", "scaler", "step", "rng", "config", "version"):
        assert key in state
    assert state["config"] == {"note": "cfg"} and state["step"] == 2


def test_no_weight_decay_on_bn_and_bias():
    net = SmallNet(32)
    decay, no_decay = param_groups([net], 5e-4)
    assert {p.ndim for p in decay["params"]} == {2, 4}
    assert {p.ndim for p in no_decay["params"]} == {1} and no_decay["weight_decay"] == 0.0


class _NanAfter(torch.nn.Module):
    """Cross-entropy, NaN from the ``k``-th call on."""

    def __init__(self, k):
        super().__init__()
        self.k, self.calls = k, 0

    def forward(self, logits, labels):
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return loss * float("nan") if self.calls >= self.k else loss


def test_a_nan_step_is_skipped_leaving_weights_momentum_and_bn_statistics(tiny_pack, tmp_path):
    tr, _ = _trainer(tiny_pack, tmp_path)
    tr.criterion = _NanAfter(2)
    micro = next(iter(tr.feeder.steps()))
    tr.train_step(micro)
    assert tr.last_bad is None
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}  # weights and BN running statistics
    momentum = [tr.optimizer.state[p]["momentum_buffer"].clone() for p in tr.model.parameters()]
    lr = tr.optimizer.param_groups[0]["lr"]
    tr.train_step(micro)
    assert tr.last_bad.startswith("loss nan")
    for k, v in tr.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    after = [tr.optimizer.state[p]["momentum_buffer"] for p in tr.model.parameters()]
    assert all(torch.equal(a, m) for a, m in zip(after, momentum))
    assert tr.optimizer.param_groups[0]["lr"] != lr  # the schedule advances: lr = f(step) whatever was skipped
    assert tr.scheduler.last_epoch == 2
    tr.feeder.close()


def test_evaluation_runs_after_the_save_of_its_step(tiny_pack, tmp_path):
    order = []
    tr, _ = _trainer(tiny_pack, tmp_path, epochs=1, eval_every=0, save_every=0)
    tr.evaluator = lambda model: order.append(("eval", os.path.isfile(tmp_path / "checkpoint.pt"))) or {
        "mean_accuracy": 0.5, "results": {}}
    tr.fit({})
    assert order == [("eval", True)]


def test_history_json_holds_the_final_evaluation(tiny_pack, tmp_path):
    import json

    tr, _ = _trainer(tiny_pack, tmp_path, epochs=1, eval_every=0, save_every=-1)
    tr.evaluator = lambda model: {"mean_accuracy": 0.75, "results": {}}
    tr.fit({})
    evals = json.load(open(tmp_path / "history.json"))["eval"]
    assert [(e["step"], e["mean_accuracy"]) for e in evals] == [(3, 0.75)]
