"""Evaluate backbones by 10-fold verification on the .bin targets of a data folder.

    python evaluate.py runs/demo/backbone.pt --data datasets/synth
    python evaluate.py runs/demo --data datasets/synth --targets lfw,cfp_fp
    python evaluate.py runs/demo/ckpts/ --data datasets/synth          # every checkpoint in a folder: one row each
    python evaluate.py model_ir_se50.pth --backbone ir_se50 --input-order bgr --data /data/faces_emore
    python evaluate.py runs/demo --ijb /data/IJBC                       # IJB-C 1:1 (and 1:N when its files are there)
    python evaluate.py r100.pth --backbone iresnet100 --ijb /data/IJBB --ijb /data/IJBC --ijb-mode 1:1,1:N

Accuracy is the mean over the 10 folds of the held-out fold accuracy (in %),
"+-" the population standard deviation of the 10 fold accuracies; the
threshold is the mean of the 10 best thresholds (squared L2 distance).

IJB-B / IJB-C (--ijb FOLDER, the release as insightface distributes it: loose_crop/ + meta/) follow
arcface_torch's eval_ijbc.py: 5-point alignment of the loose crops, face feature e(x) + e(flip x)
weighted by its faceness score and keeping its norm, template = sum over media of the media's
mean face feature, TAR at FAR 1e-6..1e-1; 1:N adds rank-1/5/10 over both galleries and
TPIR@FPIR 0.01/0.1 per gallery (NIST open set). Aligned crops are cached on disk (keyed by the
meta files' sha256; about 38 kB per face: 18 GB for IJB-C) so a second checkpoint skips decoding.

The report (eval.json with "schema": "facetrain-eval/1", eval.md, roc_<checkpoint>.png and
roc_ijb_<checkpoint>_<IJBX>.png) goes to --report DIR, by default the first checkpoint's folder;
an eval.json there that this script did not write (a training record, another tool's file) is
refused, never overwritten. One it wrote is merged with, so an --ijb run after a --data run keeps
the .bin results (and the thresholds infer.py reads): a checkpoint is its sha256 (a copy is the
same one, a file changed in place is not); each result this run computes (per .bin set, per IJB
set) replaces that checkpoint's old one, its other results stay; checkpoints not evaluated now stay;
a row whose file now holds other weights is dropped. Results of other settings are not mixed: a
run that would put its numbers beside kept ones of another --tta, another .bin file under the same
set name, or other IJB options / meta files is refused before any model runs (use another --report).
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
from config import ConfigError, check_range
from engine.distributed import resolve_device
from evaluation.cache import default_cache_dir
from evaluation.embed import TTA_MODES
from evaluation.ijb import IJBData, IJBOptions, IJBResult, evaluate_ijb, load_ijb
from evaluation.report import (
    REPORT_FILE,
    check_report_dir,
    checkpoint_row,
    console_text,
    read_report,
    write_report,
)
from evaluation.report_merge import Scope
from evaluation.report_merge import check as check_merge
from evaluation.targets import Target, TargetSet, evaluate_targets, load_targets, mean_accuracy
from utils.atomic import write_atomic
from utils.errors import fail, user_errors
from utils.runtime import keep_freed_memory
from utils.torchfile import sha256_file


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
    p.add_argument("--data", default="", help="folder holding the .bin verification files (needed unless --ijb)")
    p.add_argument("--targets", default="", help="comma-separated targets (default: every .bin in --data)")
    p.add_argument("--tta", default="sum", choices=sorted(TTA_MODES),
                   help="flip test-time augmentation: sum = normalise(e(x)+e(flip x)) (the published protocol), "
                        "concat = normalise([e(x), e(flip x)]) (Face_Pytorch), none = normalise(e(x)); for IJB "
                        "the same views, un-normalised (sum = the reference's F2, concat = F1, none = no flip)")
    p.add_argument("--ijb", action="append", default=[], metavar="FOLDER",
                   help="an IJB-B or IJB-C release folder (loose_crop/ and meta/ as insightface distributes them; "
                        "which one is read from the meta file names); repeat for both")
    p.add_argument("--ijb-mode", default="auto",
                   help="1:1, 1:N or 1:1,1:N; auto = 1:1, plus 1:N when the gallery and probe CSVs are there")
    p.add_argument("--ijb-no-detector-score", action="store_true",
                   help="do not weight IJB faces by their faceness score (the reference's D0)")
    p.add_argument("--ijb-no-norm-score", action="store_true",
                   help="L2-normalise each IJB face feature before the template mean (the reference's N0)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes decoding and aligning IJB loose crops (0 = in this process)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="images per forward pass (flip TTA runs two passes per batch)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true",
                   help="run the backbone under autocast with training's --amp rule: bf16 where the device "
                        "computes it natively (CPUs, NVIDIA Ampere and newer), else fp16; embeddings are "
                        "combined and scored in float64 either way")
    p.add_argument("--backbone", default="",
                   help="architecture of foreign weights (e.g. ir_se50, iresnet100); for a train.py "
                        "checkpoint it replaces the architecture the checkpoint records")
    p.add_argument("--embedding-size", type=int, default=512, help="embedding size of foreign weights")
    p.add_argument("--input-order", default="", choices=("", "rgb", "bgr"),
                   help="channel order the weights were trained on (default: from the checkpoint, else rgb)")
    p.add_argument("--report", default="", metavar="DIR",
                   help="where eval.json, eval.md and roc_*.png are written (default: the first checkpoint's folder); "
                        "an evaluate.py eval.json there is merged with (same sha256 = same checkpoint: what this run "
                        "scores replaces, the rest is kept; other --tta / .bin files / IJB options beside kept "
                        "results are refused); one evaluate.py did not write is refused, not overwritten")
    p.add_argument("--save-embeddings", default="", metavar="DIR",
                   help="write <target>.npy (normalised float64 embeddings) and <target>_issame.npy here; for IJB "
                        "<IJBX>_faces.npy (float32 flip-combined raw features in 5pts-line order, before the "
                        "faceness weighting) and <IJBX>_scores.npy (float64, one per pair in pair-file order); "
                        "with several checkpoints, into DIR/<checkpoint name>/")
    p.add_argument("--cache-dir", default="default", metavar="DIR",
                   help="where decoded .bin sets and aligned IJB crops are kept, keyed by sha256, so later runs "
                        "skip decoding (default: $FACETRAIN_CACHE, else ~/.cache/facetrain; about 450 MB per "
                        "6000-pair set, 18 GB for IJB-C)")
    p.add_argument("--no-cache", action="store_true", help="decode without the on-disk cache")
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
    loaded = backbones.from_file(path, args.backbone, args.embedding_size, args.input_order)
    model, name, order = loaded.model, loaded.name, loaded.channel_order
    return LoadedModel(os.path.relpath(path), path, model, name, order)


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
    if args.workers < 0:
        raise ConfigError(f"--workers {args.workers}: must be >= 0")
    device = str(resolve_device(args.device))
    if not args.data and not args.ijb:
        raise ConfigError("nothing to evaluate: give --data (a folder of .bin sets) and/or --ijb (an IJB release)")
    if args.data and not os.path.isdir(args.data):
        raise FileNotFoundError(f"{args.data}: no such data folder")
    for flag, folder in (("--report", args.report), ("--save-embeddings", args.save_embeddings)):
        if folder and os.path.lexists(folder) and not os.path.isdir(folder):
            raise ConfigError(f"{flag} {folder}: exists and is not a folder (it names the folder to write into)")
    return device


def run(args: argparse.Namespace) -> int:
    device = check_args(args)
    paths = expand_checkpoints(args.checkpoints)
    report_dir = args.report or os.path.dirname(os.path.abspath(paths[0]))
    check_report_dir(report_dir)  # a foreign eval.json is refused before any work
    first = load_model(paths[0], args)  # a bad checkpoint fails before minutes of decoding
    ijb_sets = load_ijb_sets(args)  # a bad meta file fails before any .bin is decoded
    targets = TargetSet()
    if args.data:
        names = [t for t in args.targets.split(",") if t] or None
        targets = load_targets(args.data, names, progress=not args.no_progress,
                               cache_dir=None if args.no_cache else args.cache_dir)
        if not targets.targets:
            raise FileNotFoundError(f"{args.data}: none of the requested verification targets (.bin) found")
    target_names = [t.name for t in targets.targets]
    shas = {os.path.abspath(p): sha256_file(p) for p in paths}
    # results of other settings that the report folder would keep beside ours: refused before any model runs
    scope = Scope(shas, args.tta, {t.name: t.sha256 for t in targets.targets},
                  {d.target: {"options": ijb_options(args).to_dict(), "meta_sha256": d.faces.key} for d in ijb_sets})
    check_merge(read_report(report_dir), scope, os.path.join(report_dir, REPORT_FILE))
    rows: List[Dict[str, Any]] = []
    curves: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for i, path in enumerate(paths):
        lm = first if i == 0 else load_model(path, args)
        lm.model.to(device).to(memory_format=torch.channels_last)
        embeddings: Dict[str, np.ndarray] = {}
        results = evaluate_targets(lm.model, targets.targets, batch_size=args.batch_size, device=device,
                                   tta=args.tta, amp=args.amp, progress=not args.no_progress,
                                   embeddings_out=embeddings if args.save_embeddings else None)
        row = checkpoint_row(lm.label, path, shas[os.path.abspath(path)], lm.backbone, lm.channel_order,
                             mean_accuracy(results) if results else None, results)
        ijb_results = run_ijb(lm.model, ijb_sets, args, device)
        row["ijb"] = {name: r.summary for name, r in ijb_results.items()}
        curves[os.path.abspath(path)] = {name: {"fpr": r.roc[0], "tpr": r.roc[1]}
                                         for name, r in ijb_results.items() if r.roc is not None}
        rows.append(row)
        if args.save_embeddings:
            folder = args.save_embeddings if len(paths) == 1 else os.path.join(
                args.save_embeddings, os.path.splitext(os.path.basename(path))[0])
            save_embeddings(folder, targets.targets, embeddings)
            save_ijb_arrays(folder, ijb_results)
    print(console_text(rows, target_names, targets.missing, args.data, args.tta))
    data_sets = {t.name: {"path": os.path.abspath(t.path), "sha256": t.sha256, "pairs": int(len(t.issame))}
                 for t in targets.targets}
    written = write_report(report_dir, rows, data_sets, targets.missing, args.data, args.tta, ijb_curves=curves)
    for note in written.notes:
        print(note)
    print(f"report: {written.path}, eval.md, roc_*.png")
    return 0


def load_ijb_sets(args: argparse.Namespace) -> List[IJBData]:
    """Every --ijb release read and checked once (shared by all checkpoints); one per target."""
    sets: List[IJBData] = []
    for folder in args.ijb:
        data = load_ijb(folder, args.ijb_mode, log=None if args.no_progress else _stderr)
        clash = next((s for s in sets if s.target == data.target), None)
        if clash is not None:
            raise ConfigError(f"--ijb {folder}: a second {data.target} release (first: {clash.layout.root})")
        sets.append(data)
    return sets


def run_ijb(model: nn.Module, sets: Sequence[IJBData], args: argparse.Namespace, device: str) -> Dict[str, IJBResult]:
    """Score one model on every IJB release with the options the flags chose."""
    options = ijb_options(args)
    cache = None if args.no_cache else (default_cache_dir() if args.cache_dir == "default" else args.cache_dir)
    return {data.target: evaluate_ijb(model, data, options, batch_size=args.batch_size, device=device,
                                      amp=args.amp, cache_dir=cache, workers=args.workers,
                                      progress=not args.no_progress)
            for data in sets}


def ijb_options(args: argparse.Namespace) -> IJBOptions:
    """The IJB protocol switches the flags chose (also what eval.json records per IJB result)."""
    return IJBOptions(tta=args.tta, detector_score=not args.ijb_no_detector_score,
                      norm_score=not args.ijb_no_norm_score)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def save_ijb_arrays(folder: str, results: Dict[str, IJBResult]) -> None:
    """<IJBX>_faces.npy (float32 raw features, 5pts-line order) and <IJBX>_scores.npy (pair-file order)."""
    if not results:
        return
    os.makedirs(folder, exist_ok=True)
    for name, r in results.items():
        write_atomic(os.path.join(folder, f"{name}_faces.npy"), lambda tmp, a=r.faces: _save_npy(tmp, a))
        if r.scores is not None:
            write_atomic(os.path.join(folder, f"{name}_scores.npy"), lambda tmp, a=r.scores: _save_npy(tmp, a))


def save_embeddings(folder: str, targets: Sequence[Target], embeddings: Dict[str, np.ndarray]) -> None:
    """<target>.npy (normalised float64 embeddings, 2N rows) and <target>_issame.npy (N bools) in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    for t in targets:
        write_atomic(os.path.join(folder, f"{t.name}.npy"), lambda tmp, e=embeddings[t.name]: _save_npy(tmp, e))
        write_atomic(os.path.join(folder, f"{t.name}_issame.npy"), lambda tmp, s=t.issame: _save_npy(tmp, s))


def _save_npy(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, arr)


if __name__ == "__main__":
    sys.exit(main())
