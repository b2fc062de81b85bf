"""Evaluate backbones by 10-fold verification on the .bin targets of a data folder.

    python evaluate.py runs/demo/backbone.pt --data datasets/synth
    python evaluate.py runs/demo --data datasets/synth --targets lfw,cfp_fp
    python evaluate.py runs/demo/ckpts/ --data datasets/synth          # every checkpoint in a folder: one row each
    python evaluate.py model_ir_se50.pth --backbone ir_se50 --input-order bgr --data /data/faces_emore

Accuracy is the mean over the 10 folds of the held-out fold accuracy (in %),
"+-" the population standard deviation of the 10 fold accuracies; the
threshold is the mean of the 10 best thresholds (squared L2 distance).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
import torch.nn as nn

import backbones
from backbones.weights import describe_backbone, mismatch_report, state_dict_of
from config import ConfigError, check_range
from engine.distributed import resolve_device
from evaluation.embed import TTA_MODES
from evaluation.targets import evaluate_targets, load_targets, mean_accuracy
from utils.atomic import write_atomic, write_json, write_text
from utils.errors import fail, user_errors
from utils.plots import plot_roc
from utils.runtime import keep_freed_memory
from utils.torchfile import CheckpointError, check_finite, load_file, sha256_file
from utils.version import code_version

PROTOCOL = ("10-fold verification (insightface protocol): embedding = L2-normalise(e(x) + e(flip x)) for tta=sum; "
            "squared L2 distance; 10 contiguous folds; per fold the threshold in 0.00..3.99 (step 0.01) maximising "
            "accuracy on the other 9 folds ('same' if dist < threshold, first maximum on ties) is applied to the "
            "held-out fold. accuracy = mean of the 10 fold accuracies (%), +- = their population std (ddof=0).")


@dataclass
class LoadedModel:
    label: str
    path: str
    model: nn.Module
    backbone: str
    channel_order: str


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT",
                   help="backbone.pt / checkpoint.pt, a run directory, a folder of checkpoints, or foreign weights "
                        "(with --backbone)")
    p.add_argument("--data", required=True, help="folder holding the .bin verification files")
    p.add_argument("--targets", default="", help="comma-separated targets (default: every .bin in --data)")
    p.add_argument("--tta", default="sum", choices=TTA_MODES.names(),
                   help="flip test-time augmentation: sum = normalise(e(x)+e(flip x)) (the published protocol), "
                        "concat = normalise([e(x), e(flip x)]) (Face_Pytorch), none = normalise(e(x))")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true", help="bf16 (CPU) / fp16 (CUDA) backbone")
    p.add_argument("--backbone", default="", help="architecture of foreign weights (e.g. ir_se50, iresnet100)")
    p.add_argument("--embedding-size", type=int, default=512, help="embedding size of foreign weights")
    p.add_argument("--input-order", default="", choices=("", "rgb", "bgr"),
                   help="channel order the weights were trained on (default: from the checkpoint, else rgb)")
    p.add_argument("--report", default="", metavar="DIR",
                   help="where eval.json is written (default: the first checkpoint's folder)")
    p.add_argument("--save-embeddings", default="", metavar="DIR",
                   help="write <target>.npy normalised embeddings and <target>_issame.npy here")
    p.add_argument("--cache-dir", default="default", metavar="DIR",
                   help="where decoded .bin sets are kept, keyed by the file's sha256, so later runs skip decoding "
                        "(default: $FACETRAIN_CACHE, else ~/.cache/facetrain; about 450 MB per 6000-pair set)")
    p.add_argument("--no-cache", action="store_true", help="decode the .bin files without the on-disk cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _natural_key(s: str) -> List[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def expand_checkpoints(paths: Sequence[str]) -> List[str]:
    """Files as given; a run directory -> its backbone.pt; any other folder -> all its .pt/.pth files."""
    out: List[str] = []
    for p in paths:
        if os.path.isdir(p):
            if os.path.isfile(os.path.join(p, "config.json")) and os.path.isfile(os.path.join(p, "backbone.pt")):
                out.append(os.path.join(p, "backbone.pt"))
                continue
            files = sorted((f for f in os.listdir(p) if f.endswith((".pt", ".pth"))), key=_natural_key)
            if not files:
                raise FileNotFoundError(f"{p}: no checkpoints (.pt/.pth) in this folder")
            out.extend(os.path.join(p, f) for f in files)
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such checkpoint file or folder")
    return out


def load_model(path: str, args: argparse.Namespace) -> LoadedModel:
    """Rebuild the backbone a checkpoint describes, or `--backbone` for foreign weights.

    Every field is validated before the model is built (backbones.weights.describe_backbone), and
    weights holding NaN/inf are refused: a diverged model would otherwise score a meaningless 50%.
    """
    data = load_file(path)
    info = describe_backbone(data, path)
    if info is None:
        if not args.backbone:
            raise ConfigError(f"{path}: foreign weights (not written by train.py): say which architecture "
                              f"with --backbone NAME")
        info = {"backbone": args.backbone, "embedding_size": args.embedding_size, "channel_order": "rgb",
                "state_dict": state_dict_of(data, path)}
    name = args.backbone or info["backbone"]
    order = args.input_order or info["channel_order"]
    state = info["state_dict"]
    check_finite(state, path)
    model = backbones.build(name, embedding_size=info["embedding_size"], channel_order=order)
    problems = mismatch_report(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"{path} does not fit backbone {name!r}: " + "; ".join(problems))
    model.load_state_dict(state)
    return LoadedModel(os.path.relpath(path), path, model, name, order)


def format_table(rows: List[Dict[str, Any]], targets: List[str], missing: List[str]) -> str:
    """Markdown-style table: one row per checkpoint, accuracy % mean +- std per target, mean.

    A set whose accuracy measures nothing (all pairs one label) is marked ``(!)`` and explained under the table.
    """
    header = ["checkpoint"] + targets + missing + ["mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    warnings: Dict[str, str] = {}
    for row in rows:
        cells = [row["label"]]
        for t in targets:
            r = row["results"][t]
            mark = " (!)" if r.get("warning") else ""
            if mark:
                warnings[t] = r["warning"]
            cells.append(f"{100 * r['accuracy']:.2f} +- {100 * r['accuracy_std']:.2f}{mark}")
        cells += ["missing"] * len(missing)
        cells.append(f"{100 * row['mean_accuracy']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    if warnings:
        lines += [""] + [f"(!) {t}: {w}; its accuracy does not measure the model" for t, w in warnings.items()]
    return "\n".join(lines)


DETAIL_COLUMNS = ("threshold", "VAL@FAR=1e-3", "TAR@FAR=1e-4", "TAR@FAR=1e-3", "TAR@FAR=1e-2", "AUC", "EER", "XNorm")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def format_details(row: Dict[str, Any], targets: List[str]) -> str:
    """Per-set table of one checkpoint: every metric besides accuracy (rates in %)."""
    lines = ["| set | " + " | ".join(DETAIL_COLUMNS) + " |", "|" + "---|" * (len(DETAIL_COLUMNS) + 1)]
    for t in targets:
        r = row["results"][t]
        tar = r["tar_at_far"]
        cells = [t, f"{r['best_threshold']:.3f}", f"{_pct(r['val'])} +- {_pct(r['val_std'])}",
                 _pct(tar.get("0.0001")), _pct(tar.get("0.001")), _pct(tar.get("0.01")),
                 "n/a" if r["auc"] is None else f"{r['auc']:.4f}", _pct(r["eer"]),
                 "n/a" if r["xnorm"] is None else f"{r['xnorm']:.4g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


HOW_TO_READ = (
    "How to read: accuracy cells are the mean over 10 folds of the held-out fold accuracy, in %, "
    "+- the population std of those 10 values (spread between folds, not a confidence interval). "
    "threshold: mean of the 10 chosen squared-L2 distance thresholds (0-4). VAL@FAR=1e-3: fold-wise "
    "true accept rate at the threshold where the training folds falsely accept 0.1% of different pairs. "
    "TAR@FAR: true accept rate over all pairs at that false accept rate (with a few hundred different "
    "pairs, FAR=1e-4 means accepting none of them). AUC/EER: all-pairs ROC. XNorm: mean L2 norm of the raw "
    "embeddings (insightface's number; a collapsing or exploding norm flags a broken run).")


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    keep_freed_memory()
    try:
        return run(args)
    except (ConfigError, *user_errors()) as exc:
        fail("evaluate.py", exc, where="writing the report, --save-embeddings or the .bin cache")


def check_args(args: argparse.Namespace) -> str:
    """Every flag checked before any checkpoint is loaded or .bin decoded; returns the device.

    Numbers use the training config's ranges (one place): --batch-size that of --eval-batch-size.
    """
    check_range("eval_batch_size", args.batch_size, flag="--batch-size")
    check_range("embedding_size", args.embedding_size, flag="--embedding-size")
    device = str(resolve_device(args.device))
    if not os.path.isdir(args.data):
        raise FileNotFoundError(f"{args.data}: no such data folder")
    for flag, folder in (("--report", args.report), ("--save-embeddings", args.save_embeddings)):
        if folder and os.path.lexists(folder) and not os.path.isdir(folder):
            raise ConfigError(f"{flag} {folder}: exists and is not a folder (it names the folder to write into)")
    return device


def run(args: argparse.Namespace) -> int:
    device = check_args(args)
    paths = expand_checkpoints(args.checkpoints)
    first = load_model(paths[0], args)  # a bad checkpoint fails before minutes of decoding
    names = [t for t in args.targets.split(",") if t] or None
    targets = load_targets(args.data, names, progress=not args.no_progress,
                           cache_dir=None if args.no_cache else args.cache_dir)
    if not targets.targets:
        raise FileNotFoundError(f"{args.data}: none of the requested verification targets (.bin) found")
    target_names = [t.name for t in targets.targets]
    rows: List[Dict[str, Any]] = []
    for i, path in enumerate(paths):
        lm = first if i == 0 else load_model(path, args)
        lm.model.to(device).to(memory_format=torch.channels_last)
        embeddings: Dict[str, np.ndarray] = {}
        results = evaluate_targets(lm.model, targets.targets, batch_size=args.batch_size, device=device,
                                   tta=args.tta, amp=args.amp, progress=not args.no_progress,
                                   embeddings_out=embeddings if args.save_embeddings else None)
        row = {"label": lm.label, "path": os.path.abspath(path), "sha256": sha256_file(path),
               "backbone": lm.backbone, "channel_order": lm.channel_order,
               "mean_accuracy": mean_accuracy(results), "results": {k: r.to_dict() for k, r in results.items()}}
        rows.append(row)
        if args.save_embeddings:
            out = args.save_embeddings if len(paths) == 1 else os.path.join(
                args.save_embeddings, os.path.splitext(os.path.basename(path))[0])
            os.makedirs(out, exist_ok=True)
            for t in targets.targets:
                write_atomic(os.path.join(out, f"{t.name}.npy"), lambda tmp, e=embeddings[t.name]: _save_npy(tmp, e))
                write_atomic(os.path.join(out, f"{t.name}_issame.npy"), lambda tmp, s=t.issame: _save_npy(tmp, s))
    table = format_table(rows, target_names, targets.missing)
    print(f"\nverification accuracy (%) on {args.data}, tta={args.tta}: mean +- std over 10 folds")
    print(table)
    for row in rows:
        print(f"\n{row['label']}: rates in %")
        print(format_details(row, target_names))
    report_dir = args.report or os.path.dirname(os.path.abspath(paths[0]))
    report = {"protocol": PROTOCOL, "tta": args.tta, "code_version": code_version(),
              "data": {t.name: {"path": os.path.abspath(t.path), "sha256": t.sha256,
                                "pairs": int(len(t.issame))} for t in targets.targets},
              "missing_targets": targets.missing, "checkpoints": rows}
    write_json(os.path.join(report_dir, "eval.json"), report)
    write_markdown(os.path.join(report_dir, "eval.md"), table, args, rows, target_names)
    for row in rows:
        name = os.path.splitext(os.path.basename(row["path"]))[0]
        plot_roc({t: row["results"][t] for t in target_names}, os.path.join(report_dir, f"roc_{name}.png"),
                 title=f"ROC: {row['label']} (tta={args.tta})")
    print(f"report: {os.path.join(report_dir, 'eval.json')}, eval.md, roc_*.png")
    return 0


def write_markdown(path: str, table: str, args: argparse.Namespace, rows: List[Dict[str, Any]],
                   targets: List[str]) -> None:
    """The table ready to paste, with what the numbers mean written beside it."""
    lines = [f"# Verification on `{args.data}` (tta={args.tta})", "", table, "", HOW_TO_READ, "",
             f"Protocol: {PROTOCOL}", ""]
    for row in rows:
        lines += [f"## `{row['label']}`", "", f"{row['backbone']}, {row['channel_order']} input, "
                  f"sha256 `{row['sha256'][:16]}`; rates in %", "", format_details(row, targets), ""]
    write_text(path, "\n".join(lines) + "\n")


def _save_npy(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, arr)


if __name__ == "__main__":
    sys.exit(main())
