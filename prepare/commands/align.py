"""``prepare_data.py align``: 5-point similarity alignment of a folder of images to 112x112 (or 112x96)."""

from __future__ import annotations

import argparse
import os
import sys

from prepare.commands.base import Command

_SHOWN = 20  # problems printed on stderr; all of them go to OUT/align_problems.txt


def add_args(p: argparse.ArgumentParser) -> None:
    from prepare.align import TEMPLATES

    p.add_argument("src", metavar="SRC", help="folder of images (class sub-folders are kept)")
    p.add_argument("out", metavar="OUT", help="output folder: SRC's relative paths, same file formats")
    p.add_argument("--landmarks", required=True, metavar="FILE",
                   help="one line per image: path relative to SRC and x1 y1 ... x5 y5 (left eye, right eye, "
                        "nose, left mouth, right mouth; pixels), whitespace or commas between fields")
    p.add_argument("--size", default="112x112", choices=[f"{h}x{w}" for h, w in TEMPLATES],
                   help="output HEIGHTxWIDTH (112x96: the ArcFace template moved 8 px left, as insightface)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="quality of written JPEGs (PNGs stay lossless)")
    p.add_argument("--workers", type=int, default=1, help="aligning processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _report(problems: list[str], out: str) -> None:
    """Print the first problems on stderr; when there are more, write them all to OUT/align_problems.txt."""
    from utils.atomic import write_text

    for line in problems[:_SHOWN]:
        print(f"skipped: {line}", file=sys.stderr)
    if len(problems) <= _SHOWN:
        return
    path = os.path.join(out, "align_problems.txt")
    write_text(path, "".join(f"{p}\n" for p in problems))
    print(f"... {len(problems) - _SHOWN} more; all {len(problems)} listed in {path}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from prepare.align import align_folder

    h, w = (int(v) for v in args.size.split("x"))
    res = align_folder(args.src, args.out, args.landmarks, size=(h, w), jpeg_quality=args.jpeg_quality,
                       workers=args.workers, progress=not args.no_progress)
    _report(res["problems"], args.out)
    rate = res["aligned"] / max(res["seconds"], 1e-9)
    print(f"align: {res['aligned']} images aligned to {h}x{w} in {args.out}, {res['skipped']} skipped "
          f"({res['seconds']:.1f} s, {rate:.0f} img/s)")
    return 1 if res["skipped"] else 0


COMMAND = Command("align", "Align face images to the ArcFace 5-point template (similarity transform + warp).",
                 "python prepare_data.py align raw_faces/ datasets/aligned --landmarks raw_faces/landmarks.txt",
                 add_args, run)
