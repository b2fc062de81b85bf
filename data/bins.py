"""Verification ``.bin`` files (lfw, cfp_fp, agedb_30, ...): a pickle of ``(bins, issame_list)``.

``bins`` holds 2N encoded images (pair i = items 2i and 2i+1): Python 2 ``str`` in the
original insightface files; Python 3 ``bytes``, ``bytearray``, numpy uint8 arrays (encoded
bytes or RGB pixels), a numpy object array of bytes or one (2N, H, W, 3) pixel array in
re-made ones. ``issame_list`` holds N booleans (Python or numpy bools, 0/1 integers, or a
bool array). These files come from the internet and a pickle can run code on load, so they
are read with an unpickler that resolves only the few globals this data needs (numpy array
and bool/integer scalar reconstruction, latin-1 ``_codecs.encode``, ``bytes``/``bytearray``
from bytes) and refuses any other, before anything is called.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from typing import Sequence

import cv2
import numpy as np
from tqdm import tqdm

from utils.atomic import write_bytes

_ALLOWED_WHAT = "only image bytes, numpy arrays and bool/integer flags are allowed"


class BinFormatError(ValueError):
    """A .bin that is not a verification pickle; the message names the file and, where known, the item."""


class _Refused(pickle.UnpicklingError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _latin1_encode(obj, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 protocol-2 pickles use it for bytes: latin-1 text -> bytes only."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise _Refused(f"_codecs.encode({type(obj).__name__}, {encoding!r})")
    return obj.encode("latin-1")


def _empty_bytes(*args) -> bytes:
    """``bytes()`` as Python 3 protocol-2 pickles write ``b''``; any argument is refused."""
    if args:
        raise _Refused(f"builtins.bytes with {len(args)} arguments")
    return b""


def _bytearray(*args) -> bytearray:
    """``bytearray(b)`` or ``bytearray(text, 'latin-1')``, as pickles write image bytes held in a bytearray."""
    if len(args) == 1 and isinstance(args[0], bytes):
        return bytearray(args[0])
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return bytearray(args[0].encode("latin-1"))
    if not args:
        return bytearray()
    raise _Refused(f"builtins.bytearray with arguments of type {[type(a).__name__ for a in args]}")


_NUMPY_SCALAR = np.bool_(True).__reduce__()[0]


def _scalar(dtype, data=None):
    """numpy's ``scalar``, for bool and integer dtypes only (an ``issame`` of numpy bools)."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biu" or not isinstance(data, bytes):
        raise _Refused(f"numpy scalar of dtype {dtype!r}")
    return _NUMPY_SCALAR(dtype, data)


_NUMPY_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1, np.uint8))[0]
_NUMPY_FROMBUFFER = np.ndarray.__reduce_ex__(np.zeros(1, np.uint8), 5)[0]


def _reconstruct(subtype, shape, dtype):
    """numpy's ``_reconstruct``, for plain ndarrays only (a subclass would be arbitrary code)."""
    if subtype is not np.ndarray:
        raise _Refused(f"numpy array subclass {subtype!r}")
    return _NUMPY_RECONSTRUCT(subtype, shape, dtype)


# (module, name) as written in the pickle -> what it resolves to. numpy 1.x writes
# numpy.core.*, numpy 2.x numpy._core.*; protocols 2-4 use _reconstruct (+ _codecs.encode
# for the data at protocol 2), protocol 5 uses _frombuffer. Python 3 writes b'' at protocol 2
# as __builtin__.bytes().
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _NUMPY_FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _NUMPY_FROMBUFFER,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
    ("__builtin__", "bytearray"): _bytearray,
    ("builtins", "bytearray"): _bytearray,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in ``_ALLOWED``; every other global is refused, never imported."""

    def find_class(self, module: str, name: str):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found


def _unpickle(path: str, data: bytes):
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _Refused as exc:
        raise BinFormatError(f"{path}: refused to unpickle {exc.name} ({_ALLOWED_WHAT})") from None
    except Exception as exc:  # any malformed stream: EOFError, UnpicklingError, ValueError, ...
        raise BinFormatError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None


def load_bin(path: str | os.PathLike) -> tuple[list[bytes | np.ndarray], np.ndarray]:
    """The 2N items and N ``issame`` flags (bool array) of a verification .bin.

    Items are ``bytes`` (encoded image) or numpy uint8 arrays: 1-D = encoded image bytes,
    (H, W, 3) = decoded RGB pixels.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise BinFormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    obj = _unpickle(path, data)
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise BinFormatError(f"{path}: expected a pickled 2-tuple (bins, issame_list), got {type(obj).__name__}"
                             + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else ""))
    bins, issame = obj
    if isinstance(bins, np.ndarray) and (bins.dtype == object and bins.ndim == 1 or bins.dtype == np.uint8
                                         and bins.ndim == 4 and bins.shape[3] == 3):
        bins = list(bins)  # an object array of encoded images, or all the RGB pixels in one (2N, H, W, 3) array
    if not isinstance(bins, (list, tuple)):
        raise BinFormatError(f"{path}: bins is a {type(bins).__name__}, expected a list of images")
    if isinstance(issame, np.ndarray):
        issame = issame.tolist()
    if not isinstance(issame, (list, tuple)):
        raise BinFormatError(f"{path}: issame_list is a {type(issame).__name__}, expected a list of bools")
    if len(bins) != 2 * len(issame):
        raise BinFormatError(f"{path}: {len(bins)} images but {len(issame)} pairs in issame_list "
                             f"(expected 2 x {len(issame)} = {2 * len(issame)} images)")
    flags = np.empty(len(issame), dtype=bool)
    for i, v in enumerate(issame):
        if not isinstance(v, (bool, np.bool_, int, np.integer)) or v not in (0, 1):
            raise BinFormatError(f"{path}: issame_list item {i} is {v!r}, expected a bool")
        flags[i] = bool(v)
    items: list[bytes | np.ndarray] = []
    for i, item in enumerate(bins):
        if isinstance(item, (bytes, bytearray)):
            items.append(bytes(item))
        elif isinstance(item, np.ndarray) and item.dtype == np.uint8 and (
            item.ndim == 1 or (item.ndim == 3 and item.shape[2] == 3)
        ):
            items.append(item)
        else:
            what = f"array {item.dtype} {item.shape}" if isinstance(item, np.ndarray) else type(item).__name__
            raise BinFormatError(f"{path}: item {i} is {what}; expected image bytes, a 1-D uint8 array "
                                 "(encoded image) or an (H, W, 3) uint8 array (RGB pixels)")
    return items, flags


