"""Train a face-recognition model: backbone + margin head + loss, from a Config.

    python train.py --data datasets/synth --backbone mobilefacenet --head arcface --epochs 4 --output runs/demo
    python train.py --preset insightface_pytorch_ir_se50 --data /data/faces_emore
    python train.py --resume runs/demo --epochs 8        # continue (and extend) a run

Every Config field is a flag (see --help); `--config FILE` reads YAML or Python.
The run directory receives config.json, checkpoint.pt (resume), backbone.pt
(weights for evaluate.py), best.pt, verification.json (the latest verification report),
history.json, loss.png, train.log, tb/.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

import backbones
import heads
import losses
from config import Config, ConfigError, add_config_flags, apply_overrides, coerce, from_dict, parse_config, save_config
from data.dataset import FaceDataset, build_dataset
from engine import distributed as dist_utils
from engine.checkpoint import load_training_checkpoint, numbered_checkpoints, resumable_checkpoint
from engine.distributed import DistInfo
from engine.finetune import BackboneInit, adopt_fields, load_backbone_init, load_head_init, read_backbone_init
from engine.objective import DenseLoss, Objective
from engine.runlog import RunLog
from engine.schedule import SCHEDULES
from engine.teacher import check_same_teacher, load_teacher
from engine.trainer import Trainer
from evaluation.targets import evaluate_targets, load_targets, mean_accuracy
from heads.base import deferred_centres
from heads.partial_fc import PartialFC
from utils.errors import fail, user_errors
from utils.precision import amp_dtype
from utils.runtime import keep_freed_memory


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train a face-recognition backbone with a margin head on insightface .rec data or an "
                    "image folder; verifies on the .bin targets beside the data.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python train.py --data datasets/synth --backbone mobilefacenet --head arcface "
               "--epochs 4 --output runs/demo\n\n--batch-size is per process.")
    parser.add_argument("--list-backbones", action="store_true", help="print the backbone table and exit")
    parser.add_argument("--list-heads", action="store_true", help="print the margin heads and losses and exit")
    add_config_flags(parser)
    return parser


def eval_dir_of(cfg: Config) -> str:
    """Where the .bin targets are: --eval-data, else the first --data folder (or a .rec's folder)."""
    if cfg.eval_data:
        return cfg.eval_data
    first = cfg.data.split(",")[0].strip()
    return first if os.path.isdir(first) else os.path.dirname(os.path.abspath(first))


def build_head(cfg: Config, num_classes: int) -> nn.Module:
    params: Dict[str, Any] = dict(cfg.head_kwargs)
    if cfg.scale is not None:
        params["s"] = cfg.scale
    if cfg.margin is not None:
        params["m"] = cfg.margin
    try:
        return heads.build(cfg.head, cfg.embedding_size, num_classes, **params)
    except (TypeError, ValueError) as exc:  # a parameter this head does not take or rejects (--margin 5)
        flags = {"s": "--scale", "m": "--margin"}
        given = ", ".join(f"{flags.get(k, '--head-kwargs ' + k)} {v!r}" for k, v in params.items())
        raise ConfigError(f"--head {cfg.head}{' with ' + given if given else ''}: {exc}") from None


def build_loss(cfg: Config) -> nn.Module:
    """Pass the loss only the config values its builder accepts (gamma, label_smoothing)."""
    offered = {"gamma": cfg.focal_gamma, "label_smoothing": cfg.label_smoothing}
    accepted = losses.params(cfg.loss)
    try:
        return losses.build(cfg.loss, **{k: v for k, v in offered.items() if k in accepted})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--loss {cfg.loss}: {exc}") from None


def build_backbone(cfg: Config) -> nn.Module:
    try:
        return backbones.build(cfg.backbone, embedding_size=cfg.embedding_size, dropout=cfg.dropout,
                               channel_order=cfg.input_order)
    except (TypeError, ValueError) as exc:  # a value this architecture rejects; an unknown name stays itself
        if isinstance(exc, user_errors()):
            raise
        raise ConfigError(f"--backbone {cfg.backbone} with --embedding-size {cfg.embedding_size}, "
                          f"--dropout {cfg.dropout}: {exc}") from None


def make_evaluator(cfg: Config, device: torch.device, log) -> Any:
    """A closure that verifies the backbone on the targets (decoded once), or None if there are none."""
    if cfg.eval_every < 0:  # verification switched off: do not decode the .bin files at all
        return None
    names: List[str] = [t for t in cfg.targets.split(",") if t] or None
    targets = load_targets(eval_dir_of(cfg), names, progress=cfg.progress, log=log)
    for missing in targets.missing:
        log(f"warning: verification target {missing!r} not found in {eval_dir_of(cfg)}")
    if not targets.targets:
        log(f"note: no .bin verification targets in {eval_dir_of(cfg)}; training without verification")
        return None

    def evaluator(model: nn.Module) -> Dict[str, Any]:
        results = evaluate_targets(model, targets.targets, batch_size=cfg.eval_batch_size, device=str(device),
                                   tta=cfg.tta, amp=cfg.amp, amp_dtype=cfg.amp_dtype)
        return {"mean_accuracy": mean_accuracy(results), "tta": cfg.tta,
                "results": {k: r.to_dict() for k, r in results.items()},
                "missing": list(targets.missing)}

    return evaluator


def list_parts() -> None:
    print("heads: " + ", ".join(heads.names()))
    print("losses: " + ", ".join(losses.LOSSES.names()))


def main(argv: Sequence[str] | None = None) -> int:
    keep_freed_memory()
    parser = get_args_parser()
    cfg, rest = parse_config(parser, argv)
    if rest.list_backbones:
        from backbones.__main__ import main as backbone_table

        return backbone_table([]) or 0
    if rest.list_heads:
        list_parts()
        return 0
    try:
        return run(cfg, rest.given)
    except (ConfigError, *user_errors()) as exc:
        fail("train.py", exc, where=f"writing under --output {cfg.output}")


def resume_source(cfg: Config) -> str:
    """The checkpoint to resume from: --resume PATH, or with 'auto' the --output run's newest checkpoint
    that loads (checkpoint.pt, else the newest checkpoint-<step>.pt; a skipped file is named on stderr)."""
    if cfg.resume != "auto":
        return cfg.resume
    return resumable_checkpoint(cfg.output) or ""


def check_values(cfg: Config) -> None:
    """What the per-field ranges (config.check_range) cannot see, as one-line errors before any work starts."""
    SCHEDULES.get(cfg.scheduler)  # a misspelt --scheduler: did-you-mean now, not when warmup ends
    if not [p for p in cfg.data.split(",") if p.strip()]:
        raise ConfigError(f"--data {cfg.data!r} names no data (a pack folder, a .rec, or an image folder)")
    sources = [p for p in cfg.data.split(",") if p.strip()]  # --data-weights: one per source (data/mixing.py)
    if cfg.data_weights and len(cfg.data_weights) != len(sources):
        raise ConfigError(f"--data-weights {','.join(f'{w:g}' for w in cfg.data_weights)}: "
                          f"{len(cfg.data_weights)} weight(s) for {len(sources)} --data source(s); give one per source")
    if cfg.sample_rate < 1.0 and not cfg.partial_fc:
        raise ConfigError("--sample-rate below 1 samples Partial FC's classes: add --partial-fc")
    for field in ("init_backbone", "init_head"):
        if getattr(cfg, field) and cfg.resume and cfg.resume != "auto":
            raise ConfigError(f"--{field.replace('_', '-')} with --resume {cfg.resume}: resuming restores the "
                              f"weights, head and optimizer from the checkpoint; drop one of them")


RUN_FILES = ("checkpoint.pt", "backbone.pt", "config.json")


def check_output(cfg: Config, source: str) -> None:
    """Refuse an --output that is a file, or that holds another run, unless resuming it or --overwrite.

    `source` is the checkpoint being resumed ("" for a fresh start). --resume auto on a folder whose
    run never saved a checkpoint starts it again (what a requeued job wants).
    """
    out = cfg.output
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ConfigError(f"--output {out}: exists and is not a folder (a run directory is a folder)")
    if cfg.overwrite or not os.path.isdir(out):
        return
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if not held or (not source and cfg.resume == "auto"):
        return
    if source:
        run_dir = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
        if os.path.realpath(run_dir) == os.path.realpath(out):
            return
    raise ConfigError(f"--output {out} already holds a run ({', '.join(held)}): give --resume {out} to continue it, "
                      f"or --overwrite to replace it")


def check_batch_fits(cfg: Config, num_images: int, world_size: int) -> None:
    """One optimizer step must fit in the data: name the flags to change, before anything is built."""
    step = cfg.batch_size * world_size * cfg.grad_accum
    if num_images < step:
        raise ConfigError(f"--batch-size {cfg.batch_size} x {world_size} process(es) x --grad-accum {cfg.grad_accum} "
                          f"= {step} images per step, but --data {cfg.data} holds only {num_images}: "
                          f"lower --batch-size")


def keep_global_batch(cfg: Config, state: Dict[str, Any], given: Dict[str, Any], world_size: int) -> Config:
    """On resume at another world size, keep the global batch (and so the schedule and the data
    stream) by changing the per-process batch, unless --batch-size was typed."""
    global_batch = int(state.get("global_batch", 0))
    if not global_batch or "batch_size" in given or cfg.batch_size * world_size * cfg.grad_accum == global_batch:
        return cfg
    per = global_batch / (world_size * cfg.grad_accum)
    if per != int(per):
        raise ConfigError(f"the checkpoint's global batch {global_batch} does not split over {world_size} "
                          f"process(es) x grad_accum {cfg.grad_accum}: give --batch-size (and --grad-accum)")
    return apply_overrides(cfg, {"batch_size": int(per)})


def run(cfg: Config, given: Dict[str, Any]) -> int:
    check_values(cfg)
    info, device = init_distributed(cfg)
    try:
        return train(cfg, given, info, device)
    finally:
        dist_utils.cleanup()


def init_distributed(cfg: Config) -> tuple[DistInfo, torch.device]:
    return dist_utils.init(cfg.device, cfg.dist_timeout)  # a bad --device: DeviceError, one line


def describe_amp(cfg: Config, device: torch.device) -> str:
    """What --amp means on this device, for the log; a one-line error where it cannot run."""
    if not cfg.amp:
        return "off"
    try:
        dtype = amp_dtype(cfg.amp_dtype, device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return "bf16" if dtype == torch.bfloat16 else "fp16 + GradScaler"


def resumed(cfg: Config, given: Dict[str, Any], world_size: int) -> Tuple[Config, Dict[str, Any] | None]:
    """The config to run and the checkpoint to resume from (None: a fresh start).

    Resuming: the saved run's config with what was typed now on top (e.g. more --epochs),
    ``resume`` set to the checkpoint read and ``output`` to its run (unless typed).
    """
    source = resume_source(cfg)
    if not source:
        return cfg, None
    state = load_training_checkpoint(source)
    saved = from_dict(state.get("config"), source=f"{source} (its saved config)")
    for key in ("backbone_lr_mult", "head_lr_mult", "layer_decay", "optimizer"):  # the optimizer's groups (issue 16)
        if key in given and coerce(key, given[key]) != getattr(saved, key):
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"{flag} {given[key]} on resume: {source} was trained with {getattr(saved, key)} "
                              f"(its optimizer state holds it); drop {flag}")
    cfg = apply_overrides(saved, {**given, "resume": source})
    if "output" not in given:
        cfg = apply_overrides(cfg, {"output": source if os.path.isdir(source)
                                    else os.path.dirname(os.path.abspath(source))})
    return keep_global_batch(cfg, state, given, world_size), state


def claim_output(cfg: Config, resuming: bool) -> None:
    """Rank 0 alone (the others would race its writes): refuse another run's --output; with --overwrite of
    a fresh start, remove the old run's numbered checkpoints (they would outrank, and prune, the new)."""
    check_output(cfg, cfg.resume if resuming else "")
    if cfg.overwrite and not resuming:
        for _, old in numbered_checkpoints(cfg.output):
            os.remove(old)


def open_run_log(cfg: Config, info: DistInfo) -> RunLog:
    """The run's log (train.log, progress, TensorBoard, history); rank 0 creates the run directory."""
    if info.is_main:
        os.makedirs(cfg.output, exist_ok=True)
    return RunLog(cfg.output, main=info.is_main, progress=cfg.progress)


def build_objective(cfg: Config, head: nn.Module, criterion: nn.Module, info: DistInfo) -> Objective:
    """The head and loss as the trainer sees them: sharded over the processes (--partial-fc) or dense."""
    if not cfg.partial_fc:
        return DenseLoss(head, criterion)
    try:
        return PartialFC(head, criterion, sample_rate=cfg.sample_rate, rank=info.rank, world_size=info.world_size,
                         seed=cfg.seed)
    except (TypeError, ValueError) as exc:  # e.g. a head with a bias, a loss without from_sample_ce
        raise ConfigError(f"--partial-fc: {exc}") from None


def build_parts(cfg: Config, info: DistInfo, log: RunLog, init: BackboneInit | None = None,
                init_head: str = "") -> Tuple[FaceDataset, nn.Module, Objective]:
    """Data, backbone and objective, in the order that draws the seeded initial weights; then the
    --init-backbone weights (``init``) and the --init-head checkpoint's head over them (fresh starts only)."""
    dataset = build_dataset(cfg.data, decode=not cfg.decode_on_device)
    for src, off in zip(dataset.sources, dataset.label_offsets):
        log(f"data: {src.path}: {len(src)} images, {src.num_classes} classes (labels from {int(off)})")
    model = build_backbone(cfg)
    with deferred_centres() if cfg.partial_fc else contextlib.nullcontext():  # each rank draws its shard only
        head = build_head(cfg, dataset.num_classes)
    criterion = build_loss(cfg)
    check_batch_fits(cfg, len(dataset), info.world_size)
    objective = build_objective(cfg, head, criterion, info)
    if init is not None:
        log(load_backbone_init(model, init, cfg))
    if init_head:
        log(load_head_init(objective, init_head, dataset.num_classes, cfg.embedding_size))
    return dataset, model, objective


def fine_tune_start(cfg: Config, given: Dict[str, Any],
                    resuming: bool) -> Tuple[Config, BackboneInit | None, List[str]]:
    """Read --init-backbone (a fresh start only) and adopt the fields its file decides (see engine/finetune.py);
    before anything is written, so a wrong file leaves no run folder. Returns the notes for the log."""
    if resuming:
        if cfg.init_backbone or cfg.init_head:
            return cfg, None, ["note: resumed run: --init-backbone / --init-head were applied at its start, not again"]
        return cfg, None, []
    if not cfg.init_backbone:
        return cfg, None, []
    init = read_backbone_init(cfg.init_backbone)
    cfg, notes = adopt_fields(cfg, init, given)
    return cfg, init, [f"init backbone: {note}" for note in notes]


def report_end(trainer: Trainer, cfg: Config, log: RunLog) -> None:
    """What the finished run left behind, and what it had to skip."""
    if trainer.skipped:
        log(f"warning: {trainer.skipped} undecodable images were skipped")
    if trainer.bad_steps:
        log(f"warning: {trainer.bad_steps} optimizer steps were skipped (non-finite loss, gradient or lr)")
    log(f"done: {cfg.output}/backbone.pt (best mean verification accuracy "
        f"{100 * trainer.best:.2f}%)" if trainer.best > -1 else f"done: {cfg.output}/backbone.pt")


def train(cfg: Config, given: Dict[str, Any], info: DistInfo, device: torch.device) -> int:
    cfg, state = resumed(cfg, given, info.world_size)
    if info.is_main:
        claim_output(cfg, resuming=state is not None)
    cfg, init, notes = fine_tune_start(cfg, given, state is not None)
    teacher = load_teacher(cfg)  # a bad --teacher: one line, before the run folder is written
    if state is not None:  # (the trainer checks again) before config.json is rewritten
        check_same_teacher(state.get("teacher"), teacher, cfg.resume)
    precision = describe_amp(cfg, device)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed 112x112 inputs: let cuDNN pick the fastest kernels
    log = open_run_log(cfg, info)
    for note in notes:
        log(note)
    if teacher is not None:
        log(f"teacher: {teacher.describe()}, frozen; loss = {cfg.margin_loss_weight:g} x margin loss + "
            f"{cfg.distill_weight:g} x {cfg.distill_loss} distillation")
    dataset, model, objective = build_parts(cfg, info, log, init, cfg.init_head if state is None else "")
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    pfc = f", Partial FC over {info.world_size} process(es), R={cfg.sample_rate:g}" if cfg.partial_fc else ""
    log(f"model: {cfg.backbone} ({n_params:.2f}M params, {cfg.input_order} input), head {cfg.head} "
        f"({dataset.num_classes} classes{pfc}), loss {cfg.loss}, device {device}, amp {precision}")
    if info.is_main:
        save_config(cfg, os.path.join(cfg.output, "config.json"))
    evaluator = make_evaluator(cfg, device, log) if info.is_main else None
    trainer = Trainer(cfg, model, objective, dataset, device, evaluator=evaluator, run_log=log, dist_info=info,
                      teacher=teacher)
    if state is not None:
        trainer.load_state_dict(state)
        log(f"resumed from {cfg.resume} at step {trainer.step} (saved by {state.get('world_size', 1)} process(es))")
    elif cfg.save_init and info.is_main:
        trainer.save_backbone("backbone_init.pt")
    if trainer.data_parallel:
        log(f"note: DataParallel over {torch.cuda.device_count()} GPUs in one process; "
            f"torchrun --nproc_per_node={torch.cuda.device_count()} train.py ... is faster")
    where = f"{info.world_size} process(es)" + (f" x grad_accum {cfg.grad_accum}" if cfg.grad_accum > 1 else "")
    log(f"batch {cfg.batch_size} per process x {where} = {trainer.global_batch} images/step, "
        f"{trainer.steps_per_epoch} steps/epoch, {trainer.total_steps} steps in all")
    stopped = trainer.fit()
    if stopped is not None:
        return 128 + int(stopped)  # the shell's convention for "ended by signal N"
    report_end(trainer, cfg, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
