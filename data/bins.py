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
import reprlib
import struct
from typing import Sequence

import cv2
import numpy as np
from tqdm import tqdm

from data.imageformat import oversize
from utils.atomic import write_bytes
from utils.errors import UserError
from utils.files import MB, check_regular, read_regular, size_from_env

GB = 1 << 30
# A .bin file, the image bytes its items reference (a pickle may reference one payload many
# times through its memo) and its decoded (2N, H, W, 3) pixels are each refused above this many
# bytes. The largest published set (cfp_fp, 14000 images) is ~530 MB decoded at 112x112.
# $FACETRAIN_MAX_BIN_GB overrides it.
DEFAULT_MAX_BIN_GB = 8.0
# Pixels one encoded image may claim in its header before it is refused undecoded (OpenCV's own
# limit is 2**30, i.e. a 3 GB allocation); a face crop has ~12.5 k, a large photo ~50 M.
NFOLDS = 10  # the verification protocol's folds: a set needs at least this many pairs
# How write_bin can pickle the images: Python 3 bytes, Python 2 str (as the original files), 1-D uint8 arrays.
BIN_KINDS = ("bytes", "py2str", "ndarray")

_ALLOWED_WHAT = "only image bytes, numpy arrays and bool/integer flags are allowed"


class BinFormatError(UserError, ValueError):
    """A .bin that is not a verification pickle; the message names the file and, where known, the item."""


def max_bin_bytes() -> int:
    """The per-.bin size cap in bytes ($FACETRAIN_MAX_BIN_GB, else 8 GB); see DEFAULT_MAX_BIN_GB."""
    return size_from_env("FACETRAIN_MAX_BIN_GB", DEFAULT_MAX_BIN_GB, GB, "gigabytes")


def check_pair_count(path: str, pairs: int, nfolds: int = NFOLDS) -> None:
    """Refuse a set too small for the ``nfolds``-fold protocol, naming the file (before any decoding)."""
    if pairs < nfolds:
        raise BinFormatError(f"{path}: {pairs} pair{'s' if pairs != 1 else ''}; needs at least {nfolds} pairs "
                             f"for {nfolds}-fold verification")


def _short(obj) -> str:
    """A bounded, one-line repr for messages (an array or a deep list can come from the file)."""
    return " ".join(reprlib.repr(obj).split())


class _Refused(pickle.UnpicklingError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _latin1_encode(obj, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 protocol-2 pickles use it for bytes: latin-1 text -> bytes only."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise _Refused(f"_codecs.encode({type(obj).__name__}, {_short(encoding)})")
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
        raise _Refused(f"numpy scalar of dtype {_short(dtype)}")
    return _NUMPY_SCALAR(dtype, data)


_NUMPY_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1, np.uint8))[0]
_NUMPY_FROMBUFFER = np.ndarray.__reduce_ex__(np.zeros(1, np.uint8), 5)[0]


class _NdarrayType:
    """Stands for ``numpy.ndarray`` as ``_reconstruct``'s first argument; calling it is refused.

    ``numpy.ndarray((10**12,), ...)`` reached through REDUCE would allocate a terabyte.
    """

    def __call__(self, *args, **kwargs):
        raise _Refused("numpy.ndarray called directly")


_NDARRAY = _NdarrayType()


def _reconstruct(subtype, shape, dtype):
    """numpy's ``_reconstruct`` for plain ndarrays of the empty shape numpy pickles (the data comes in BUILD).

    A subclass would be arbitrary code; a large shape here would be allocated before any check.
    """
    if subtype is not _NDARRAY:
        raise _Refused(f"numpy array subclass {_short(subtype)}")
    if not isinstance(shape, tuple) or len(shape) > 1 or not all(isinstance(d, int) and 0 <= d <= 1 for d in shape):
        raise _Refused(f"numpy _reconstruct of shape {_short(shape)} (numpy writes (0,))")
    return _NUMPY_RECONSTRUCT(np.ndarray, shape, dtype)


# (module, name) as written in the pickle -> what it resolves to. numpy 1.x writes
# numpy.core.*, numpy 2.x numpy._core.*; protocols 0-4 use _reconstruct (+ _codecs.encode
# for the data at protocols 0-2), protocol 5 uses _frombuffer. Python 3 writes b'' at protocol 2
# as __builtin__.bytes().
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _NUMPY_FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _NUMPY_FROMBUFFER,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
    ("__builtin__", "bytearray"): _bytearray,
    ("builtins", "bytearray"): _bytearray,
}


