"""``prepare_data.py unpack-rec``: a .rec pack -> ``OUT/<class>/<key>.<ext>``, payload bytes as stored."""

from __future__ import annotations

import argparse

from prepare.commands.base import Command


def add_rec_args(p: argparse.ArgumentParser) -> None:
    """Flags shared with ``unpack`` (which unpacks train.rec the same way)."""
    from prepare.unpack import REENCODE_FORMATS

    p.add_argument("--workers", type=int, default=4,
                   help="writer threads, each with its own reader (file I/O releases the GIL); default 4")
    p.add_argument("--format", "--reencode", dest="reencode", choices=REENCODE_FORMATS, default=None,
                   help="decode and re-encode every image as this format (colours kept: red stays red); "
                        "default: write the stored bytes unchanged, extension from their magic bytes")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality 0-100 for --format jpg")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def format_rec_summary(s: dict) -> str:
    """One line: images, written/skipped, classes, bytes, formats, seconds and rate."""
    kinds = ", ".join(f"{ext[1:]} {n}" for ext, n in s["formats"].items()) or "none"
    rate = s["written"] / s["seconds"] if s["seconds"] > 0 else 0.0
    return (f"{s['images']} images of {s['classes']} classes ({s['layout']} layout) -> {s['out']}: "
            f"{s['written']} written ({s['bytes'] / 1e6:.1f} MB; {kinds}), {s['skipped']} skipped as already "
            f"present, {s['seconds']:.1f} s ({rate:.0f} img/s)")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("rec", metavar="REC", help="a .rec file (with its .idx beside it) or a folder holding train.rec")
    p.add_argument("out", metavar="OUT", help="output folder: OUT/<class>/<key>.<ext>")
    add_rec_args(p)


def run(args: argparse.Namespace) -> int:
    from prepare.unpack import unpack_rec

    summary = unpack_rec(args.rec, args.out, workers=args.workers, reencode=args.reencode,
                         progress=not args.no_progress, jpeg_quality=args.jpeg_quality)
    print(f"unpack-rec: {args.rec}: {format_rec_summary(summary)}")
    return 0


COMMAND = Command(
    "unpack-rec",
    "Write every image of a .rec pack as OUT/<class>/<key>.<ext> (stored bytes unless --format; resumable).",
    "python prepare_data.py unpack-rec datasets/faces_emore images/faces_emore --workers 8",
    add_args, run)
