"""``prepare_data.py unpack``: a whole dataset folder: train.rec -> OUT/train/<class>/..., X.bin -> OUT/X/."""

from __future__ import annotations

import argparse

from prepare.commands.base import Command
from prepare.commands.unpack_bin import format_bin_summary
from prepare.commands.unpack_rec import add_rec_args, format_rec_summary


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", metavar="DATASET_DIR", help="an insightface dataset folder (train.rec/.idx, *.bin)")
    p.add_argument("out", metavar="OUT", help="output folder: OUT/train/<class>/<key>.<ext>, OUT/<target>/<i>.<ext>")
    add_rec_args(p)
    p.add_argument("--npy", action="store_true",
                   help="also write OUT/<target>/images.npy and issame.npy for every .bin")


def run(args: argparse.Namespace) -> int:
    from prepare.unpack import unpack_dataset

    summary = unpack_dataset(args.dataset, args.out, workers=args.workers, reencode=args.reencode, npy=args.npy,
                             progress=not args.no_progress, jpeg_quality=args.jpeg_quality)
    if summary["train"] is None:
        print(f"unpack: {args.dataset}: no train.rec (verification sets only)")
    else:
        print(f"unpack: train: {format_rec_summary(summary['train'])}")
    for name, s in summary["bins"].items():
        print(f"unpack: {name}: {format_bin_summary(dict(s, npy=args.npy))}")
    print(f"unpack: {args.dataset} -> {args.out}: training set and {len(summary['bins'])} verification sets "
          f"in {summary['seconds']:.1f} s")
    return 0


COMMAND = Command(
    "unpack",
    "Unpack a whole dataset folder: train.rec -> OUT/train/<class>/, each X.bin -> OUT/X/ (+ pairs.txt).",
    "python prepare_data.py unpack datasets/faces_emore images/faces_emore --workers 8 --npy",
    add_args, run)