class _RestrictedUnpickler(pickle._Unpickler):
    """Resolves only the globals in ``_ALLOWED``; every other global is refused, never imported.

    The pure-Python unpickler, not the C one: the C one stores its memo in an array sized by the
    largest index a PUT names, so one damaged LONG_BINPUT index (2**31) allocates 16+ GB before
    anything can be checked; here the memo is a dict. Reading a real set costs < 0.5 s more.
    """

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
    except Exception as exc:  # any malformed stream: EOFError, UnpicklingError, ValueError, MemoryError, ...
        reason = " ".join(str(exc).split())[:200]  # one line, whatever the message was
        if isinstance(exc, KeyError):  # the pure-Python unpickler's memo is a dict
            reason = f"a GET of memo entry {reason} that no PUT stored"
        raise BinFormatError(f"{path}: not a readable pickle ({type(exc).__name__}: {reason})") from None


def _what(obj) -> str:
    """A short name for an object in an error message: array dtype and shape, else the type."""
    if isinstance(obj, np.ndarray):
        return f"array {obj.dtype} {obj.shape}"
    return type(obj).__name__


def _payload(path: str, i: int, item) -> bytes | np.ndarray:
    """One item as ``bytes``, a 1-D uint8 array (encoded image) or an (H, W, 3) uint8 array (RGB pixels).

    Encoded bytes held in a uint8 array count whatever its layout, as long as it is one row or
    one column: (N,), (N, 1) (insightface's own test files), (1, N).
    """
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        if item.ndim == 1 or (item.ndim == 2 and 1 in item.shape):
            return item.reshape(-1)
        if item.ndim == 3 and item.shape[2] == 3 and item.shape[0] and item.shape[1]:
            return item
    raise BinFormatError(f"{path}: item {i} is {_what(item)}; expected image bytes, a uint8 array of "
                         "encoded image bytes ((N,), (N, 1) or (1, N)) or an (H, W, 3) uint8 array (RGB pixels)")


def _flags(path: str, issame) -> np.ndarray:
    if isinstance(issame, np.ndarray):
        if issame.ndim != 1:
            raise BinFormatError(f"{path}: issame_list is {_what(issame)}; expected one flag per pair (1-D)")
        issame = issame.tolist()
    if not isinstance(issame, (list, tuple)):
        raise BinFormatError(f"{path}: issame_list is a {_what(issame)}, expected a list of bools")
    flags = np.empty(len(issame), dtype=bool)
    for i, v in enumerate(issame):
        if not isinstance(v, (bool, np.bool_, int, np.integer)) or v not in (0, 1):
            raise BinFormatError(f"{path}: issame_list item {i} is {_short(v)} ({type(v).__name__}), "
                                 "expected a bool or 0/1")
        flags[i] = bool(v)
    return flags


def load_bin(path: str | os.PathLike) -> tuple[list[bytes | np.ndarray], np.ndarray]:
    """The 2N items and N ``issame`` flags (bool array) of a verification .bin.

    Items are ``bytes`` (encoded image) or numpy uint8 arrays: 1-D = encoded image bytes
    (a one-row or one-column array in the file is flattened), (H, W, 3) = decoded RGB pixels.
    The file must be a regular file (a FIFO or device is refused unread, as UnreadableFileError)
    within :func:`max_bin_bytes`, and so must the image bytes its items reference in total.
    """
    path = os.fspath(path)
    limit = max_bin_bytes()
    size = check_regular(path, ".bin file")
    if size > limit:
        raise BinFormatError(f"{path}: {size / GB:.1f} GB, over the {limit / GB:g} GB limit for a .bin "
                             "(set $FACETRAIN_MAX_BIN_GB to raise it)")
    try:
        data = read_regular(path, ".bin file", max_bytes=limit)
    except OSError as exc:
        raise BinFormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    obj = _unpickle(path, data)
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise BinFormatError(f"{path}: expected a pickled 2-tuple (bins, issame_list), got {_what(obj)}"
                             + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else ""))
    bins, issame = obj
    if isinstance(bins, np.ndarray) and (bins.dtype == object and bins.ndim == 1 or bins.dtype == np.uint8
                                         and bins.ndim == 4 and bins.shape[3] == 3):
        bins = list(bins)  # an object array of encoded images, or all the RGB pixels in one (2N, H, W, 3) array
    if not isinstance(bins, (list, tuple)):
        raise BinFormatError(f"{path}: bins is {_what(bins)}, expected a list of images")
    flags = _flags(path, issame)
    if len(bins) != 2 * len(flags):
        raise BinFormatError(f"{path}: {len(bins)} images but {len(flags)} pairs in issame_list "
                             f"(expected 2 x {len(flags)} = {2 * len(flags)} images)")
    items = [_payload(path, i, item) for i, item in enumerate(bins)]
    total = sum(len(x) if isinstance(x, bytes) else x.nbytes for x in items)
    if total > limit:  # the pickle memo lets a small file reference one payload many times
        distinct = len({id(x) for x in bins})
        raise BinFormatError(f"{path}: {len(items)} items reference {total / GB:.1f} GB of image data "
                             f"({distinct} distinct objects in a {size / MB:.1f} MB file), over the "
                             f"{limit / GB:g} GB limit (set $FACETRAIN_MAX_BIN_GB to raise it)")
    return items, flags


