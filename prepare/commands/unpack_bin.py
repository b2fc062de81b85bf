"""``prepare_data.py unpack-bin``: a verification .bin -> ``OUT/<i>.<ext>`` + ``OUT/pairs.txt``."""

from __future__ import annotations

import argparse

from prepare.commands.base import Command


def format_bin_summary(s: dict) -> str:
    """One line: images, pairs, bytes, formats, seconds."""
    kinds = ", ".join(f"{ext[1:]} {n}" for ext, n in s["formats"].items()) or "none"
    npy = " + images.npy, issame.npy" if s.get("npy") else ""
    return (f"{s['images']} images, {s['pairs']} pairs ({s['same']} same) -> {s['out']} + pairs.txt{npy}: "
            f"{s['bytes'] / 1e6:.1f} MB ({kinds}), {s['seconds']:.1f} s")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bin", metavar="BIN", help="a verification .bin (lfw.bin, cfp_fp.bin, ...)")
    p.add_argument("out", metavar="OUT", help="output folder: OUT/<i>.<ext> and OUT/pairs.txt")
    p.add_argument("--npy", action="store_true",
                   help="also write OUT/images.npy ((2N, 112, 112, 3) uint8 RGB) and OUT/issame.npy")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from prepare.unpack import unpack_bin

    summary = unpack_bin(args.bin, args.out, npy=args.npy, progress=not args.no_progress)
    print(f"unpack-bin: {args.bin}: {format_bin_summary(dict(summary, npy=args.npy))}")
    return 0


COMMAND = Command(
    "unpack-bin",
    "Write the 2N images of a verification .bin as OUT/<i>.<ext> and the pairs as OUT/pairs.txt.",
    "python prepare_data.py unpack-bin datasets/faces_emore/lfw.bin images/lfw --npy",
    add_args, run)
