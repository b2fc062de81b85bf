"""Make, convert and check face-recognition data in insightface's layout, without mxnet.

    python prepare_data.py synth --out datasets/synth --identities 300 --images-per-id 20
    python prepare_data.py COMMAND --help        # each subcommand, with an example

Each subcommand is a module in prepare/commands/ (flags and reporting), listed in
prepare/commands/__init__.py; the work itself lives in prepare/.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from prepare.commands import COMMANDS
from utils.errors import fail, user_errors
from utils.runtime import keep_freed_memory


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help.splitlines()[0], description=command.help,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    keep_freed_memory()
    try:
        return COMMANDS[args.command].run(args)
    except user_errors() as exc:  # OSError included: a full or read-only output folder is one line too
        out = getattr(args, "out", "")
        fail(f"prepare_data.py {args.command}", exc, where=f"writing under {out}" if out else "")


if __name__ == "__main__":
    sys.exit(main())
