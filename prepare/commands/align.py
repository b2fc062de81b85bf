"""``prepare_data.py align``: 5-point similarity alignment of a folder of images to 112x112 (or 112x96),
with the landmarks from a file or found by the face detector (--detect)."""

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
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--landmarks", metavar="FILE",
                   help="one line per image: path relative to SRC and x1 y1 ... x5 y5 (left eye, right eye, "
                        "nose, left mouth, right mouth; pixels), whitespace or commas between fields")
    how.add_argument("--detect", action="store_true",
                     help="find the faces with MTCNN (weights: pip install --no-deps facenet-pytorch==2.6.0)")
    p.add_argument("--face", choices=("largest", "central", "all"), default="largest",
                   help="with --detect: which face of a photo (all: every face, numbered NAME_0, NAME_1, ...)")
    p.add_argument("--min-face", type=float, default=20.0, metavar="PIXELS",
                   help="with --detect: smallest face side kept (default 20)")
    p.add_argument("--min-score", type=float, default=0.8,
                   help="with --detect: smallest detector probability kept, 0-1 (default 0.8)")
    p.add_argument("--save-landmarks", metavar="FILE",
                   help="with --detect: write the chosen faces' landmarks in the --landmarks format")
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
    from prepare.align import AlignError, DetectRules, align_folder, detect_folder

    h, w = (int(v) for v in args.size.split("x"))
    if not args.detect:
        used = [f for f, v in (("--save-landmarks", args.save_landmarks), ("--face", args.face != "largest"))
                if v]
        if used:
            raise AlignError(f"{used[0]} needs --detect (with --landmarks the faces are given)")
        res = align_folder(args.src, args.out, args.landmarks, size=(h, w), jpeg_quality=args.jpeg_quality,
                           workers=args.workers, progress=not args.no_progress)
    else:
        if not 0 <= args.min_score <= 1 or args.min_face < 0:
            raise AlignError(f"--min-score {args.min_score:g} / --min-face {args.min_face:g}: expected a "
                             "probability 0-1 and a size in pixels >= 0")
        rules = DetectRules(face=args.face, min_face=args.min_face, min_score=args.min_score)
        res = detect_folder(args.src, args.out, rules, size=(h, w), jpeg_quality=args.jpeg_quality,
                            save_landmarks=args.save_landmarks, progress=not args.no_progress)
    _report(res["problems"], args.out)
    rate = res["aligned"] / max(res["seconds"], 1e-9)
    print(f"align: {res['aligned']} images aligned to {h}x{w} in {args.out}, {res['skipped']} skipped "
          f"({res['seconds']:.1f} s, {rate:.0f} img/s)")
    return 1 if res["skipped"] else 0


COMMAND = Command("align", "Align face images to the ArcFace 5-point template (similarity transform + warp).",
                 "python prepare_data.py align raw_faces/ datasets/aligned --landmarks raw_faces/landmarks.txt\n"
                 "  python prepare_data.py align photos/ datasets/aligned --detect --save-landmarks lm.txt",
                 add_args, run)
