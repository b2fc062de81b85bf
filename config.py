"""The one place where defaults live.

`Config` holds every setting of training and evaluation. Presets are named
overrides of it; `--config FILE` (YAML or Python) overrides a preset; command
line flags, generated from the fields so `--help` never drifts, override both.
Precedence: defaults < preset < config file < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import runpy
import traceback
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Sequence

import backbones
import heads
import losses
from losses import distill as distill_losses
from utils.atomic import write_text
from utils.errors import UserError
from utils.files import UnreadableFileError, check_regular, read_regular


class ConfigError(UserError, ValueError):
    """A bad key or value in a config file or on the command line (one line)."""


# The largest --embedding-size accepted: refused before any layer of that width is allocated.
MAX_EMBEDDING_SIZE = 65536
# A config file is a few hundred bytes of text; anything past this is not one (refused unread).
MAX_CONFIG_BYTES = 1 << 20


@dataclass
class Config:
    """Every setting, with its default. Help texts are the field metadata.

    The allowed range of a number is its metadata too, checked by `check_range` wherever a value
    enters (flags, presets, config files, a resumed run's config): "min"/"max" are inclusive
    bounds, "gt"/"lt" exclusive ones; every int and float must be finite; a tuple's elements are
    checked one by one; "nonempty" strings may not be blank. "choices" is a tuple of valid values
    or a registry's `names` function (backbones, heads, losses: the registry is the one list, matched
    without regard to case as the registry does); "default_text" words a default that its value
    (None, "") does not say.
    """

    # --- data -------------------------------------------------------------
    data: str = field(default="datasets/synth", metadata={"nonempty": True, "help": (
        "training data: a pack folder (train.rec/.idx + .bin targets), a .rec file, "
        "an image folder root/<class>/*.jpg, or several joined by commas")})
    eval_data: str = field(default="", metadata={"help": (
        "folder holding the verification .bin files"), "default_text": "the first --data folder"})
    targets: str = field(default="", metadata={"help": (
        "comma-separated verification targets (e.g. lfw,cfp_fp); empty = every .bin found")})
    output: str = field(default="runs/default", metadata={"nonempty": True, "help": "run directory"})
    num_workers: int = field(default=2, metadata={"min": 0, "max": 256, "help": "DataLoader worker processes"})
    max_bad_fraction: float = field(default=0.01, metadata={"min": 0.0, "max": 1.0, "help": (
        "stop with an error naming the first bad images when more than this share of the images seen "
        "so far is undecodable (judged once 20/fraction images have been read: 2000 at 0.01, at least 200, "
        "at most one epoch; a whole undecodable epoch always stops)")})
    decode_on_device: bool = field(default=False, metadata={"help": (
        "workers only read bytes; JPEGs are decoded in batches where the model runs "
        "(TorchCodec's decode_jpeg, else torchvision's: nvJPEG on CUDA), for when the CPU cannot feed the GPU")})
    # --- mixed data: per-source sampling weights (data/mixing.py) ---
    data_weights: typing.Tuple[float, ...] = field(default=(), metadata={"gt": 0.0, "help": (
        "sampling weight of each --data source, comma-separated in --data's order (normalised to sum 1): "
        "each image comes from source k with probability w_k whatever the sizes (small sources repeat, "
        "large ones are subsampled); an epoch stays the total size of the sources"),
        "default_text": "none: sources in proportion to their sizes"})

    # --- model ------------------------------------------------------------
    backbone: str = field(default="mobilefacenet", metadata={
        "help": "backbone name (table: --list-backbones)", "choices": backbones.names})
    embedding_size: int = field(default=512, metadata={
        "min": 1, "max": MAX_EMBEDDING_SIZE, "help": "embedding dimension"})
    dropout: float = field(default=0.0, metadata={"min": 0.0, "lt": 1.0, "help": "dropout before the embedding layer"})
    input_order: str = field(default="rgb", metadata={
        "help": "channel order the backbone sees", "choices": ("rgb", "bgr")})
    head: str = field(default="arcface", metadata={"help": "margin head name", "choices": heads.names})
    scale: float | None = field(default=None, metadata={
        "gt": 0.0, "help": "head scale s", "default_text": "the head's own"})
    margin: float | None = field(default=None, metadata={
        "finite": True, "help": "head margin m", "default_text": "the head's own"})
    head_kwargs: Dict[str, Any] = field(default_factory=dict, metadata={
        "help": "extra head parameters as JSON, e.g. '{\"easy_margin\": true}'"})
    loss: str = field(default="cross_entropy", metadata={"help": "loss name", "choices": losses.names})
    focal_gamma: float = field(default=2.0, metadata={"min": 0.0, "help": "gamma of the focal loss"})
    label_smoothing: float = field(default=0.0, metadata={
        "min": 0.0, "lt": 1.0, "help": "label smoothing of cross-entropy"})

    # --- fine-tuning ------------------------------------------------------
    init_backbone: str = field(default="", metadata={"help": (
        "start from these backbone weights: our backbone.pt / checkpoint.pt, or a foreign state_dict "
        "(arcface_torch backbone.pth, InsightFace_Pytorch model_ir_se50.pth); the keys decide the layout, "
        "untyped --backbone/--embedding-size/--input-order come from the file (see engine/finetune.py); "
        "not with --resume PATH"), "default_text": "random weights from --seed"})
    init_head: str = field(default="", metadata={"help": (
        "load the margin head (only) from this training checkpoint.pt of ours (same classes and embedding "
        "size)"), "default_text": "a fresh head"})
    freeze_backbone_epochs: int = field(default=0, metadata={"min": 0, "help": (
        "epochs at the start during which the backbone is frozen: no gradient, no weight decay, BatchNorm "
        "statistics and dropout in eval mode; only the head trains")})
    backbone_lr_mult: float = field(default=1.0, metadata={"min": 0.0, "max": 100.0, "help": (
        "the backbone's learning rate is lr x this (the head keeps lr); same schedule and weight decay rules")})

    # --- knowledge distillation (engine/teacher.py, losses/distill.py) ----
    teacher: str = field(default="", metadata={"help": (
        "distil from this frozen teacher: any weights evaluate.py loads (our backbone.pt / checkpoint.pt, or a "
        "foreign state_dict with --teacher-backbone); its embeddings must be --embedding-size wide"),
        "default_text": "no teacher"})
    teacher_backbone: str = field(default="", metadata={"help": (
        "the teacher's architecture (needed for foreign weights; overrides what our files say)"),
        "default_text": "what the --teacher file says"})
    teacher_embedding_size: int = field(default=512, metadata={"min": 1, "max": MAX_EMBEDDING_SIZE, "help": (
        "the teacher's embedding width when its file is foreign weights (our files say it)")})
    teacher_input_order: str = field(default="", metadata={"help": (
        "channel order the teacher's weights expect: rgb or bgr (it is fed the student's batch and flips it "
        "itself)"), "default_text": "what the --teacher file says (rgb for foreign weights)"})
    distill_loss: str = field(default="cosine", metadata={"help": (
        "feature distillation on the embeddings: cosine = mean(1 - cos(s, t)); l2 = mean ||s - t||^2 on the raw "
        "embeddings (scale follows the teacher's norms)"), "choices": distill_losses.names})
    distill_weight: float = field(default=1.0, metadata={"min": 0.0, "max": 1e4, "help": (
        "with --teacher: loss = margin_loss_weight x margin loss + distill_weight x distillation loss")})
    margin_loss_weight: float = field(default=1.0, metadata={"min": 0.0, "max": 1e4, "help": (
        "weight of the margin (classification) loss; 0 with --teacher = pure feature distillation")})

    # --- optimisation -----------------------------------------------------
    epochs: int = field(default=20, metadata={"min": 1, "help": "training epochs"})
    max_steps: int = field(default=0, metadata={
        "min": 0, "help": "stop after this many optimizer steps (0 = no limit)"})
    batch_size: int = field(default=128, metadata={"min": 1, "help": (
        "images per micro-step PER PROCESS; the global batch is batch_size x processes x grad_accum")})
    grad_accum: int = field(default=1, metadata={"min": 1, "help": (
        "micro-steps accumulated per optimizer step (loss divided by K; lr schedule and step counts are in "
        "optimizer steps; DDP syncs gradients on the last micro-step only)")})
    lr: float = field(default=0.1, metadata={"gt": 0.0, "help": "peak learning rate"})
    momentum: float = field(default=0.9, metadata={"min": 0.0, "lt": 1.0, "help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={
        "min": 0.0, "help": "weight decay (not applied to BN and biases)"})
    scheduler: str = field(default="cosine", metadata={
        "help": "lr schedule after warmup: a name registered in engine/schedule.py"})
    milestones: typing.Tuple[float, ...] = field(default=(), metadata={"min": 0.0,
        "help": "epochs at which the step schedule multiplies lr by --lr-gamma, e.g. 10,18,22"})
    lr_gamma: float = field(default=0.1, metadata={"gt": 0.0, "max": 1.0, "help": "step schedule factor"})
    poly_power: float = field(default=2.0, metadata={"gt": 0.0, "help": "polynomial schedule power"})
    warmup_epochs: float = field(default=0.0, metadata={"min": 0.0, "help": "linear warmup length in epochs"})
    grad_clip: float = field(default=5.0, metadata={"min": 0.0, "help": "clip gradient norm to this (0 = off)"})
    amp: bool = field(default=False, metadata={
        "help": "mixed precision for the backbone (dtype: --amp-dtype); the margin head stays fp32"})
    amp_dtype: str = field(default="auto", metadata={
        "help": "--amp precision: auto (bf16 where the device computes it natively: CPUs, A100/H100; "
                "else fp16 + GradScaler), bf16, fp16 (CUDA only)", "choices": ("auto", "bf16", "fp16")})
    channels_last: bool = field(default=True, metadata={
        "help": "channels_last memory format for the backbone (faster convolutions on CPU and GPU)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the backbone (minutes of warm-up)"})
    seed: int = field(default=0, metadata={"min": 0, "max": 2**32 - 1, "help": "random seed"})
    device: str = field(default="auto", metadata={"help": (
        "auto, cpu, cuda or cuda:N; under torchrun each process takes cuda:LOCAL_RANK")})

    # --- optimizers, lr multipliers, EMA (issue 16; engine/optim.py, engine/ema.py) ---
    optimizer: str = field(default="sgd", metadata={"help": (
        "sgd (momentum --momentum, L2 weight decay) or adamw (--betas, --eps, decoupled weight decay; no decay "
        "on biases, norms, pos_embed, cls_token, mask_token): a name registered in engine/optim.py"),
        "choices": ("sgd", "adamw")})
    betas: typing.Tuple[float, ...] = field(default=(0.9, 0.999), metadata={"min": 0.0, "lt": 1.0,
        "help": "AdamW beta1,beta2"})
    eps: float = field(default=1e-8, metadata={"gt": 0.0, "max": 1.0, "help": "AdamW epsilon"})
    head_lr_mult: float = field(default=1.0, metadata={"min": 0.0, "max": 100.0, "help": (
        "the margin head's learning rate is lr x this; same schedule (see --backbone-lr-mult)")})
    layer_decay: float = field(default=1.0, metadata={"gt": 0.0, "max": 1.0, "help": (
        "ViT layer-wise lr decay d: block i of L trains at lr x d^(L-i), the patch embedding at d^(L+1), "
        "layers after the blocks and the head at lr (1 = off; needs a backbone with blocks.<i>. parameters)")})
    ema_decay: float = field(default=0.0, metadata={"min": 0.0, "lt": 1.0, "help": (
        "exponential moving average of the backbone weights, updated after each optimizer step with this decay "
        "(e.g. 0.999; 0 = off): in the checkpoint, saved as backbone_ema.pt and evaluated beside the live weights")})

    # --- scale ------------------------------------------------------------
    partial_fc: bool = field(default=False, metadata={"help": (
        "Partial FC: class centres sharded across processes, softmax computed across shards "
        "(for 100k+ identities; works in one process too)")})
    sample_rate: float = field(default=1.0, metadata={"gt": 0.0, "max": 1.0, "help": (
        "Partial FC: fraction of each shard's classes in the softmax per step, positives always kept "
        "(0 < R <= 1; 1 = the full softmax)")})
    data_parallel: bool = field(default=True, metadata={"help": (
        "without torchrun, use every visible GPU in one process (torch.nn.DataParallel); torchrun is faster")})
    dist_timeout: float = field(default=120.0, metadata={"gt": 0.0, "max": 10**7, "help": (
        "minutes a process waits for the others (e.g. while rank 0 evaluates or saves) before failing")})

    # --- evaluation, logging, checkpoints ---------------------------------
    eval_every: int = field(default=0, metadata={"min": -1,
        "help": "verify every N steps (0 = at the end of each epoch and of training, -1 = never)"})
    eval_batch_size: int = field(default=256, metadata={"min": 1, "help": "batch size of embedding extraction"})
    tta: str = field(default="sum", metadata={
        "help": "flip test-time augmentation", "choices": ("sum", "concat", "none")})
    log_every: int = field(default=20, metadata={"min": 1, "help": "log scalars every N steps"})
    save_every: int = field(default=0, metadata={"min": -1,
        "help": "write checkpoint.pt every N steps (0 = each epoch, -1 = only at the end)"})
    resume: str = field(default="", metadata={"help": (
        "run directory or checkpoint.pt to resume from; 'auto' = the --output run if it has a checkpoint, "
        "else start fresh (for torchrun --max-restarts and requeued jobs)")})
    keep: int = field(default=1, metadata={"min": 1, "help": (
        "training checkpoints kept: 1 = checkpoint.pt alone; K > 1 = the K newest also as checkpoint-<step>.pt "
        "(checkpoint.pt is a hard link to the newest: no extra space)")})
    overwrite: bool = field(default=False, metadata={"help": (
        "allow --output to name a folder that already holds a run (its files are replaced, its numbered "
        "checkpoints removed); "
        "without it, such a folder needs --resume")})
    max_bad_steps: int = field(default=5, metadata={"min": 1, "help": (
        "optimizer steps in a row with a NaN/inf loss or gradient (each skipped, weights untouched) "
        "before training stops; the last good checkpoint is kept")})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    save_init: bool = field(default=False, metadata={
        "help": "also write backbone_init.pt (the untrained weights), to compare against"})


# Named overrides of the defaults. The seeds' recipes (see README, "Presets").
PRESETS: Dict[str, Dict[str, Any]] = {
    # `make demo`: MobileFaceNet + ArcFace (s=32 converges in far fewer CPU steps than 64),
    # verification only afterwards by evaluate.py (it prints untrained vs trained).
    "demo": dict(backbone="mobilefacenet", head="arcface", scale=32.0, margin=0.5, epochs=5, batch_size=64,
                 lr=0.1, warmup_epochs=0.5, scheduler="cosine", weight_decay=5e-4, eval_every=-1,
                 num_workers=1, eval_batch_size=64),
    # InsightFace_Pytorch (TreB1eN) config.py: IR-SE50, drop 0.6, batch 100, lr 1e-3, milestones [4,6,7],
    # wd 5e-4 except BN; its train.py default is 20 epochs; BGR input.
    "insightface_pytorch_ir_se50": dict(backbone="ir_se50", head="arcface", scale=64.0, margin=0.5,
                                        input_order="bgr", dropout=0.6, lr=1e-3, batch_size=100, epochs=20,
                                        scheduler="step", milestones=(4, 6, 7), weight_decay=5e-4),
    # Face_Pytorch (wujiyang) train.py defaults: ArcFace s=32, batch 256, SGD lr 0.1 (theirs is Nesterov),
    # wd 5e-4, steps at epochs 12/20/26, 50 epochs; images read with OpenCV (BGR).
    "face_pytorch": dict(backbone="mobilefacenet", head="arcface", scale=32.0, margin=0.5,
                         input_order="bgr", lr=0.1, batch_size=256, epochs=50,
                         scheduler="step", milestones=(12, 20, 26), weight_decay=5e-4),
    # Pytorch_Face_Recognition README, MS-Celeb-1M: batch 256, lr 0.05, 25 epochs, steps at 13 and 21, S=32.
    "pytorch_face_recognition": dict(backbone="mobilefacenet", head="arcface", scale=32.0, margin=0.5,
                                     input_order="bgr", lr=0.05, batch_size=256, epochs=25,
                                     scheduler="step", milestones=(13, 21), weight_decay=5e-4),
    # Insightface_EfficientNet README: EfficientNet-B0, batch 80, ArcFace (s=64, m=0.5) + focal gamma 2, 50 epochs.
    "efficientnet_seed": dict(backbone="efficientnet_b0", head="arcface", scale=64.0, margin=0.5,
                              loss="focal", focal_gamma=2.0, batch_size=80, lr=0.1, epochs=50,
                              scheduler="step", milestones=(20, 35, 45)),
    "arcface_torch_ms1mv3_r50": dict(backbone="iresnet50", head="arcface", scale=64.0, margin=0.5,
                                     lr=0.1, weight_decay=5e-4, batch_size=128, epochs=20,
                                     scheduler="poly", poly_power=2.0, warmup_epochs=0, amp=True),
    # --- ViT + AdamW recipes (issue 16) ---
    # arcface_torch configs/wf42m_pfc03_40epoch_8gpu_vit_t.py over base.py and train_v2.py: margin_list
    # (1.0, 0.0, 0.4) = CosFace m=0.4 at their fixed s=64; network vit_t_dp005_mask0; AdamW lr 1e-3, wd 0.1
    # (their torch defaults: betas 0.9,0.999, eps 1e-8); batch 512 per GPU (x 8 GPUs); Partial FC rate 0.3;
    # 40 epochs, warmup num_epoch // 10 = 4 under PolyScheduler (power 2); fp16; clip norm 5; seed 2048.
    "arcface_torch_wf42m_vit_t": dict(backbone="vit_t_dp005_mask0", head="cosface", scale=64.0, margin=0.4,
                                      embedding_size=512, optimizer="adamw", lr=1e-3, weight_decay=0.1,
                                      betas=(0.9, 0.999), eps=1e-8, batch_size=512, partial_fc=True,
                                      sample_rate=0.3, epochs=40, warmup_epochs=4, scheduler="poly",
                                      poly_power=2.0, amp=True, grad_clip=5.0, seed=2048),
    # ..._vit_b.py: the same but network vit_b_dp005_mask_005, batch 256 per GPU with gradient_acc 12.
    "arcface_torch_wf42m_vit_b": dict(backbone="vit_b_dp005_mask_005", head="cosface", scale=64.0, margin=0.4,
                                      embedding_size=512, optimizer="adamw", lr=1e-3, weight_decay=0.1,
                                      betas=(0.9, 0.999), eps=1e-8, batch_size=256, grad_accum=12,
                                      partial_fc=True, sample_rate=0.3, epochs=40, warmup_epochs=4,
                                      scheduler="poly", poly_power=2.0, amp=True, grad_clip=5.0, seed=2048),
    # CPU demo on the synthetic set (`make demo` scale): the AdamW recipe on vit_mini (the vit_t recipe at
    # 128 wide, 4 blocks) with an EMA of the weights.
    "vit_demo": dict(backbone="vit_mini", head="cosface", scale=32.0, margin=0.4, optimizer="adamw", lr=1e-3,
                     weight_decay=0.05, epochs=5, batch_size=64, warmup_epochs=1, scheduler="cosine",
                     ema_decay=0.99, eval_every=-1, num_workers=1, eval_batch_size=64),
}

_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _closest(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _field_type(name: str) -> Any:
    hints = typing.get_type_hints(Config)
    return hints[name]


def describe(name: str) -> str:
    """How a field is named in errors: the flag and the config key, e.g. "--lr (config key 'lr')"."""
    return f"{flag_name(name)} (config key {name!r})"


def range_text(name: str) -> str:
    """The allowed values of a numeric field in words, e.g. "in [0, 1)" or ">= 1"; "" when unbounded."""
    meta = _FIELDS[name].metadata
    lo, lo_open = (meta["gt"], True) if "gt" in meta else (meta.get("min"), False)
    hi, hi_open = (meta["lt"], True) if "lt" in meta else (meta.get("max"), False)
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_num(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {_num(hi)}"
    return ""


def choices_of(name: str) -> tuple[str, ...]:
    """The valid values of field `name` (read from its registry where it has one); () = any value."""
    choices = _FIELDS[name].metadata.get("choices", ())
    return tuple(choices() if callable(choices) else choices)


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def check_range(name: str, value: Any, flag: str = "") -> None:
    """Raise a one-line ConfigError unless `value` (already of the field's type) is allowed for field `name`.

    `flag` names the value in the error instead of the field's own flag (evaluate.py's --batch-size
    is checked against eval_batch_size's range).
    """
    meta = _FIELDS[name].metadata
    where = flag or describe(name)
    if isinstance(value, str):
        if meta.get("nonempty") and not value.strip():
            raise ConfigError(f"{where} may not be empty")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, tuple)):
        return
    rule = range_text(name)
    kind = "an integer" if isinstance(value, int) or _field_type(name) is int else "a finite number"
    for v in value if isinstance(value, tuple) else (value,):
        ok = math.isfinite(v)
        if ok and "gt" in meta:
            ok = v > meta["gt"]
        elif ok and "min" in meta:
            ok = v >= meta["min"]
        if ok and "lt" in meta:
            ok = v < meta["lt"]
        elif ok and "max" in meta:
            ok = v <= meta["max"]
        if not ok:
            each = "each value " if isinstance(value, tuple) else ""
            raise ConfigError(f"bad value {v!r} for {where}: {each}must be {kind}{' ' + rule if rule else ''}")


def check_config(cfg: Config) -> Config:
    """Check every field of `cfg` against its range (see `check_range`); return `cfg`."""
    for name in _FIELDS:
        check_range(name, getattr(cfg, name))
    return cfg


def coerce(name: str, value: Any) -> Any:
    """Convert `value` (from YAML, Python or a flag string) to field `name`'s type.

    Raises ConfigError naming the field, the bad value and what was expected.
    """
    if not isinstance(name, str):
        raise ConfigError(f"config key {name!r} is not a name (keys are field names such as 'lr')")
    if name not in _FIELDS:
        raise ConfigError(f"unknown config key {name!r}{_closest(name, list(_FIELDS))}")
    tp = _field_type(name)
    args = typing.get_args(tp)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), tp) if optional else tp
    try:
        if value is None or (optional and isinstance(value, str) and value.lower() in ("", "none", "null")):
            if optional:
                return None
            raise ValueError("may not be empty")
        origin = typing.get_origin(base)
        if base is bool:
            if isinstance(value, bool):
                out: Any = value
            elif isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                out = True
            elif isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                out = False
            else:
                raise ValueError("expected true or false")
        elif base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            out = int(value)
        elif base is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            out = float(value)
        elif base is str:
            if not isinstance(value, str):
                raise ValueError("expected a string")
            out = value
        elif origin in (tuple, typing.Tuple):
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            out = tuple(float(v) for v in value)
        elif origin in (dict, typing.Dict):
            if isinstance(value, str):
                value = json.loads(value) if value.strip() else {}
            if not isinstance(value, Mapping):
                raise ValueError("expected a mapping")
            out = dict(value)
        else:  # pragma: no cover - every field type is handled above
            out = value
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"bad value {value!r} for {describe(name)}: {exc}") from None
    choices = choices_of(name)
    registry = callable(_FIELDS[name].metadata.get("choices"))  # registries match names without regard to case
    if choices and (str(out).lower() not in {c.lower() for c in choices} if registry else out not in choices):
        raise ConfigError(f"bad value {out!r} for {describe(name)}{_closest(str(out), choices)} "
                          f"(valid: {', '.join(choices)})")
    if out is not None:
        check_range(name, out)
    return out


def apply_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """Return a copy of `cfg` with validated `overrides` applied."""
    clean = {k: coerce(k, v) for k, v in overrides.items()}
    return dataclasses.replace(cfg, **clean)


def load_config_file(path: str) -> Dict[str, Any]:
    """Read overrides from YAML (`.yaml`/`.yml`/`.json`) or Python (`.py`).

    A Python file either defines `config` (a dict or an object with attributes)
    or plain module-level names; it is the user's own file and is executed (so it
    runs with the user's rights: use only config files you trust). Whatever is wrong
    with the file (not text, bad syntax, an exception while it runs, not a mapping)
    is one ConfigError naming the file and, where known, the line.
    """

    try:
        check_regular(path, "config file", MAX_CONFIG_BYTES)
        raw = b"" if path.endswith(".py") else read_regular(path, "config file", MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except (UnreadableFileError, OSError) as exc:  # a folder, a FIFO, too large, unreadable: one ConfigError
        raise ConfigError(f"config file {path!r}: {exc}") from None
    data = _python_config(path) if path.endswith(".py") else _yaml_config(path, raw)
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path!r} holds {type(data).__name__} {_short(data)}, "
                          f"not a mapping of config keys (key: value lines)")
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"config file {path!r}: key {key!r} is not a name (keys are field names such as 'lr')")
    return dict(data)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _python_config(path: str) -> Any:
    """Run a Python config file and return its `config` (or its module-level field names)."""
    try:
        ns = runpy.run_path(path)
    except SyntaxError as exc:
        line = f" line {exc.lineno}" if exc.lineno else ""
        raise ConfigError(f"config file {path!r}{line}: Python syntax error: {exc.msg}") from None
    except Exception as exc:  # the user's code raised: where and what, not our traceback
        here = os.path.abspath(path)
        lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if os.path.abspath(f.filename) == here]
        line = f" line {lines[-1]}" if lines else ""
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"config file {path!r}{line} raised {type(exc).__name__}"
                          f"{': ' + first if first else ''}") from None
    obj = ns.get("config")
    if obj is None:
        return {k: v for k, v in ns.items() if not k.startswith("_") and k in _FIELDS or k == "preset"}
    if isinstance(obj, Mapping):
        return dict(obj)
    if not hasattr(obj, "__dict__"):
        raise ConfigError(f"config file {path!r}: `config` is {type(obj).__name__} {_short(obj)}, "
                          f"not a dict or an object with attributes")
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def _yaml_config(path: str, raw: bytes) -> Any:
    """Parse YAML (JSON is YAML) text; an empty file is no overrides."""
    import yaml  # local: only config files need it

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path!r} byte {exc.start}: not UTF-8 text "
                          "(a YAML/JSON config is text)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None)
        raise ConfigError(f"config file {path!r}{where}: not valid YAML{': ' + problem if problem else ''}") from None
    except RecursionError:
        raise ConfigError(f"config file {path!r}: nested too deeply to be a config") from None
    return {} if data is None else data


def build_config(preset: str = "", config_file: str = "", overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults < preset < config file < overrides."""
    file_data = load_config_file(config_file) if config_file else {}
    file_preset = str(file_data.pop("preset", "") or "")
    preset = preset or file_preset  # a --preset flag beats the file's `preset:` key
    cfg = Config()
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}{_closest(preset, list(PRESETS))} "
                              f"(valid: {', '.join(PRESETS)})")
        cfg = apply_overrides(cfg, PRESETS[preset])
    cfg = apply_overrides(cfg, file_data)
    return check_config(apply_overrides(cfg, overrides or {}))


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """Add `--preset`, `--config` and one `--field` flag per Config field.

    Flags default to argparse.SUPPRESS so only what the user typed overrides
    the preset and the config file.
    """
    parser.add_argument("--preset", default="", help=f"named preset: {', '.join(PRESETS)}")
    parser.add_argument("--config", default="", metavar="FILE", help=(
        "YAML/JSON or Python config file; a .py config is executed as Python code with your rights: "
        "use only files you trust"))
    group = parser.add_argument_group("config fields (defaults shown; see config.py)")
    defaults = Config()
    for f in dataclasses.fields(Config):
        if f.name in skip:
            continue
        help_text = _help_text(f, getattr(defaults, f.name))
        if _field_type(f.name) is bool:
            group.add_argument(flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag_name(f.name), dest=f.name, default=argparse.SUPPRESS,
                               metavar=f.name.upper(), help=help_text)


