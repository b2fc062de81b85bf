"""``prepare_data.py inspect``: what a .rec, a .bin or a dataset folder holds, and what is wrong with it."""

from __future__ import annotations

import argparse

from prepare.commands.base import Command


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a .rec (its .idx and property beside it), a .bin, or a dataset folder")
    p.add_argument("--full", action="store_true",
                   help="read and decode every record and image, listing each bad one by key (default: the "
                        "index, the labels and --sample random images)")
    p.add_argument("--sample", type=int, default=200, help="images decoded per file without --full")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sample")
    p.add_argument("--plot", default="class_counts.png",
                   help="PNG histogram of images per class of the .rec (default: class_counts.png in the "
                        "current folder)")
    p.add_argument("--no-plot", action="store_true", help="do not write the histogram PNG")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the full report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (shown with --full)")


def run(args: argparse.Namespace) -> int:
    from prepare.inspection import inspect_path, summary_lines
    from utils.atomic import write_json

    reports = inspect_path(args.path, full=args.full, sample=args.sample, seed=args.seed,
                           progress=args.full and not args.no_progress, plot=None if args.no_plot else args.plot)
    for report in reports:
        print("\n".join(summary_lines(report)))
    if args.json:
        write_json(args.json, reports)
    problems = sum(r["problem_count"] for r in reports)
    checked = "every record" if args.full else f"a sample of up to {args.sample} images per file"
    print(f"inspect: {len(reports)} file(s), {checked}: " + (f"{problems} problem(s)" if problems else "no problems"))
    return 1 if problems else 0


COMMAND = Command("inspect", "Report what a .rec, a .bin or a dataset folder holds; --full lists every bad record.",
                 "python prepare_data.py inspect datasets/faces_emore --full --json inspect.json",
                 add_args, run)
