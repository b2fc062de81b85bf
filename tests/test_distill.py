"""Knowledge distillation: the losses against hand formulas, a frozen teacher that pulls the student,
stays untouched and out of the checkpoint, refuses another teacher on resume, loads foreign weights,
and trains alike in one process and in two DDP ranks."""

import copy
import hashlib
import math
import os

import pytest
import torch

import backbones
import heads
import losses
import train
from backbones.weights import save_backbone
from config import ConfigError, build_config
from data.dataset import build_dataset
from engine import distributed as dist_utils
from engine.checkpoint import load_training_checkpoint, validate_training_checkpoint
from engine.objective import DenseLoss
from engine.teacher import Teacher, file_sha256, load_teacher
from engine.trainer import Trainer
from heads.partial_fc import PartialFC
from losses.distill import build_distill, names
from tests.cli_helpers import script_error
from tests.distributed import run_ranks
from tests.small_nets import NoBNNet, SmallNet
from utils.torchfile import CheckpointError

FAKE_SHA = hashlib.sha256(b"teacher a").hexdigest()


# ---------------------------------------------------------------- the losses


def test_losses_equal_hand_computed_values_in_float64():
    s = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[4.0, 3.0], [0.0, 2.0]], dtype=torch.float64)
    # l2: ||(-1, 1)||^2 = 2, ||(1, -2)||^2 = 5 -> mean 3.5
    l2 = build_distill("l2")(s, t)
    assert l2.dtype == torch.float64 and l2.item() == 3.5
    # cosine: cos = 24/25 and 0 -> 1 - cos = 0.04 and 1 -> mean 0.52
    cos = build_distill("cosine")(s, t)
    assert cos.dtype == torch.float64 and abs(cos.item() - 0.52) < 1e-15
    assert set(names()) >= {"l2", "cosine"}


def test_half_precision_inputs_give_a_float32_loss_and_shapes_must_agree():
    s, t = torch.randn(4, 8).bfloat16(), torch.randn(4, 8)
    assert build_distill("cosine")(s, t).dtype == torch.float32
    with pytest.raises(ValueError, match=r"student \(4, 8\), teacher \(4, 16\)"):
        build_distill("l2")(torch.randn(4, 8), torch.randn(4, 16))


def test_unknown_distill_loss_is_one_line_config_error():
    with pytest.raises(ConfigError, match="distill-loss"):
        build_config(overrides={"distill_loss": "kl"})
    with pytest.raises(ConfigError, match="distill-weight"):
        build_config(overrides={"distill_weight": -1})


# ---------------------------------------------------------------- training with a teacher


def _trainer(pack, out, teacher_model=None, student=None, partial_fc=False, sha=FAKE_SHA, **over):
    cfg = build_config(overrides=dict(dict(batch_size=12, lr=0.1, epochs=3, num_workers=0, progress=False,
                                           log_every=1, seed=5, eval_every=-1, output=str(out)), **over))
    torch.manual_seed(0)
    ds = build_dataset(pack)
    head = heads.build("cosface", 32, ds.num_classes, s=16.0, m=0.2)
    criterion = losses.build("cross_entropy")
    objective = PartialFC(head, criterion, seed=cfg.seed) if partial_fc else DenseLoss(head, criterion)
    teacher = None if teacher_model is None else Teacher(teacher_model, str(out) + "/teacher.pt", sha, "smallnet")
    return Trainer(cfg, student if student is not None else SmallNet(32), objective, ds, torch.device("cpu"),
                   teacher=teacher)


def _fixed_teacher(seed=123):
    torch.manual_seed(seed)
    net = SmallNet(32)
    with torch.no_grad():  # BatchNorm running statistics away from (0, 1), so eval mode matters
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    return net


@pytest.mark.parametrize("partial_fc", [False, True], ids=["dense", "partial_fc"])
def test_student_moves_toward_a_fixed_teacher_which_stays_frozen(tiny_pack, tmp_path, partial_fc):
    teacher = _fixed_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    tr = _trainer(tiny_pack, tmp_path, teacher, partial_fc=partial_fc, margin_loss_weight=0.0, lr=0.5, epochs=4)
    tr.fit()
    d = tr.history["distill"]
    assert len(d) == 12 and sum(d[-3:]) / 3 < 0.5 * d[0], d
    assert tr.history["loss"] == pytest.approx(d, abs=1e-6)  # margin weight 0: the loss is the term
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and BatchNorm statistics untouched
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not any(id(p) in teacher_ids for g in tr.optimizer.param_groups for p in g["params"])
    state = load_training_checkpoint(str(tmp_path))
    assert state["teacher"] == {"path": os.path.abspath(str(tmp_path) + "/teacher.pt"), "sha256": FAKE_SHA}
    assert state["model"].keys() == tr.model.state_dict().keys()
    fc = teacher.fc.weight
    assert not any(t.shape == fc.shape and torch.equal(t, fc) for t in _tensors(state))  # no copy anywhere in it
    with open(tmp_path / "train.log", encoding="utf-8") as fh:
        assert " distill " in fh.read()


