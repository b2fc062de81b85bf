"""Make, convert and check face-recognition data in insightface's layout, without mxnet.

    python prepare_data.py synth --out datasets/synth --identities 300 --images-per-id 20

Each subcommand is one function pair below (`add_<name>_args`, `run_<name>`)
registered in COMMANDS; the work itself lives in data/.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Dict, Sequence, Tuple

from utils.errors import fail, user_errors
from utils.runtime import keep_freed_memory

Command = Tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: Dict[str, Command] = {}


def register_command(name: str, help_text: str, example: str, add_fn: Callable[[argparse.ArgumentParser], None],
                     run_fn: Callable[[argparse.Namespace], int]) -> None:
    """Add subcommand `name`: `add_fn` declares its flags, `run_fn` does the work (returns the exit status)."""
    COMMANDS[name] = (f"{help_text}\n\nexample:\n  {example}", add_fn, run_fn)


def _add_synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (train.rec/.idx/property + seven .bin files)")
    p.add_argument("--identities", type=int, default=300, help="training identities (classes)")
    p.add_argument("--images-per-id", type=int, default=20, help="training images per identity")
    p.add_argument("--pairs", type=float, default=0.05,
                   help="fraction of the real pair counts for each .bin (lfw 6000 x 0.05 = 300 pairs)")
    p.add_argument("--difficulty", type=float, default=0.3,
                   help="scale of the nuisance variation (pose, light, occlusion...) and of how alike the "
                        "look-alike negatives are; 0.3 is learnable in minutes on a CPU, 1.0 is hard")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of the stored images")
    p.add_argument("--workers", type=int, default=1, help="rendering processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_synth(args: argparse.Namespace) -> int:
    from data.synth import generate_dataset

    t0 = time.perf_counter()
    summary = generate_dataset(args.out, identities=args.identities, images_per_id=args.images_per_id,
                               pairs=args.pairs, seed=args.seed, difficulty=args.difficulty,
                               jpeg_quality=args.jpeg_quality, progress=not args.no_progress, workers=args.workers)
    sets_txt = ", ".join(f"{k} {v['pairs']}" for k, v in summary["sets"].items())
    print(f"synth: {args.out}: {summary['train_images']} training images of {summary['train_classes']} "
          f"identities; verification pairs: {sets_txt} ({time.perf_counter() - t0:.1f} s)")
    return 0


register_command("synth", "Generate synthetic face identities in the insightface layout (train.rec + 7 .bin).",
                 "python prepare_data.py synth --out datasets/synth --identities 300 --images-per-id 20",
                 _add_synth, _run_synth)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_fn, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text.splitlines()[0], description=help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_fn(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    keep_freed_memory()
    try:
        return COMMANDS[args.command][2](args)
    except user_errors() as exc:
        fail(f"prepare_data.py {args.command}", exc)


if __name__ == "__main__":
    sys.exit(main())
