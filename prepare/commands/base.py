"""What a ``prepare_data.py`` subcommand is: a name, its help, its flags and what it runs."""

from __future__ import annotations

import argparse
from typing import Callable, NamedTuple


class Command(NamedTuple):
    name: str  # as typed: `prepare_data.py NAME`
    summary: str  # one line, for the command list
    example: str  # one command line, shown under the summary in `NAME --help`
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]  # returns the exit status

    @property
    def help(self) -> str:
        return f"{self.summary}\n\nexample:\n  {self.example}"
