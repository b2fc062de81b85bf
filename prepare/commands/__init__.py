"""The subcommands of ``prepare_data.py``, one module each, listed in COMMANDS in --help order.

A module here is CLI glue only (flags, one summary line, exit status); the work lives in the
modules of ``prepare/`` beside this package. Adding a subcommand is a module defining
``COMMAND`` plus one entry below.
"""

from __future__ import annotations

from typing import Dict

from prepare.commands import align, inspect, make_bin, pack, synth, unpack, unpack_bin, unpack_rec
from prepare.commands.base import Command

COMMANDS: Dict[str, Command] = {c.name: c for c in (
    unpack.COMMAND, unpack_rec.COMMAND, unpack_bin.COMMAND, pack.COMMAND, make_bin.COMMAND, inspect.COMMAND,
    align.COMMAND, synth.COMMAND)}