def _tensors(obj):
    """Every tensor inside nested dicts / lists."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


@pytest.mark.parametrize("loss", ["l2", "cosine"])
def test_a_copy_of_the_teacher_as_student_with_distill_weight_only_gives_loss_zero(tiny_pack, tmp_path, loss):
    """NoBNNet has no batch statistics, so the training-mode student computes what the eval-mode teacher does."""
    torch.manual_seed(7)
    teacher = NoBNNet(32)
    tr = _trainer(tiny_pack, tmp_path, teacher, student=copy.deepcopy(teacher), margin_loss_weight=0.0,
                  distill_loss=loss, max_steps=1)
    micro = next(iter(tr.feeder.steps()))
    total = tr.train_step(micro)
    assert abs(float(total)) <= 1e-7 and abs(float(tr.distill_term)) <= 1e-7
    tr.feeder.close()
    # the same step with the margin loss switched on is not 0: the zero above is the distillation's
    tr2 = _trainer(tiny_pack, tmp_path / "b", teacher, student=copy.deepcopy(teacher), distill_loss=loss, max_steps=1)
    assert float(tr2.train_step(next(iter(tr2.feeder.steps())))) > 0.1
    tr2.feeder.close()


def test_teacher_embeds_under_the_students_autocast_in_float32():
    torch.manual_seed(0)
    net = SmallNet(32)
    t = Teacher(net)
    x = torch.randn(3, 3, 112, 112)
    emb = t.embed(x, torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = net.eval()(x).float()
    assert emb.dtype == torch.float32 and not emb.requires_grad
    assert torch.equal(emb, want)
    assert not torch.equal(emb, t.embed(x))  # without autocast: full float32, a different result


def test_with_amp_the_trainer_runs_the_teacher_under_the_students_autocast(tiny_pack, tmp_path):
    tr = _trainer(tiny_pack, tmp_path, _fixed_teacher(), amp=True, max_steps=1)
    assert tr.amp_dtype == torch.bfloat16 and tr.distill.amp_dtype is tr.amp_dtype  # CPU: bf16
    tr.train_step(next(iter(tr.feeder.steps())))
    assert tr.last_bad is None and tr.distill_term.dtype == torch.float32 and 0 < float(tr.distill_term) < 2
    tr.feeder.close()


def test_resume_refuses_another_teacher_in_one_line(tiny_pack, tmp_path):
    teacher = _fixed_teacher()
    a = _trainer(tiny_pack, tmp_path, teacher, max_steps=4)
    a.fit(stop_at=2)
    state = load_training_checkpoint(str(tmp_path))
    other = _trainer(tiny_pack, tmp_path, teacher, sha=hashlib.sha256(b"teacher b").hexdigest(), max_steps=4)
    with pytest.raises(ConfigError, match="is not the teacher") as e:
        other.load_state_dict(state)
    assert len(str(e.value).splitlines()) == 1
    none = _trainer(tiny_pack, tmp_path, None, max_steps=4)
    with pytest.raises(ConfigError, match="distilled from teacher"):
        none.load_state_dict(state)
    same = _trainer(tiny_pack, tmp_path, teacher, max_steps=4)
    same.load_state_dict(state)
    assert same.step == 2
    for tr in (other, none, same, a):
        tr.feeder.close()


def test_checkpoint_with_a_malformed_teacher_field_is_refused(tiny_pack, tmp_path):
    tr = _trainer(tiny_pack, tmp_path, _fixed_teacher(), max_steps=1)
    tr.fit()
    state = dict(load_training_checkpoint(str(tmp_path)), teacher={"path": "t.pt", "sha256": "xyz"})
    with pytest.raises(CheckpointError, match="field 'teacher'"):
        validate_training_checkpoint(state, "c.pt")


# ---------------------------------------------------------------- loading the teacher file


def _cfg(tmp_path, **over):
    return build_config(overrides=dict(dict(output=str(tmp_path / "run")), **over))


def test_a_foreign_layout_teacher_loads_with_teacher_backbone(tmp_path):
    """arcface_torch's MobileFaceNet layout ('mbf'), saved as a DDP-prefixed raw state_dict under 'state_dict'."""
    torch.manual_seed(0)
    ref = backbones.build("mbf", embedding_size=128).eval()
    path = tmp_path / "foreign.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, path)
    t = load_teacher(_cfg(tmp_path, teacher=str(path), teacher_backbone="mbf", teacher_embedding_size=128,
                          embedding_size=128))
    assert t.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(str(path))
    assert t.embedding_size == 128 and t.channel_order == "rgb" and not t.model.training
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(t.embed(x), ref(x))
    with pytest.raises(ConfigError, match="--teacher-backbone NAME"):  # foreign weights need the architecture
        load_teacher(_cfg(tmp_path, teacher=str(path), embedding_size=128))
    with pytest.raises(ConfigError, match="128-d embeddings but the student's --embedding-size is 512"):
        load_teacher(_cfg(tmp_path, teacher=str(path), teacher_backbone="mbf", teacher_embedding_size=128))


