"""``prepare_data.py pack``: an image folder or im2rec .lst -> train.rec/.idx/property (insightface layout)."""

from __future__ import annotations

import argparse
import sys

from prepare.commands.base import Command


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC",
                   help="image folder SRC/<class>/*, an im2rec .lst file, or a .rec / pack folder to repack")
    p.add_argument("out", metavar="OUT", help="output folder: train.rec, train.idx, property, classes.txt")
    p.add_argument("--root", default=None,
                   help="folder the .lst's image paths are relative to (default: the .lst's own folder)")
    p.add_argument("--size", default="112x112",
                   help="required image size HxW in pixels; other sizes are skipped unless --resize")
    p.add_argument("--resize", action="store_true", help="resize images of another size to --size (re-encoded)")
    p.add_argument("--quality", type=int, default=95,
                   help="JPEG quality (0-100) for images that are encoded (non-JPEG inputs, resized images); "
                        "JPEG inputs are stored unchanged")
    p.add_argument("--keep-png", action="store_true", help="store PNG inputs unchanged instead of encoding as JPEG")
    p.add_argument("--shuffle", action="store_true",
                   help="write image records in random file order (keys stay grouped by class)")
    p.add_argument("--seed", type=int, default=0, help="random seed of --shuffle")
    p.add_argument("--detect", action="store_true",
                   help="raw photos: find each image's face (MTCNN) and align it to --size before packing "
                        "(weights: pip install --no-deps facenet-pytorch==2.6.0)")
    p.add_argument("--face", choices=("largest", "central"), default="largest",
                   help="with --detect: which face of a photo")
    p.add_argument("--min-face", type=float, default=20.0, metavar="PIXELS",
                   help="with --detect: smallest face side kept (default 20)")
    p.add_argument("--min-score", type=float, default=0.8,
                   help="with --detect: smallest detector probability kept, 0-1 (default 0.8)")
    p.add_argument("--workers", type=int, default=1, help="processes reading and checking images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from prepare.pack import ImageRules, PackError, pack, parse_size, report_lines

    if not 0 <= args.quality <= 100:
        raise PackError(f"--quality {args.quality}: expected 0..100")
    detect = None
    if args.detect:
        from prepare.align import DetectRules, template

        if not 0 <= args.min_score <= 1 or args.min_face < 0:
            raise PackError(f"--min-score {args.min_score:g} / --min-face {args.min_face:g}: expected a "
                            "probability 0-1 and a size in pixels >= 0")
        template(parse_size(args.size))  # an aligned size must have a template
        detect = DetectRules(face=args.face, min_face=args.min_face, min_score=args.min_score)
    rules = ImageRules(size=parse_size(args.size), resize=args.resize, quality=args.quality,
                       keep_png=args.keep_png, detect=detect)
    result = pack(args.src, args.out, rules, root=args.root, shuffle=args.shuffle, seed=args.seed,
                  workers=args.workers, progress=not args.no_progress)
    problems, summary = report_lines(result)
    for line in problems:
        print(f"pack: {line}", file=sys.stderr)
    print(f"pack: {summary}")
    return 1 if result.skipped else 0


COMMAND = Command("pack", "Pack an image folder, an im2rec .lst or a .rec (repack) into train.rec/.idx/property "
                          "(insightface layout).",
                 "python prepare_data.py pack datasets/faces_folder datasets/faces_pack --workers 4\n"
                 "  python prepare_data.py pack photos/ datasets/mine --detect   (photos/<person>/*.jpg)",
                 add_args, run)
