"""The training loop: loss falls, resume continues exactly, a dense head and Partial FC train alike."""

import json
import os

import torch

import heads
import losses
from config import build_config, from_dict
from data.dataset import build_dataset
from engine.checkpoint import load_training_checkpoint
from engine.objective import DenseLoss
from engine.optim import param_groups
from engine.trainer import Trainer
from heads.partial_fc import PartialFC
from tests.small_nets import SmallNet


def _trainer(pack, out, criterion=None, partial_fc=False, evaluator=None, **over):
    cfg = build_config(overrides=dict(dict(batch_size=12, lr=0.1, epochs=3, warmup_epochs=1, num_workers=0,
                                           progress=False, log_every=1, seed=5, output=str(out)), **over))
    torch.manual_seed(0)
    ds = build_dataset(pack)
    head = heads.build("cosface", 32, ds.num_classes, s=16.0, m=0.2)
    criterion = criterion or losses.build("cross_entropy")
    objective = PartialFC(head, criterion, seed=cfg.seed) if partial_fc else DenseLoss(head, criterion)
    return Trainer(cfg, SmallNet(32), objective, ds, torch.device("cpu"), evaluator=evaluator), cfg


def _centres(tr):
    return tr.objective.checkpoint_state()["head"]["weight"]


def test_loss_falls(tiny_pack, tmp_path):
    tr, cfg = _trainer(tiny_pack, tmp_path, epochs=12)
    tr.fit()
    loss = tr.history["loss"]
    assert len(loss) == tr.total_steps == 36
    assert sum(loss[-4:]) / 4 < 0.8 * sum(loss[:4]) / 4
    assert os.path.isfile(tmp_path / "checkpoint.pt") and os.path.isfile(tmp_path / "loss.png")


def test_resume_gives_identical_weights(tiny_pack, tmp_path):
    a, _ = _trainer(tiny_pack, tmp_path / "a")
    a.fit()
    b, _ = _trainer(tiny_pack, tmp_path / "b")
    b.fit(stop_at=4)  # interrupted mid-epoch (3 steps per epoch)
    assert b.step == 4
    c, _ = _trainer(tiny_pack, tmp_path / "b")
    c.load_state_dict(load_training_checkpoint(str(tmp_path / "b")))
    assert c.step == 4
    c.fit()
    assert c.step == a.step == 9
    for (k, va), vc in zip(a.model.state_dict().items(), c.model.state_dict().values()):
        assert torch.equal(va, vc), k
    assert torch.equal(_centres(a), _centres(c))
    assert a.optimizer.param_groups[0]["lr"] == c.optimizer.param_groups[0]["lr"]


def test_partial_fc_in_one_process_trains_like_the_dense_head(tiny_pack, tmp_path):
    """One surface: the same head through Partial FC (R = 1, one shard) or dense gives the same run."""
    dense, _ = _trainer(tiny_pack, tmp_path / "dense", max_steps=4)
    dense.fit()
    pfc, _ = _trainer(tiny_pack, tmp_path / "pfc", partial_fc=True, max_steps=4)
    pfc.fit()
    torch.testing.assert_close(torch.tensor(pfc.history["loss"]), torch.tensor(dense.history["loss"]),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_centres(pfc), _centres(dense), atol=1e-5, rtol=1e-4)


def test_the_checkpoint_config_rebuilds_the_runs_config(tiny_pack, tmp_path):
    tr, cfg = _trainer(tiny_pack, tmp_path)
    tr.fit(stop_at=2)
    state = load_training_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert from_dict(state["config"]) == cfg and state["step"] == 2


def test_no_weight_decay_on_bn_and_bias():
    net = SmallNet(32)
    decay, no_decay = param_groups(net, None, 5e-4)
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
    tr, _ = _trainer(tiny_pack, tmp_path, criterion=_NanAfter(2))
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

    def evaluator(model):
        order.append(("eval", os.path.isfile(tmp_path / "checkpoint.pt")))
        return {"mean_accuracy": 0.5, "results": {}}

    tr, _ = _trainer(tiny_pack, tmp_path, evaluator=evaluator, epochs=1, eval_every=0, save_every=0)
    tr.fit()
    assert order == [("eval", True)]


def test_the_final_evaluation_is_in_history_and_verification_json_never_eval_json(tiny_pack, tmp_path):
    report = {"mean_accuracy": 0.75, "results": {"lfw": {"accuracy": 0.75, "xnorm": 2.0}}}
    tr, _ = _trainer(tiny_pack, tmp_path, evaluator=lambda model: report, epochs=1, eval_every=0, save_every=-1)
    tr.fit()
    evals = json.load(open(tmp_path / "history.json"))["eval"]
    assert evals == [{"step": 3, "mean_accuracy": 0.75, "accuracy": {"lfw": 0.75}}]
    assert json.load(open(tmp_path / "verification.json")) == dict(report, step=3)
    assert not (tmp_path / "eval.json").exists()
    assert os.path.isfile(tmp_path / "best.pt")
    assert "step 3: verification lfw 75.00 | mean 75.00%, XNorm 2" in (tmp_path / "train.log").read_text()