def test_our_bgr_backbone_file_loads_as_teacher_and_non_finite_weights_are_refused(tmp_path):
    torch.manual_seed(0)
    ref = backbones.build("mobilefacenet", embedding_size=64, channel_order="bgr").eval()
    path = tmp_path / "backbone.pt"
    save_backbone(str(path), ref.state_dict(), "mobilefacenet", 64, "bgr")
    t = load_teacher(_cfg(tmp_path, teacher=str(path), embedding_size=64))
    assert (t.name, t.channel_order, t.embedding_size) == ("mobilefacenet", "bgr", 64)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(t.embed(x), ref(x))  # the model flips RGB to BGR itself, as when it was trained
    sd = ref.state_dict()
    first = next(k for k, v in sd.items() if v.is_floating_point())
    sd[first] = sd[first].clone().fill_(math.nan)
    save_backbone(str(tmp_path / "nan.pt"), sd, "mobilefacenet", 64, "bgr")
    with pytest.raises(ConfigError, match="--teacher: .*nan.pt"):
        load_teacher(_cfg(tmp_path, teacher=str(tmp_path / "nan.pt"), embedding_size=64))


def test_train_cli_distils_and_refuses_a_resume_with_another_teacher(tiny_pack, tmp_path, capsys):
    torch.manual_seed(0)
    ref = backbones.build("mobilefacenet", embedding_size=32)
    teacher_a, teacher_b = tmp_path / "a.pt", tmp_path / "b.pt"
    save_backbone(str(teacher_a), ref.state_dict(), "mobilefacenet", 32, "rgb")
    save_backbone(str(teacher_b), backbones.build("mobilefacenet", embedding_size=32).state_dict(),
                  "mobilefacenet", 32, "rgb")
    out = tmp_path / "run"
    common = ["--data", tiny_pack, "--backbone", "mobilefacenet", "--embedding-size", "32", "--batch-size", "12",
              "--num-workers", "0", "--no-progress", "--eval-every", "-1", "--log-every", "1"]
    assert train.main(common + ["--output", str(out), "--max-steps", "2", "--teacher", str(teacher_a),
                                "--distill-loss", "l2", "--distill-weight", "0.5"]) == 0
    log = (out / "train.log").read_text()
    assert "teacher: " in log and "0.5 x l2 distillation" in log and " distill " in log
    capsys.readouterr()
    err = script_error(capsys, train.main, common + ["--resume", str(out), "--max-steps", "3",
                                                     "--teacher", str(teacher_b)], "is not the teacher")
    assert "b.pt" in err
    script_error(capsys, train.main, common + ["--output", str(tmp_path / "x"), "--teacher", str(teacher_a),
                                               "--embedding-size", "64"], "--embedding-size 32")
    assert not os.path.exists(tmp_path / "x")  # refused before the run folder was written
    script_error(capsys, train.main, common + ["--output", str(tmp_path / "y"), "--margin-loss-weight", "0"],
                 "--margin-loss-weight 0")


# ---------------------------------------------------------------- DDP


def _ddp_distil(rank, world_size, pack, out, batch, partial_fc):
    info, _ = dist_utils.init("cpu", 2.0)
    assert info.world_size == world_size
    return _one_run(pack, out, batch, partial_fc)


def _one_run(pack, out, batch, partial_fc):
    cfg = build_config(overrides=dict(batch_size=batch, lr=0.2, epochs=4, num_workers=0, progress=False, log_every=1,
                                      seed=3, eval_every=-1, save_every=-1, grad_clip=0.0, channels_last=False,
                                      max_steps=3, distill_loss="cosine", distill_weight=2.0, output=str(out)))
    info, device = dist_utils.init("cpu", 2.0)
    torch.manual_seed(11)
    teacher = Teacher(NoBNNet(32), "t.pt", FAKE_SHA)
    torch.manual_seed(0)
    ds = build_dataset(pack)
    model = NoBNNet(32)
    head = heads.build("arcface", 32, ds.num_classes, s=16.0, m=0.3)
    criterion = losses.build("cross_entropy")
    objective = (PartialFC(head, criterion, rank=info.rank, world_size=info.world_size, seed=cfg.seed)
                 if partial_fc else DenseLoss(head, criterion))
    tr = Trainer(cfg, model, objective, ds, device, dist_info=info, teacher=teacher)
    tr.fit()
    return {k: v.detach().clone() for k, v in tr.model.state_dict().items()}, tr.history.get("distill", [])


@pytest.mark.parametrize("partial_fc", [False, True], ids=["dense", "partial_fc"])
def test_two_ddp_ranks_with_a_teacher_equal_one_process_with_twice_the_batch(tiny_pack, tmp_path, partial_fc):
    (w2, d2), _ = run_ranks(_ddp_distil, 2, tiny_pack, str(tmp_path / "ddp"), 6, partial_fc, init_group=False)
    w1, d1 = _one_run(tiny_pack, str(tmp_path / "one"), 12, partial_fc)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(d2), torch.tensor(d1), atol=1e-5, rtol=1e-5)
    assert d1[-1] != d1[0]
