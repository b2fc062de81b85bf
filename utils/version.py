"""Which code produced a result: the git commit when run from a checkout."""

from __future__ import annotations

import os
import subprocess

PACKAGE_VERSION = "0.1.0"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_version() -> str:
    """'0.1.0+g<commit>[.dirty]' in a git checkout, else the package version."""
    try:
        rev = subprocess.run(["git", "-C", _ROOT, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", _ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{PACKAGE_VERSION}+g{rev}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return PACKAGE_VERSION