def decode_bin(
    path: str | os.PathLike, image_size: tuple[int, int] = (112, 112), progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """All images of a .bin as one (2N, H, W, 3) uint8 RGB array, and the issame bool array.

    ``image_size`` is (height, width) in pixels; other sizes are resized with INTER_AREA.
    Encoded items are decoded with OpenCV (BGR, converted to RGB); grayscale becomes 3
    channels; (H, W, 3) array items are taken as RGB already.
    """
    path = os.fspath(path)
    items, issame = load_bin(path)
    h, w = image_size
    out = np.empty((len(items), h, w, 3), dtype=np.uint8)
    for i, item in enumerate(tqdm(items, desc=f"decode {os.path.basename(path)}", disable=not progress)):
        if isinstance(item, np.ndarray) and item.ndim == 3:
            img = item
        else:
            buf = item if isinstance(item, np.ndarray) else np.frombuffer(item, dtype=np.uint8)
            bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
            if bgr is None:
                raise BinFormatError(f"{path}: item {i} ({buf.size} bytes, starting {bytes(buf[:8])!r}) "
                                     "is not a decodable image")
            img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        if img.shape[:2] != (h, w):
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
        out[i] = img
    return out, issame


def _py2_pickle(payloads: Sequence[bytes], issame: Sequence[bool]) -> bytes:
    """A protocol-2 stream as Python 2 wrote ``(bins, issame)``: images as (SHORT_)BINSTRING.

    Python 3 reads BINSTRING as ``str`` unless ``encoding='bytes'``, exactly like the
    original insightface files. Appends are batched by 1000 as Python 2 did.
    """
    out = [pickle.PROTO + b"\x02", pickle.EMPTY_LIST]
    for start in range(0, len(payloads), 1000):
        out.append(pickle.MARK)
        for p in payloads[start:start + 1000]:
            p = bytes(p)
            if len(p) < 256:
                out += [pickle.SHORT_BINSTRING, bytes([len(p)]), p]
            else:
                out += [pickle.BINSTRING, struct.pack("<i", len(p)), p]
        out.append(pickle.APPENDS)
    out.append(pickle.EMPTY_LIST)
    for start in range(0, len(issame), 1000):
        out.append(pickle.MARK)
        out += [pickle.NEWTRUE if v else pickle.NEWFALSE for v in issame[start:start + 1000]]
        out.append(pickle.APPENDS)
    out += [pickle.TUPLE2, pickle.STOP]
    return b"".join(out)


def write_bin(
    path: str | os.PathLike,
    payloads: Sequence[bytes],
    issame: Sequence[bool],
    kind: str = "bytes",
    protocol: int = 4,
) -> None:
    """Write a verification .bin atomically (temp file + rename).

    ``kind``: 'bytes' (Python 3 bytes items), 'ndarray' (1-D uint8 arrays) or 'py2str'
    (a hand-built protocol-2 stream with Python 2 strings, like the original files;
    ``protocol`` is ignored for it). ``issame`` is written as a list of Python bools.
    """
    path = os.fspath(path)
    if len(payloads) != 2 * len(issame):
        raise ValueError(f"write_bin {path}: {len(payloads)} images for {len(issame)} pairs "
                         f"(need {2 * len(issame)})")
    flags = [bool(v) for v in issame]
    if kind == "bytes":
        data = pickle.dumps(([bytes(p) for p in payloads], flags), protocol=protocol)
    elif kind == "ndarray":
        arrays = [np.frombuffer(bytes(p), dtype=np.uint8).copy() for p in payloads]
        data = pickle.dumps((arrays, flags), protocol=protocol)
    elif kind == "py2str":
        data = _py2_pickle(payloads, flags)
    else:
        raise ValueError(f"write_bin kind must be 'bytes', 'ndarray' or 'py2str', got {kind!r}")
    write_bytes(path, data, fsync=True)
