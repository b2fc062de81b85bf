"""im2rec list files (``.lst``): which image file has which class, one line per image.

Two line forms are read (shared/reference/FORMATS.md):

- im2rec's ``index<TAB>label[<TAB>label...]<TAB>relative/path.jpg``; labels are written as
  floats (``17.000000``); with several label columns the first is the class id;
- ``path label`` (whitespace-separated, the label last, so a path may hold spaces), or
  ``path<TAB>label``.

Paths are relative to the list's folder (im2rec's convention), or to ``root`` when given;
absolute paths are kept. Blank lines are skipped. Shared by the "lst" training source
(data/sources.py) and ``prepare_data.py pack`` (prepare/pack.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List

import numpy as np

from data.sources import DataSourceError

_FORMS = "expected 'index<TAB>label<TAB>path' or 'path label'"
MAX_CLASS_ID = (1 << 31) - 1  # a class id must fit the int32 a head or a loss indexes with


class ListFileError(DataSourceError):
    """A .lst line that is not an im2rec list entry; the message names the file and line."""


@dataclass(frozen=True)
class ListFile:
    """A parsed .lst: for each image its resolved path, class id and 1-based line number."""

    path: str
    root: str
    paths: List[str]
    labels: np.ndarray  # int64 class ids (the first label column)
    lines: np.ndarray  # int64 line numbers, for error messages

    def __len__(self) -> int:
        return len(self.paths)


def _class_id(token: str, where: str) -> int:
    """A label column as a class id: a number (``17`` or ``17.000000``) that is a whole number >= 0."""
    try:
        value = float(token)
    except ValueError:
        raise ListFileError(f"{where}: label {token[:40]!r} is not a number ({_FORMS})") from None
    if not math.isfinite(value) or not value.is_integer() or not 0 <= value <= MAX_CLASS_ID:
        raise ListFileError(f"{where}: label {token[:40]} is not a class id (a whole number 0..{MAX_CLASS_ID})")
    return int(value)


def parse_line(text: str, where: str) -> tuple[str, int]:
    """(relative path, class id) of one list line; ``where`` names it in errors ("x.lst line 3")."""
    if "\t" in text:
        fields = text.split("\t")
        if len(fields) >= 3:  # index, label(s), path
            index, labels, rel = fields[0], fields[1:-1], fields[-1]
            try:
                int(index)
            except ValueError:
                raise ListFileError(f"{where}: index {index[:40]!r} is not an integer ({_FORMS})") from None
            label = labels[0]
        else:
            rel, label = fields
    else:
        fields = text.rsplit(None, 1)
        if len(fields) != 2:
            raise ListFileError(f"{where}: {text[:60]!r} has no label ({_FORMS})")
        rel, label = fields
    rel = rel.strip()
    if not rel:
        raise ListFileError(f"{where}: empty image path ({_FORMS})")
    return rel, _class_id(label.strip(), where)


def read_lst(path: str | os.PathLike, root: str | os.PathLike | None = None) -> ListFile:
    """Parse a whole .lst; image paths resolved against ``root`` (default: the list's folder)."""
    path = os.fspath(path)
    base = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(path))
    if not os.path.isfile(path):
        raise ListFileError(f"{path}: no such list file")
    if not os.path.isdir(base):
        raise ListFileError(f"{base}: image root of {path} is not a directory")
    paths: List[str] = []
    labels: List[int] = []
    lines: List[int] = []
    # surrogateescape: non-UTF-8 names still map back to the bytes on disk (as os.listdir gives them)
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        for n, raw in enumerate(fh, start=1):
            text = raw.rstrip("\r\n")
            if not text.strip():
                continue
            rel, label = parse_line(text, f"{path} line {n}")
            paths.append(os.path.join(base, rel))
            labels.append(label)
            lines.append(n)
    if not paths:
        raise ListFileError(f"{path}: no entries ({_FORMS} per line)")
    return ListFile(path, base, paths, np.asarray(labels, dtype=np.int64), np.asarray(lines, dtype=np.int64))
