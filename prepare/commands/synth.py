"""``prepare_data.py synth``: write a synthetic, learnable dataset in insightface's layout."""

from __future__ import annotations

import argparse
import time

from prepare.commands.base import Command


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True,
                   help="output folder (train.rec/.idx/property + seven .bin files; with --ijb also OUT/IJBC)")
    p.add_argument("--identities", type=int, default=300, help="training identities (classes)")
    p.add_argument("--images-per-id", type=int, default=20, help="training images per identity")
    p.add_argument("--pairs", type=float, default=0.05,
                   help="fraction of the real pair counts for each .bin (lfw 6000 x 0.05 = 300 pairs), "
                        "rounded to a multiple of 20, at least 20")
    p.add_argument("--difficulty", type=float, default=0.3,
                   help="scale of the nuisance variation (pose, light, occlusion...) and of how alike the "
                        "look-alike negatives are; 0.3 is learnable in minutes on a CPU, 1.0 is hard")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of the stored images")
    p.add_argument("--workers", type=int, default=1, help="rendering processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    ijb = p.add_argument_group("synthetic IJB set (the release layout: OUT/IJBC/loose_crop + meta)")
    ijb.add_argument("--ijb", action="store_true",
                     help="also write a synthetic IJB-C (or --ijb-target IJBB) set of held-out identities under OUT")
    ijb.add_argument("--ijb-only", action="store_true", help="write only the IJB set (implies --ijb)")
    ijb.add_argument("--ijb-target", choices=["IJBC", "IJBB"], default="IJBC",
                     help="folder and file names: IJBC (ijbc_*, galleries G1/G2) or IJBB (ijbb_*, S1/S2)")
    ijb.add_argument("--ijb-subjects", type=int, default=200,
                     help="IJB subjects: each has 1 gallery template and 2 probe templates, ~13 faces in all; "
                          "pairs = 2 x subjects^2 (every probe against every gallery template)")


def run(args: argparse.Namespace) -> int:
    if not args.ijb_only:
        _run_pack(args)
    if args.ijb or args.ijb_only:
        _run_ijb(args)
    return 0


def _run_ijb(args: argparse.Namespace) -> None:
    from prepare.synth import generate_ijb

    s = generate_ijb(args.out, subjects=args.ijb_subjects, seed=args.seed, difficulty=args.difficulty,
                     jpeg_quality=args.jpeg_quality, target=args.ijb_target, workers=args.workers,
                     progress=not args.no_progress)
    galleries = ", ".join(f"{k} {v}" for k, v in s["gallery_subjects"].items())
    print(f"synth: {s['root']}: {s['faces']} faces, {s['media']} media, {s['templates']} templates "
          f"(gallery subjects {galleries}; {s['probe_templates']} probe templates), {s['pairs']} pairs "
          f"({s['genuine']} genuine) ({s['seconds']:.1f} s)")


def _run_pack(args: argparse.Namespace) -> None:
    from prepare.synth import generate_dataset

    t0 = time.perf_counter()
    summary = generate_dataset(args.out, identities=args.identities, images_per_id=args.images_per_id,
                               pairs=args.pairs, seed=args.seed, difficulty=args.difficulty,
                               jpeg_quality=args.jpeg_quality, progress=not args.no_progress, workers=args.workers)
    sets_txt = ", ".join(f"{k} {v['pairs']}" for k, v in summary["sets"].items())
    print(f"synth: {args.out}: {summary['train_images']} training images of {summary['train_classes']} "
          f"identities; verification pairs: {sets_txt} ({time.perf_counter() - t0:.1f} s)")


COMMAND = Command("synth", "Generate synthetic face identities in the insightface layout (train.rec + 7 .bin).",
                 "python prepare_data.py synth --out datasets/synth --identities 300 --images-per-id 20",
                 add_args, run)