def check_encoded_size(payload: bytes | np.ndarray, where: str) -> None:
    """Refuse an encoded image whose header claims more than MAX_IMAGE_PIXELS, before a decoder allocates it.

    ``where`` names it in the message ("lfw.bin: item 7").
    """
    why = oversize(payload)
    if why:
        raise BinFormatError(f"{where}: {why}; refused undecoded")


def decode_image(payload: bytes | np.ndarray, where: str) -> np.ndarray:
    """RGB uint8 (H, W, 3) pixels of one encoded image; BinFormatError naming ``where`` if it is not one.

    The header's size is checked first (:func:`check_encoded_size`); an OpenCV error is reported as
    one line, never raised as ``cv2.error``.
    """
    buf = payload if isinstance(payload, np.ndarray) else np.frombuffer(payload, dtype=np.uint8)
    check_encoded_size(buf, where)
    try:
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    except cv2.error as exc:
        reason = str(exc).strip().splitlines()[-1][:120]
        raise BinFormatError(f"{where} ({buf.size} bytes, starting {bytes(buf[:8])!r}) is not a decodable "
                             f"image (OpenCV: {reason})") from None
    if bgr is None:
        raise BinFormatError(f"{where} ({buf.size} bytes, starting {bytes(buf[:8])!r}) is not a decodable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_bin(
    path: str | os.PathLike, image_size: tuple[int, int] = (112, 112), progress: bool = False, min_pairs: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """All images of a .bin as one (2N, H, W, 3) uint8 RGB array, and the issame bool array.

    ``image_size`` is (height, width) in pixels; other sizes are resized with INTER_AREA.
    Encoded items are decoded with OpenCV (BGR, converted to RGB); grayscale becomes 3
    channels; (H, W, 3) array items are taken as RGB already. ``min_pairs``: refuse a set with
    fewer pairs before decoding anything (the 10-fold protocol needs 10). The decoded array
    (2N x H x W x 3 bytes) must fit :func:`max_bin_bytes`.
    """
    path = os.fspath(path)
    items, issame = load_bin(path)
    if min_pairs:
        check_pair_count(path, len(issame), min_pairs)
    h, w = image_size
    need, limit = len(items) * h * w * 3, max_bin_bytes()
    if need > limit:
        raise BinFormatError(f"{path}: {len(items)} images of {h}x{w}x3 would decode to {need / GB:.1f} GB, over "
                             f"the {limit / GB:g} GB limit (set $FACETRAIN_MAX_BIN_GB to raise it)")
    out = np.empty((len(items), h, w, 3), dtype=np.uint8)
    for i, item in enumerate(tqdm(items, desc=f"decode {os.path.basename(path)}", disable=not progress)):
        img = item if isinstance(item, np.ndarray) and item.ndim == 3 else decode_image(item, f"{path}: item {i}")
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
        raise ValueError(f"write_bin kind must be one of {', '.join(BIN_KINDS)}, got {kind!r}")
    write_bytes(path, data, fsync=True)


def label_warning(issame) -> str | None:
    """"all N pairs are 'same'" ('different') when a set has only one label, else None.

    Such a set scores ~100% for any model (the protocol picks a threshold that accepts or
    rejects nearly everything), so its number must never be reported without this warning.
    """
    same = np.asarray(issame, dtype=bool)
    n = same.size
    if n and same.all():
        return f"all {n} pairs are 'same'"
    if n and not same.any():
        return f"all {n} pairs are 'different'"
    return None
