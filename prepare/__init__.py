"""The subcommands of ``prepare_data.py``: one module each, registered in COMMANDS.

A module here is CLI glue only (flags, one summary line, exit status); the work
lives in ``data/``. Adding a subcommand is adding a module that calls
:func:`register_command`; ``prepare_data.py`` imports every module here.
"""

from __future__ import annotations

import argparse
from typing import Callable, Dict, NamedTuple


class Command(NamedTuple):
    help: str  # first line: the one-line summary; then an example
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]  # returns the exit status


COMMANDS: Dict[str, Command] = {}


def register_command(name: str, help_text: str, example: str, add_fn: Callable[[argparse.ArgumentParser], None],
                     run_fn: Callable[[argparse.Namespace], int]) -> None:
    """Add subcommand `name`: `add_fn` declares its flags, `run_fn` does the work (returns the exit status)."""
    if name in COMMANDS:
        raise ValueError(f"prepare_data subcommand {name!r} registered twice")
    COMMANDS[name] = Command(f"{help_text}\n\nexample:\n  {example}", add_fn, run_fn)
