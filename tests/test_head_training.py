"""Every margin head (and the focal loss) trains: loss falls, verification beats the untrained net.

A tiny backbone on a small synthetic pack keeps this to seconds per head; the
real evaluation path (load_targets -> embed -> 10-fold protocol) scores it.
"""

import pytest
import torch

import heads
import losses
from config import build_config
from data.dataset import build_dataset
from engine.objective import DenseLoss
from engine.trainer import Trainer
from evaluation.targets import evaluate_targets, load_targets, mean_accuracy
from tests.small_nets import SmallNet

HEADS = ["arcface", "cosface", "sphereface", "combined", "softmax", "norm_softmax", "curricularface", "adaface",
         "magface", "subcenter_arcface", "elasticface_arc", "elasticface_cos"]


@pytest.fixture(scope="module")
def small_pack(tmp_path_factory):
    from prepare.synth import generate_dataset

    out = tmp_path_factory.mktemp("small_pack")
    generate_dataset(str(out), identities=24, images_per_id=8, pairs=0.004, seed=7, difficulty=0.2, progress=False)
    return str(out)


def _head_params(name: str) -> dict:
    accepted = heads.params(name)
    return {"s": 16.0} if "s" in accepted else {}


@pytest.mark.parametrize("head_name,loss_name", [(h, "cross_entropy") for h in HEADS] + [("arcface", "focal")])
def test_head_trains(head_name, loss_name, small_pack, tmp_path):
    torch.manual_seed(0)
    cfg = build_config(overrides=dict(batch_size=32, lr=0.1, epochs=10, warmup_epochs=1, num_workers=0,
                                      progress=False, log_every=6, eval_every=-1, save_every=-1,
                                      channels_last=False, output=str(tmp_path)))
    ds = build_dataset(small_pack)
    targets = load_targets(small_pack).targets
    net = SmallNet()
    head = heads.build(head_name, 64, ds.num_classes, **_head_params(head_name))
    crit = losses.build(loss_name)
    before = mean_accuracy(evaluate_targets(net, targets, batch_size=128))
    tr = Trainer(cfg, net, DenseLoss(head, crit), ds, torch.device("cpu"))
    tr.fit()
    after = mean_accuracy(evaluate_targets(net, targets, batch_size=128))
    loss = tr.history["loss"]
    assert loss[-1] < loss[0], (head_name, loss)
    assert after > before, (head_name, before, after)
