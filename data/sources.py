"""Where training images come from: one small class per on-disk layout.

A source gives encoded image bytes and integer labels by index and knows how
to name a record in an error message. Sources are picked by `open_source`,
which asks each registered kind whether it recognises the path.
"""

from __future__ import annotations

import os
from typing import Callable, List, Protocol, Tuple

import numpy as np

from utils.errors import UserError
from utils.files import max_image_bytes, read_regular
from utils.registry import Registry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Class counts up to this are always accepted (a head of 2**24 classes is already far past every
# public dataset: WebFace42M has 2M); above it a count must not exceed the number of images/records,
# so a damaged label or `property` (10**12 classes) is refused before anything that size is allocated.
CLASS_LIMIT = 1 << 24


class DataSourceError(UserError, ValueError):
    """A training data path that is missing or malformed (one line, names the path)."""


def class_limit(records: int) -> int:
    """Largest class count believable for a dataset of ``records`` images or records (see CLASS_LIMIT)."""
    return max(CLASS_LIMIT, int(records))


def printable(text: str) -> str:
    """``text`` safe to print or write as UTF-8: undecodable file-name bytes (surrogates) become ``\\xNN``."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class FaceSource(Protocol):
    path: str
    num_classes: int
    labels: np.ndarray  # int64, one per image

    def __len__(self) -> int: ...

    def read(self, index: int) -> bytes: ...

    def describe(self, index: int) -> str: ...


SOURCES = Registry("data source")
_DETECTORS: List[Tuple[str, Callable[[str], bool]]] = []


def register_source(name: str, detect: Callable[[str], bool]):
    """Register a source class with a predicate that recognises its paths."""

    def deco(cls):
        SOURCES.register(name)(cls)
        _DETECTORS.append((name, detect))
        return cls

    return deco


def _is_rec(path: str) -> bool:
    return path.endswith(".rec") or os.path.isfile(os.path.join(path, "train.rec"))


def _is_folder(path: str) -> bool:
    return os.path.isdir(path) and not os.path.isfile(os.path.join(path, "train.rec"))


@register_source("rec", _is_rec)
class RecSource:
    """An insightface pack or plain im2rec .rec (+ .idx, optional property)."""

    def __init__(self, path: str) -> None:
        from data.facerec import FaceRec, read_property  # local: keeps import of this module light

        rec = os.path.join(path, "train.rec") if os.path.isdir(path) else path
        if not os.path.isfile(rec):
            raise DataSourceError(f"{rec}: no such .rec file")
        self.path = rec
        self._rec = FaceRec(rec)
        self.labels = np.asarray(self._rec.labels, dtype=np.int64)
        self.num_classes = int(self._rec.num_classes)
        prop = os.path.join(os.path.dirname(os.path.abspath(rec)), "property")
        if os.path.isfile(prop):
            # `property` declares the class count the head is sized for; a label at or
            # beyond it is an error in the data (check_labels names the record), not a
            # reason to silently grow the head.
            self.num_classes = read_property(prop, records=len(self._rec.reader))[0]

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int) -> bytes:
        payload, _ = self._rec.read(index)
        return payload

    def describe(self, index: int) -> str:
        return f"{self.path} record {int(self._rec.image_keys[index])}"


@register_source("folder", _is_folder)
class FolderSource:
    """Aligned images in `root/<class>/<image>`; classes in sorted name order."""

    def __init__(self, path: str) -> None:
        if not os.path.isdir(path):
            raise DataSourceError(f"{path}: no such directory")
        classes = sorted(d.name for d in os.scandir(path) if d.is_dir())
        if not classes:
            raise DataSourceError(f"{path}: no class sub-folders (expected {path}/<class>/<image>.jpg)")
        files: List[str] = []
        labels: List[int] = []
        for label, cls in enumerate(classes):
            names = sorted(f for f in os.listdir(os.path.join(path, cls)) if f.lower().endswith(IMAGE_EXTENSIONS))
            files.extend(os.path.join(cls, f) for f in names)
            labels.extend([label] * len(names))
        if not files:
            raise DataSourceError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
        self.path = path
        self.classes = classes
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = len(classes)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> bytes:
        """The file's bytes; a FIFO, device or over-cap file raises UnreadableFileError unread."""
        return read_regular(os.path.join(self.path, self.files[index]), "image", max_image_bytes())

    def describe(self, index: int) -> str:
        return os.path.join(self.path, self.files[index])


def _is_lst(path: str) -> bool:
    return path.endswith(".lst") and os.path.isfile(path)


@register_source("lst", _is_lst)
class LstSource:
    """An im2rec list file: images read from disk (paths relative to the list's folder, or
    ``root``), labels from the list's first label column. ``num_classes`` is the count in a
    ``property`` file beside the list when there is one, else max label + 1."""

    def __init__(self, path: str, root: str | None = None) -> None:
        from data.facerec import read_property  # local: keeps import of this module light
        from data.lst import read_lst

        lst = read_lst(path, root)
        self.path = path
        self.files = lst.paths
        self.lines = lst.lines
        self.labels = lst.labels
        top = int(self.labels.max()) + 1
        if top > class_limit(len(self.labels)):
            i = int(np.argmax(self.labels))
            raise DataSourceError(f"{self.describe(i)}: label {top - 1} is far beyond the {len(self.labels)} "
                                  f"images listed (more than {class_limit(len(self.labels))} classes); "
                                  "labels must be class ids 0..C-1")
        self.classes = [str(c) for c in range(top)]
        prop = os.path.join(os.path.dirname(os.path.abspath(path)), "property")
        self.num_classes = read_property(prop, records=len(self.labels))[0] if os.path.isfile(prop) else top

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> bytes:
        """The file's bytes; a FIFO, device or over-cap file raises UnreadableFileError unread."""
        try:
            return read_regular(self.files[index], "image", max_image_bytes())
        except OSError as exc:
            raise DataSourceError(f"{self.describe(index)}: cannot read ({exc.strerror or exc})") from None

    def describe(self, index: int) -> str:
        return f"{self.files[index]} ({self.path} line {int(self.lines[index])})"


def open_source(path: str) -> FaceSource:
    """Open one training data path with the first source kind that recognises it."""
    if not os.path.exists(path):
        raise DataSourceError(f"{path}: no such file or directory")
    for name, detect in _DETECTORS:
        if detect(path):
            source = SOURCES.build(name, path)
            check_labels(source)
            return source
    raise DataSourceError(f"{path}: not a training source (expected a folder with train.rec, a .rec file, "
                          f"an image folder root/<class>/*.jpg, or an im2rec .lst file)")


def check_labels(source: FaceSource) -> None:
    """Every label must lie in [0, num_classes): name the first record that does not."""
    labels = source.labels
    if len(labels) == 0:
        raise DataSourceError(f"{source.path}: holds no images")
    bad = np.flatnonzero((labels < 0) | (labels >= source.num_classes))
    if len(bad):
        i = int(bad[0])
        raise DataSourceError(printable(f"{source.describe(i)}: label {int(labels[i])} outside "
                                        f"[0, {source.num_classes}) ({len(bad)} such records)"))
