"""``prepare_data.py make-bin``: a verification .bin from an images folder and a pairs file."""

from __future__ import annotations

import argparse
import sys

from prepare.commands.base import Command


def add_args(p: argparse.ArgumentParser) -> None:
    from data.bins import BIN_KINDS

    p.add_argument("images", metavar="IMAGES", help="the images folder the pairs file's paths are relative to")
    p.add_argument("pairs", metavar="PAIRS",
                   help="pairs file: ours ('<a> <b> <1|0>' per line) or LFW's pairs.txt (detected)")
    p.add_argument("out", metavar="OUT.bin", help="the .bin to write")
    p.add_argument("--kind", choices=BIN_KINDS, default="bytes",
                   help="how images are pickled: Python 3 bytes (default), Python 2 str like the original "
                        "insightface files, or 1-D numpy uint8 arrays")
    p.add_argument("--detect", action="store_true",
                   help="raw photos: find each image's face (MTCNN, the largest) and align it to 112x112 "
                        "(weights: pip install --no-deps facenet-pytorch==2.6.0)")
    p.add_argument("--min-face", type=float, default=20.0, metavar="PIXELS",
                   help="with --detect: smallest face side kept (default 20)")
    p.add_argument("--min-score", type=float, default=0.8,
                   help="with --detect: smallest detector probability kept, 0-1 (default 0.8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from data.bins import NFOLDS
    from prepare.pairs import make_bin

    detect = None
    if args.detect:
        from prepare.align import DetectRules

        detect = DetectRules(face="largest", min_face=args.min_face, min_score=args.min_score)
    s = make_bin(args.images, args.pairs, args.out, kind=args.kind, progress=not args.no_progress, min_pairs=NFOLDS,
                 detect=detect)
    converted = f", {s['converted']} converted to PNG" if s["converted"] else ""
    print(f"make-bin: {args.out}: {s['pairs']} pairs ({s['same']} same), {s['images']} images "
          f"({s['unique_images']} files{converted}), {s['bytes'] / 1e6:.1f} MB ({args.kind}), {s['seconds']:.1f} s")
    if s["warning"]:
        print(f"make-bin: warning: {args.out}: {s['warning']}; its verification accuracy will "
              "not measure the model", file=sys.stderr)
    return 0


COMMAND = Command(
    "make-bin",
    "Make a verification .bin from an images folder and a pairs file (ours or LFW's pairs.txt).",
    "python prepare_data.py make-bin lfw-deepfunneled-aligned lfw/pairs.txt datasets/mine/lfw.bin",
    add_args, run)
