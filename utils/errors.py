"""The errors a user can cause (bad paths, files, names, values) and how scripts report them.

Scripts catch exactly these (UserError and OSError) and print one line; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import NoReturn, Tuple, Type


class UserError(Exception):
    """Base of every error a user can cause (a bad file, record, name, flag or value): one line,
    naming the thing that is wrong. Each room defines its own subclass (BinFormatError,
    RecordIOError, CheckpointError, ConfigError, ...), also a ValueError where callers expect one."""


def user_errors() -> Tuple[Type[BaseException], ...]:
    """Exception types that mean bad input, not a bug: what scripts catch and print as one line.

    OSError too: a missing, unreadable or unwritable path, a full or read-only disk is the
    user's machine, not our code (FileNotFoundError, PermissionError, ... are subclasses).
    """
    return (UserError, OSError)


def message(exc: BaseException, where: str = "") -> str:
    """The one line a user error prints: its first line; an OSError that names no file gets `where`.

    str(OSError) is "[Errno 28] No space left on device: 'path'" when the error carries its
    filename; a failed write() carries none, so `where` (e.g. "writing under runs/x") says where.
    """
    text = str(exc).strip()
    msg = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None and where:
        msg = f"{msg} ({where})"
    return msg


def fail(prog: str, exc: BaseException, where: str = "") -> NoReturn:
    """Print `prog: error: <one line>` to stderr and exit with status 2 (`where`: see `message`)."""
    print(f"{prog}: error: {message(exc, where)}", file=sys.stderr)
    raise SystemExit(2)
