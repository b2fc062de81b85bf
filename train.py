"""Train a face-recognition model: backbone + margin head + loss, from a Config.

    python train.py --data datasets/synth --backbone mobilefacenet --head arcface --epochs 4 --output runs/demo
    python train.py --preset insightface_pytorch_ir_se50 --data /data/faces_emore
    python train.py --resume runs/demo --epochs 8        # continue (and extend) a run

Every Config field is a flag (see --help); `--config FILE` reads YAML or Python.
The run directory receives config.json, checkpoint.pt (resume), backbone.pt
(weights for evaluate.py), best.pt, eval.json, history.json, loss.png, tb/.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, Dict, List, Sequence

import torch
import torch.nn as nn
from tqdm import tqdm

import backbones
import heads
import losses
from config import Config, ConfigError, add_config_flags, apply_overrides, from_dict, parse_config, save_config, to_dict
from data.dataset import build_dataset
from heads.base import deferred_centres
from heads.partial_fc import PartialFC
from utils import checkpoint as ckpt
from utils import distributed as dist_utils
from utils.distributed import DistInfo
from utils.errors import fail, user_errors
from utils.evaluation import evaluate_targets, load_targets, mean_accuracy
from utils.precision import amp_dtype
from utils.runtime import keep_freed_memory
from utils.trainer import Trainer


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    except TypeError as exc:  # a parameter this head does not take, e.g. --margin for softmax
        raise ConfigError(f"--head {cfg.head}: {exc}") from None


def build_loss(cfg: Config) -> nn.Module:
    """Pass the loss only the config values its builder accepts (gamma, label_smoothing)."""
    offered = {"gamma": cfg.focal_gamma, "label_smoothing": cfg.label_smoothing}
    accepted = losses.params(cfg.loss)
    try:
        return losses.build(cfg.loss, **{k: v for k, v in offered.items() if k in accepted})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--loss {cfg.loss}: {exc}") from None


def build_backbone(cfg: Config) -> nn.Module:
    return backbones.build(cfg.backbone, embedding_size=cfg.embedding_size, dropout=cfg.dropout,
                           channel_order=cfg.input_order)


def make_evaluator(cfg: Config, device: torch.device, log) -> Any:
    """A closure that verifies the backbone on the targets (decoded once), or None if there are none."""
    if cfg.eval_every < 0:  # verification switched off: do not decode the .bin files at all
        return None
    names: List[str] = [t for t in cfg.targets.split(",") if t] or None
    targets = load_targets(eval_dir_of(cfg), names, progress=cfg.progress)
    for missing in targets.missing:
        log(f"warning: verification target {missing!r} not found in {eval_dir_of(cfg)}")
    if not targets.targets:
        log(f"note: no .bin verification targets in {eval_dir_of(cfg)}; training without verification")
        return None

    def evaluator(model: nn.Module) -> Dict[str, Any]:
        results = evaluate_targets(model, targets.targets, batch_size=cfg.eval_batch_size, device=str(device),
                                   tta=cfg.tta, amp=cfg.amp)
        return {"mean_accuracy": mean_accuracy(results), "tta": cfg.tta,
                "results": {k: r.to_dict() for k, r in results.items()},
                "missing": list(targets.missing)}

    return evaluator


def make_logger(output_dir: str):
    path = os.path.join(output_dir, "train.log")

    def log(msg: str) -> None:
        tqdm.write(msg)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(msg + "\n")

    return log


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
        fail("train.py", exc)


def resume_source(cfg: Config) -> str:
    """The checkpoint to resume from: --resume PATH, or with 'auto' the --output run if it has one."""
    if cfg.resume != "auto":
        return cfg.resume
    found = os.path.isfile(os.path.join(cfg.output, "checkpoint.pt"))
    return cfg.output if found else ""


def check_values(cfg: Config) -> None:
    """Values no type check catches, as one-line errors before any work starts."""
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ConfigError(f"--batch-size and --grad-accum must be >= 1, got {cfg.batch_size} and {cfg.grad_accum}")
    if not 0.0 < cfg.sample_rate <= 1.0:
        raise ConfigError(f"--sample-rate must be in (0, 1], got {cfg.sample_rate}")
    if cfg.sample_rate < 1.0 and not cfg.partial_fc:
        raise ConfigError("--sample-rate below 1 samples Partial FC's classes: add --partial-fc")


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
    try:
        return dist_utils.init(cfg.device, cfg.dist_timeout)
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from None


def describe_amp(cfg: Config, device: torch.device) -> str:
    """What --amp means on this device, for the log; a one-line error where it cannot run."""
    if not cfg.amp:
        return "off"
    try:
        dtype = amp_dtype(cfg.amp_dtype, device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return "bf16" if dtype == torch.bfloat16 else "fp16 + GradScaler"


def train(cfg: Config, given: Dict[str, Any], info: DistInfo, device: torch.device) -> int:
    state = None
    source = resume_source(cfg)
    if source:
        state = ckpt.load_training_checkpoint(source)
        # the resumed run's config, with what was typed now on top (e.g. more --epochs)
        cfg = apply_overrides(from_dict(state["config"]), {**given, "resume": source})
        if "output" not in given:
            cfg = apply_overrides(cfg, {"output": source if os.path.isdir(source)
                                        else os.path.dirname(os.path.abspath(source))})
        cfg = keep_global_batch(cfg, state, given, info.world_size)
    precision = describe_amp(cfg, device)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed 112x112 inputs: let cuDNN pick the fastest kernels
    if info.is_main:
        os.makedirs(cfg.output, exist_ok=True)
    log = make_logger(cfg.output) if info.is_main else (lambda msg: None)

    dataset = build_dataset(cfg.data, decode=not cfg.decode_on_device)
    for src, off in zip(dataset.sources, dataset.label_offsets):
        log(f"data: {src.path}: {len(src)} images, {src.num_classes} classes (labels from {int(off)})")
    model = build_backbone(cfg)
    with deferred_centres() if cfg.partial_fc else contextlib.nullcontext():  # each rank draws its shard only
        head = build_head(cfg, dataset.num_classes)
    criterion = build_loss(cfg)
    if cfg.partial_fc:
        try:
            head = PartialFC(head, criterion, sample_rate=cfg.sample_rate, rank=info.rank,
                             world_size=info.world_size, seed=cfg.seed)
        except (TypeError, ValueError) as exc:  # e.g. a head with a bias, a loss without from_sample_ce
            raise ConfigError(f"--partial-fc: {exc}") from None
    data_parallel = (not info.distributed and device.type == "cuda" and cfg.data_parallel
                     and torch.cuda.device_count() > 1 and device.index is None)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    pfc = f", Partial FC over {info.world_size} process(es), R={cfg.sample_rate:g}" if cfg.partial_fc else ""
    log(f"model: {cfg.backbone} ({n_params:.2f}M params, {cfg.input_order} input), head {cfg.head} "
        f"({dataset.num_classes} classes{pfc}), "
        f"loss {cfg.loss}, device {device}, amp {precision}")
    if info.is_main:
        save_config(cfg, os.path.join(cfg.output, "config.json"))

    def save_backbone(m: nn.Module, path: str) -> None:
        ckpt.save_backbone(path, m.state_dict(), cfg.backbone, cfg.embedding_size, cfg.input_order, to_dict(cfg))

    evaluator = make_evaluator(cfg, device, log) if info.is_main else None
    trainer = Trainer(cfg, model, head, criterion, dataset, device, cfg.output, evaluator=evaluator,
                      save_backbone=save_backbone, log=log, dist_info=info, data_parallel=data_parallel)
    if state is not None:
        trainer.load_state_dict(state)
        log(f"resumed from {cfg.resume} at step {trainer.step} (saved by {state.get('world_size', 1)} process(es))")
    elif cfg.save_init and info.is_main:
        save_backbone(trainer.model, os.path.join(cfg.output, "backbone_init.pt"))
    if data_parallel:
        log(f"note: DataParallel over {torch.cuda.device_count()} GPUs in one process; "
            f"torchrun --nproc_per_node={torch.cuda.device_count()} train.py ... is faster")
    where = f"{info.world_size} process(es)" + (f" x grad_accum {cfg.grad_accum}" if cfg.grad_accum > 1 else "")
    log(f"batch {cfg.batch_size} per process x {where} = {trainer.global_batch} images/step, "
        f"{trainer.steps_per_epoch} steps/epoch, {trainer.total_steps} steps in all")
    stopped = trainer.fit(to_dict(cfg))
    if stopped is not None:
        return 128 + int(stopped)  # the shell's convention for "ended by signal N"
    if trainer.skipped:
        log(f"warning: {trainer.skipped} undecodable images were skipped")
    log(f"done: {cfg.output}/backbone.pt (best mean verification accuracy "
        f"{100 * trainer.best:.2f}%)" if trainer.best > -1 else f"done: {cfg.output}/backbone.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
