"""Fine-tuning: --init-backbone from published layouts and our files, --init-head, a frozen backbone,
a lower backbone lr. References: the published key names (arcface_torch iresnet, InsightFace_Pytorch
Backbone; counts read off their model definitions) and SGD's update computed by hand in float64."""

import hashlib

import pytest
import torch

import backbones
import heads
import losses
import train
from config import build_config
from data.dataset import build_dataset
from engine.checkpoint import load_training_checkpoint
from engine.objective import DenseLoss
from engine.trainer import Trainer
from tests.cli_helpers import script_error
from tests.small_nets import SmallNet
from utils.torchfile import load_file

# Key names of the published models (arcface_torch iresnet.py, InsightFace_Pytorch model.py) and their counts.
ARCFACE_TORCH_R18 = 187, ("conv1.weight", "prelu.weight", "layer1.0.bn1.weight", "layer4.1.conv2.weight",
                          "fc.weight", "features.running_var")
INSIGHTFACE_PYTORCH_IR_SE50 = 397, ("input_layer.0.weight", "body.0.res_layer.5.fc1.weight",
                                    "body.23.res_layer.5.fc2.weight", "output_layer.3.weight",
                                    "output_layer.4.running_mean")


def _random_state(name, emb):
    torch.manual_seed(11)
    model = backbones.build(name, embedding_size=emb)
    with torch.no_grad():  # BN statistics too, so that a fresh model could not pass for the loaded one
        for b in model.buffers():
            if b.is_floating_point():
                b.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _args(pack, out, *more):
    return ["--data", pack, "--output", str(out), "--batch-size", "12", "--epochs", "1", "--num-workers", "0",
            "--no-progress", "--eval-every", "-1", *more]


@pytest.fixture
def no_fit(monkeypatch):
    """train.py up to the first step: the Trainer is built (weights loaded, backbone_init.pt written); fit returns."""
    seen = {}

    def fit(self, stop_at=None):
        seen["trainer"] = self
        return None

    monkeypatch.setattr(train.Trainer, "fit", fit)
    return seen


def _assert_same(expected, path):
    saved = load_file(str(path))["state_dict"]
    assert set(saved) == set(expected)
    for k, v in expected.items():
        assert torch.equal(saved[k], v), k


@pytest.mark.parametrize("name,emb,published,order", [("iresnet18", 16, ARCFACE_TORCH_R18, "rgb"),
                                                       ("ir_se50", 8, INSIGHTFACE_PYTORCH_IR_SE50, "bgr")])
def test_init_backbone_from_published_layout(tiny_pack, tmp_path, capsys, no_fit, name, emb, published, order):
    state = _random_state(name, emb)
    count, keys = published
    assert len(state) == count and all(k in state for k in keys)  # the file holds the publisher's key names
    path = tmp_path / "published.pth"
    torch.save(state, path)  # a raw state_dict, as both projects save theirs
    assert train.main(_args(tiny_pack, tmp_path / "run", "--init-backbone", str(path), "--save-init")) == 0
    out = capsys.readouterr().out
    init = load_file(str(tmp_path / "run" / "backbone_init.pt"))
    _assert_same(state, tmp_path / "run" / "backbone_init.pt")  # exactly those weights at step 0
    # architecture, width and channel order decided by the file (no --backbone / --embedding-size typed)
    assert (init["backbone"], init["embedding_size"], init["channel_order"]) == (name, emb, order)
    assert hashlib.sha256(path.read_bytes()).hexdigest()[:12] in out
    assert f"{count} tensors loaded" in out and str(path) in out


def test_init_backbone_from_our_files(tiny_pack, tmp_path, capsys, no_fit):
    run = tmp_path / "first"
    assert train.main(_args(tiny_pack, run, "--backbone", "mobilefacenet", "--embedding-size", "16",
                            "--save-init")) == 0
    ours = load_file(str(run / "backbone_init.pt"))["state_dict"]
    # a backbone.pt of ours names its architecture and width: nothing typed, default --backbone differs not
    assert train.main(_args(tiny_pack, tmp_path / "second", "--init-backbone", str(run / "backbone_init.pt"),
                            "--save-init")) == 0
    _assert_same(ours, tmp_path / "second" / "backbone_init.pt")
    assert load_file(str(tmp_path / "second" / "backbone_init.pt"))["embedding_size"] == 16
    script_error(capsys, train.main, _args(tiny_pack, tmp_path / "x", "--init-backbone", str(run / "backbone_init.pt"),
                                           "--input-order", "bgr"), "--input-order bgr", "rgb")


def test_wrong_init_backbone_is_one_line(tiny_pack, tmp_path, capsys):
    path = tmp_path / "r18.pth"
    torch.save(_random_state("iresnet18", 16), path)
    script_error(capsys, train.main, _args(tiny_pack, tmp_path / "a", "--init-backbone", str(path),
                                           "--backbone", "iresnet34"), str(path), "iresnet34", "missing")
    script_error(capsys, train.main, _args(tiny_pack, tmp_path / "b", "--init-backbone", str(path),
                                           "--embedding-size", "32"), str(path), "wrong shape", "fc.weight")
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    script_error(capsys, train.main, _args(tiny_pack, tmp_path / "c", "--init-backbone", str(text)), str(text))
    script_error(capsys, train.main, _args(tiny_pack, tmp_path / "d", "--init-backbone", str(path),
                                           "--resume", str(tmp_path / "a")), "--init-backbone", "--resume")
    script_error(capsys, train.main, _args(tiny_pack, tmp_path / "e", "--freeze-backbone-epochs", "-1"),
                 "--freeze-backbone-epochs")
    script_error(capsys, train.main, _args(tiny_pack, tmp_path / "f", "--backbone-lr-mult", "1000"),
                 "--backbone-lr-mult")