def _help_text(f: dataclasses.Field, default: Any) -> str:
    """A field's help, then its valid names, its one default and its range: "... (one of: a, b; default: 'a')"."""
    parts = [f"one of: {', '.join(choices_of(f.name))}"] if choices_of(f.name) else []
    parts.append(f"default: {f.metadata.get('default_text', repr(default))}")
    if range_text(f.name):
        parts.append(f"allowed: {range_text(f.name)}")
    return f"{f.metadata.get('help', '')} ({'; '.join(parts)})"


def parse_config(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> tuple[Config, argparse.Namespace]:
    """Parse argv into (Config, namespace of the non-config arguments).

    Unknown flags and bad values exit with a one-line error that names the
    flag and suggests the closest valid one.
    """
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        bad = next((u for u in unknown if u.startswith("-")), unknown[0])
        valid = [a for action in parser._actions for a in action.option_strings if a.startswith("--")]
        parser.error(f"unknown argument {bad!r}{_closest(bad.split('=')[0], valid)}")
    given = {k: v for k, v in vars(args).items() if k in _FIELDS}
    try:
        cfg = build_config(args.preset, args.config, given)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")  # one line, without the usage block
    rest = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in _FIELDS})
    rest.given = given  # the fields typed on the command line (they win over a resumed run's config)
    return cfg, rest


def to_dict(cfg: Config) -> Dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def from_dict(data: Mapping[str, Any], source: str = "config.json") -> Config:
    """Rebuild a Config from `config.json` (or a checkpoint's config), ignoring keys this version lacks.

    `source` names where `data` came from in the one-line ConfigError a malformed config gives.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the saved config is {type(data).__name__} {_short(data)}, "
                          f"not a mapping of config keys")
    known = {k: v for k, v in data.items() if isinstance(k, str) and k in _FIELDS}
    try:
        return check_config(apply_overrides(Config(), known))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as JSON, atomically (utils.atomic)."""
    write_text(path, json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")
