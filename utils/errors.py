"""The errors a user can cause (bad paths, files, names, values) and how scripts report them.

Scripts catch exactly these and print one line; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import NoReturn, Tuple, Type


def user_errors() -> Tuple[Type[BaseException], ...]:
    """Exception types that mean bad input, not a bug (imported lazily: no import cost).

    Scripts add config.ConfigError themselves (utils does not import the config layer).
    """
    from data.bins import BinFormatError
    from data.recordio import RecordIOError
    from data.sources import DataSourceError
    from utils.checkpoint import CheckpointError
    from utils.files import UnreadableFileError
    from utils.registry import UnknownNameError

    return (BinFormatError, RecordIOError, DataSourceError, CheckpointError, UnknownNameError, UnreadableFileError,
            FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def fail(prog: str, exc: BaseException) -> NoReturn:
    """Print `prog: error: <one line>` to stderr and exit with status 2."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"{prog}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)