def test_init_head_loads_the_head_only(tiny_pack, tmp_path, capsys, monkeypatch):
    run = tmp_path / "first"
    assert train.main(_args(tiny_pack, run, "--embedding-size", "16", "--batch-size", "36", "--lr", "0.5",
                            "--warmup-epochs", "1")) == 0
    saved = load_training_checkpoint(str(run))
    seen = {}
    monkeypatch.setattr(train.Trainer, "fit", lambda self, stop_at=None: seen.setdefault("t", self) and None)
    assert train.main(_args(tiny_pack, tmp_path / "second", "--embedding-size", "16", "--seed", "7",
                            "--init-head", str(run / "checkpoint.pt"))) == 0
    t = seen["t"]
    assert torch.equal(t.objective.head.weight, saved["head"]["weight"])
    fresh = train.build_backbone(build_config(overrides={"embedding_size": 16}))
    assert not torch.equal(t.model.state_dict()["conv1.conv.weight"], saved["model"]["conv1.conv.weight"])
    assert t.model.state_dict()["conv1.conv.weight"].shape == fresh.state_dict()["conv1.conv.weight"].shape
    # a training checkpoint's model as --init-backbone: its weights, not the seed's
    assert train.main(_args(tiny_pack, tmp_path / "fourth", "--init-backbone", str(run / "checkpoint.pt"),
                            "--save-init")) == 0
    _assert_same(saved["model"], tmp_path / "fourth" / "backbone_init.pt")
    script_error(capsys, train.main, _args(tiny_pack, tmp_path / "third", "--embedding-size", "32",
                                           "--init-head", str(run / "checkpoint.pt")), "--init-head", "16", "32")
    # the lr multiplier lives in the checkpoint's schedule: changing it on resume is refused
    script_error(capsys, train.main, ["--resume", str(run), "--backbone-lr-mult", "0.5", "--no-progress"],
                 "--backbone-lr-mult 0.5", "1")


def _trainer(pack, out, **over):
    cfg = build_config(overrides=dict(dict(batch_size=12, lr=0.1, epochs=3, num_workers=0, progress=False,
                                           log_every=1, seed=5, output=str(out)), **over))
    torch.manual_seed(0)
    ds = build_dataset(pack)
    head = heads.build("cosface", 32, ds.num_classes, s=16.0, m=0.2)
    return Trainer(cfg, SmallNet(32), DenseLoss(head, losses.build("cross_entropy")), ds, torch.device("cpu"))


def _backbone(t):
    return {k: v.clone() for k, v in t.model.state_dict().items()}


def test_frozen_backbone_stays_bit_identical_then_trains_and_resumes(tiny_pack, tmp_path):
    a = _trainer(tiny_pack, tmp_path / "a", freeze_backbone_epochs=2)  # 3 steps per epoch: steps 0..5 frozen
    start = _backbone(a)
    head0 = a.objective.head.weight.detach().clone()
    a.fit(stop_at=6)
    for k, v in _backbone(a).items():  # weights and BatchNorm statistics untouched
        assert torch.equal(v, start[k]), k
    assert not torch.equal(a.objective.head.weight, head0)  # the head trained
    a.fit()
    assert any(not torch.equal(v, start[k]) for k, v in _backbone(a).items())  # trained after the frozen epochs
    b = _trainer(tiny_pack, tmp_path / "b", freeze_backbone_epochs=2)
    b.fit(stop_at=4)  # interrupted inside the frozen epochs
    c = _trainer(tiny_pack, tmp_path / "b", freeze_backbone_epochs=2)
    c.load_state_dict(load_training_checkpoint(str(tmp_path / "b")))
    c.fit(stop_at=6)
    for k, v in _backbone(c).items():  # still frozen until step 6
        assert torch.equal(v, start[k]), k
    c.fit()
    for k, v in _backbone(a).items():  # and the resumed run ends where the uninterrupted one did
        assert torch.equal(v, _backbone(c)[k]), k


def test_backbone_lr_mult_scales_the_backbone_step(tiny_pack, tmp_path):
    wd, lr = 5e-4, 0.1
    t = _trainer(tiny_pack, tmp_path, backbone_lr_mult=0.1, grad_clip=0.0, weight_decay=wd, lr=lr, momentum=0.9)
    before = {id(p): p.detach().double().clone() for p in list(t.model.parameters()) + list(t.objective.parameters())}
    t.fit(stop_at=1)
    for module, group_lr in ((t.model, 0.1 * lr), (t.objective, lr)):
        for p in module.parameters():
            decay = wd if p.ndim > 1 else 0.0
            # SGD's first step: momentum buffer = g + wd * p, p <- p - lr * buffer (float64 by hand)
            step = group_lr * (p.grad.double() + decay * before[id(p)])
            want = before[id(p)] - step
            ulps = 4 * 2.0 ** -23 * (before[id(p)].abs() + step.abs())  # float32 rounding of the two operations
            assert ((p.detach().double() - want).abs() <= ulps + 1e-12).all(), (group_lr, p.shape)
    lrs = sorted({g["lr"] for g in t.optimizer.param_groups})
    assert lrs == pytest.approx([0.1 * t.optimizer.param_groups[0]["lr"], t.optimizer.param_groups[0]["lr"]])
