"""Face-dataset view of a RecordIO pack: which keys are images, and each image's class id.

Two layouts exist (shared/reference/FORMATS.md):

- insightface: record 0 is a header (flag > 0, label ``[first_identity_record, end]``,
  empty payload); records ``1 .. first_identity_record-1`` are images; records
  ``first_identity_record .. end-1`` are identity records, one per class in class order,
  whose label is that class's image key range ``[first, end)``. Labels come from these
  ~C small records instead of reading every image header; a sample of image headers is
  checked against them, and where they disagree the image headers win (each image's own
  label is what insightface and arcface_torch train on).
- plain im2rec: every key is an image; labels come from each image's IRHeader.

Labels are stored as float32 in the files, which holds integers exactly only up to 2**24;
packs with more records than that (Glint360K) get their labels from the image headers.
"""

from __future__ import annotations

import os
import struct
from typing import Iterable

import numpy as np
from tqdm import tqdm

from data.imageformat import UNKNOWN, image_format
from data.recordio import IR_SIZE, IRHeader, RecordIOError, RecordReader, RecordWriter, pack_irheader, unpack_irheader
from data.sources import class_limit
from utils.atomic import write_text
from utils.files import read_regular

_FLOAT32_EXACT = 1 << 24  # largest integer range float32 labels hold exactly
_PROGRESS_MIN = 10000  # show a progress bar when reading at least this many image headers
_PROPERTY_MAX_BYTES = 4096  # a property file is one short line
_MAX_SIDE = 1 << 16  # pixels: image height/width a property file may declare
_INT64_SAFE = float(1 << 62)  # a float32 label at or above this (1e38) is no class id and would overflow int64
_LABEL_SAMPLE = 64  # image headers checked against the identity records when a pack is opened


def read_property(path: str | os.PathLike, records: int | None = None) -> tuple[int, tuple[int, int]]:
    """(num_classes, (height, width)) from an insightface ``property`` file ("C,112,112", newline optional).

    ``records``: the size of the dataset beside it (records or images); a class count beyond
    :func:`data.sources.class_limit` of it is refused, before anything that size is allocated.
    """
    path = os.fspath(path)
    text = read_regular(path, "property file", _PROPERTY_MAX_BYTES).decode("ascii", errors="replace").strip()
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) != 3:
            raise ValueError
        c, h, w = (int(p) for p in parts)
    except ValueError:
        raise RecordIOError(f"{path}: expected 'num_classes,height,width', got {text[:60]!r}") from None
    if c < 1 or not (0 < h <= _MAX_SIDE and 0 < w <= _MAX_SIDE):
        raise RecordIOError(f"{path}: {text[:60]!r} needs num_classes >= 1 and height, width in 1..{_MAX_SIDE} pixels")
    if records is not None and c > class_limit(records):
        raise RecordIOError(f"{path}: num_classes {c} is not believable for a pack of {records} records "
                            f"(at most {class_limit(records)}); fix the first field of {path}")
    return c, (h, w)


def _integral(values: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(values)) and np.all(values == np.round(values)))


def _image_label(head: bytes) -> float | None:
    """The class value of an image record's IRHeader (the label, or the first of a label array);
    None when ``head`` is too short to hold it."""
    if len(head) < IR_SIZE:
        return None
    flag, value = struct.unpack_from("<If", head)
    if flag > 0:
        if len(head) < IR_SIZE + 4:
            return None
        (value,) = struct.unpack_from("<f", head, IR_SIZE)
    return value


def header_range(record: bytes) -> tuple[int, int] | None:
    """(first_identity_record, end) when ``record`` is an insightface header (record 0), else None.

    A header has flag >= 2, an integral label[0] >= 1 and label[1], and no image payload
    (an image record with an array label could otherwise pass for one).
    """
    try:
        header, payload = unpack_irheader(record)
    except RecordIOError:
        return None
    if header.flag < 2:
        return None
    label = np.asarray(header.label, dtype=np.float64)
    if not _integral(label[:2]) or label[0] < 1 or image_format(payload) != UNKNOWN:
        return None
    return int(label[0]), int(label[1])


class FaceRec:
    """Images and class ids of a .rec pack, insightface or plain layout (``layout`` says which).

    Attributes: ``image_keys`` and ``labels`` (int64, one per image, in dataset order),
    ``num_classes``, ``image_size`` ((height, width) from ``property``, or None).
    Picklable and safe in DataLoader workers (see :class:`RecordReader`).
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None,
                 progress: bool = True):
        self.progress = progress  # a bar while reading labels from 10k+ image headers (plain packs)
        self.reader = RecordReader(rec_path, idx_path)
        self.rec_path = self.reader.rec_path
        if len(self.reader) == 0:
            raise RecordIOError(f"{self.rec_path}: no records")
        prop_path = os.path.join(os.path.dirname(os.path.abspath(self.rec_path)), "property")
        prop = read_property(prop_path, records=len(self.reader)) if os.path.exists(prop_path) else None
        self.image_size = prop[1] if prop else None
        self._check_shared_offsets()
        header = self._insightface_header()
        if header is None:
            self.layout = "plain"
            self.image_keys = self.reader.keys.copy()
            self.labels = self._labels_from_images(self.image_keys)
            self.num_classes = self._classes_from_labels(prop)
            return
        self.layout = "insightface"
        first_id, end = header
        if max(first_id, end) > len(self.reader):  # every key 0..end-1 must be in the index: cheap bound first
            raise RecordIOError(f"{self.rec_path} record 0: header range [{first_id}, {end}] runs past the "
                                f"{len(self.reader)} records in the index (damaged header record?)")
        self.image_keys = np.arange(1, first_id, dtype=np.int64)
        missing = self._missing_keys(self.image_keys)
        if missing is not None:
            raise RecordIOError(f"{self.rec_path} record 0: header says images are records 1..{first_id - 1}, "
                                f"but record {missing} is not in the index")
        if end <= first_id or end > _FLOAT32_EXACT:
            # no identity records (some third-party packs), or float32 ranges too coarse: read image headers
            self.labels = self._labels_from_images(self.image_keys)
            self.num_classes = self._classes_from_labels(prop)
        else:
            self.labels = self._labels_from_identities(first_id, end)
            self.num_classes = end - first_id
            if self._identities_disagree():  # the image headers are what insightface/arcface_torch train on
                self.labels = self._labels_from_images(self.image_keys)
                self.num_classes = self._classes_from_labels(prop)

    def _classes_from_labels(self, prop: tuple[int, tuple[int, int]] | None) -> int:
        """max label + 1, or the ``property`` count when larger (classes with no images at the end)."""
        found = int(self.labels.max()) + 1 if len(self.labels) else 0
        if found > class_limit(len(self.reader)):
            i = int(np.argmax(self.labels))
            raise RecordIOError(f"{self.rec_path} record {int(self.image_keys[i])}: label {found - 1} is not "
                                f"believable in a pack of {len(self.reader)} records (more than "
                                f"{class_limit(len(self.reader))} classes); damaged label?")
        return max(found, prop[0]) if prop else found

    def _check_shared_offsets(self) -> None:
        """Two keys of the index pointing at the same record (a damaged .idx line) would count it twice."""
        keys, offsets = self.reader.keys, self.reader.offsets
        if len(keys) < 2:
            return
        order = np.argsort(keys, kind="stable")
        last = np.append(keys[order][1:] != keys[order][:-1], True)  # duplicate keys: the last line wins
        eff_keys, eff_offsets = keys[order][last], offsets[order][last]
        by_offset = np.argsort(eff_offsets, kind="stable")
        same = np.flatnonzero(eff_offsets[by_offset][1:] == eff_offsets[by_offset][:-1])
        if same.size:
            a, b = eff_keys[by_offset[same[0]]], eff_keys[by_offset[same[0] + 1]]
            raise RecordIOError(f"{self.reader.idx_path or self.rec_path}: keys {a} and {b} both point at byte "
                                f"{eff_offsets[by_offset[same[0]]]} of {self.rec_path} ({same.size} such pairs); "
                                "the index is damaged (rebuild it, or drop it and let the .rec be scanned)")

    def _insightface_header(self) -> tuple[int, int] | None:
        """(first_identity_record, end) when record 0 is an insightface header, else None."""
        try:
            head = self.reader.read_prefix(0, 4)
        except KeyError:
            return None
        if len(head) < 4 or int.from_bytes(head, "little") < 2:  # flag < 2: skip reading the record
            return None
        return header_range(self.reader.read(0))

    def _missing_keys(self, keys: np.ndarray) -> int | None:
        """First of ``keys`` that the index lacks, or None."""
        have = self.reader.contains(keys)
        return None if have.all() else int(keys[np.argmin(have)])

    def _labels_from_identities(self, first_id: int, end: int) -> np.ndarray:
        """Class id per image key from the identity records' ``[first, end)`` ranges, validated."""
        missing = self._missing_keys(np.arange(first_id, end, dtype=np.int64))
        if missing is not None:
            raise RecordIOError(f"{self.rec_path} record 0: header says identity records are {first_id}..{end - 1}, "
                                f"but record {missing} is not in the index")
        counts = np.empty(end - first_id, dtype=np.int64)
        expect = 1  # each class must start where the previous one ended
        for c, key in enumerate(range(first_id, end)):
            header, _ = unpack_irheader(self.reader.read_prefix(key, IR_SIZE + 8))
            label = np.atleast_1d(np.asarray(header.label, dtype=np.float64))
            where = f"{self.rec_path} identity record {key} (class {c})"
            if header.flag < 2 or not _integral(label[:2]):
                raise RecordIOError(f"{where}: label {label.tolist()} is not an integer range [first, end)")
            lo, hi = int(label[0]), int(label[1])
            if lo != expect or hi <= lo or hi > first_id:
                raise RecordIOError(
                    f"{where}: image range [{lo}, {hi}) does not continue the previous class at {expect} "
                    f"inside the images 1..{first_id - 1} (classes must be contiguous and non-empty)"
                )
            counts[c] = hi - lo
            expect = hi
        if expect != first_id:
            raise RecordIOError(f"{self.rec_path} identity record {end - 1}: classes end at image {expect - 1}, "
                                f"but images run to record {first_id - 1}")
        return np.repeat(np.arange(len(counts), dtype=np.int64), counts)

    def _identities_disagree(self) -> bool:
        """True when a sample of image headers (_LABEL_SAMPLE, evenly spread) contradicts the classes
        the identity records give: such a pack's labels must come from its image headers."""
        picks = np.unique(np.linspace(0, len(self.image_keys) - 1, _LABEL_SAMPLE).astype(np.int64))
        for i in picks.tolist():
            value = _image_label(self.reader.read_prefix(int(self.image_keys[i]), IR_SIZE + 4))
            if value is not None and value != self.labels[i]:
                return True
        return False

    def _labels_from_images(self, keys: np.ndarray) -> np.ndarray:
        """Class id per image from its IRHeader (first label value); reads 28 bytes per record."""
        labels = np.empty(len(keys), dtype=np.int64)
        bar = tqdm(total=len(keys), desc=f"labels {os.path.basename(self.rec_path)}", unit="img",
                   disable=not self.progress or len(keys) < _PROGRESS_MIN)
        for i, key in enumerate(keys.tolist()):
            head = self.reader.read_prefix(key, IR_SIZE + 9)
            if len(head) < IR_SIZE:
                raise RecordIOError(f"{self.rec_path} record {key}: {len(head)} bytes, shorter than an IRHeader")
            flag, value = struct.unpack_from("<If", head)
            if flag <= 2 and len(head) <= IR_SIZE + 4 * flag:  # no payload: a header or identity record
                raise RecordIOError(f"{self.rec_path} record {key}: no image payload after its IRHeader (flag "
                                    f"{flag}), so it is not an image; an insightface header or identity record "
                                    "read as an image? (record 0's header damaged)")
            if flag > 0:
                if len(head) < IR_SIZE + 4:
                    raise RecordIOError(f"{self.rec_path} record {key}: IRHeader flag {flag} but no label values")
                (value,) = struct.unpack_from("<f", head, IR_SIZE)
            if not value.is_integer() or not 0 <= value < _INT64_SAFE:
                raise RecordIOError(f"{self.rec_path} record {key}: label {value} is not a class id")
            labels[i] = int(value)
            bar.update()
        bar.close()
        return labels

    def __len__(self) -> int:
        return len(self.image_keys)

    def read(self, i: int) -> tuple[bytes, int]:
        """(encoded image bytes, class id) of the ``i``-th image (0-based, dataset order)."""
        if not 0 <= i < len(self.image_keys):
            raise IndexError(f"image {i} out of range for {self.rec_path} ({len(self.image_keys)} images)")
        key = int(self.image_keys[i])
        try:
            header, payload = unpack_irheader(self.reader.read(key))
        except RecordIOError as exc:
            if str(exc).startswith(self.rec_path):
                raise
            raise RecordIOError(f"{self.rec_path} record {key}: {exc}") from None
        value = header.label if header.flag == 0 else float(header.label[0])  # parsed once, with the payload
        if value != self.labels[i]:  # only where the sample checked at open missed a disagreement
            raise RecordIOError(f"{self.rec_path} record {key}: image header label {value} but the identity "
                                f"records put it in class {int(self.labels[i])}; the pack contradicts itself "
                                "(prepare_data.py inspect --full lists every such record)")
        return payload, int(self.labels[i])


def write_pack(
    out_dir: str | os.PathLike,
    samples: Iterable[tuple[int, bytes]],
    num_classes: int | None = None,
    image_size: tuple[int, int] = (112, 112),
) -> dict:
    """Write ``train.rec``, ``train.idx`` and ``property`` in the insightface layout.

    ``samples`` are (class id, encoded image bytes) in non-decreasing class order, every
    class 0..C-1 present. Images get keys 1..N (scalar float labels), identity records keys
    N+1..N+C, header record 0 ``[N+1, N+1+C]``. All three files appear only on success
    (property last). Returns {'images', 'classes', 'bytes', 'rec', 'idx', 'property'}.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rec_path = os.path.join(out_dir, "train.rec")
    idx_path = os.path.join(out_dir, "train.idx")
    prop_path = os.path.join(out_dir, "property")
    starts: list[int] = []  # first image key of each class
    n = 0
    with RecordWriter(rec_path, idx_path) as writer:
        header_offset = writer.write(0, pack_irheader(IRHeader(2, np.zeros(2, np.float32)), b""))
        for i, (label, payload) in enumerate(samples):
            label = int(label)
            current = len(starts) - 1
            if label < current:
                raise ValueError(f"write_pack sample {i}: label {label} after label {current} "
                                 "(samples must be in non-decreasing label order)")
            if label > current + 1:
                raise ValueError(f"write_pack sample {i}: label {label} follows label {current}; "
                                 f"class {current + 1} has no images")
            if num_classes is not None and label >= num_classes:
                raise ValueError(f"write_pack sample {i}: label {label} >= num_classes {num_classes}")
            if label == current + 1:
                starts.append(n + 1)
            n += 1
            writer.write(n, pack_irheader(IRHeader(0, float(label), n, 0), payload))
        classes = len(starts)
        if n == 0:
            raise ValueError("write_pack: no samples")
        if num_classes is not None and classes != num_classes:
            raise ValueError(f"write_pack: num_classes {num_classes} but only classes 0..{classes - 1} have images")
        ends = starts[1:] + [n + 1]
        for c in range(classes):
            writer.write(n + 1 + c, pack_irheader(IRHeader(2, np.array([starts[c], ends[c]], np.float32)), b""))
        head = np.array([n + 1, n + 1 + classes], np.float32)
        writer.overwrite(header_offset, pack_irheader(IRHeader(2, head), b""))
        size = writer.tell()
    write_text(prop_path, f"{classes},{image_size[0]},{image_size[1]}\n")
    return {"images": n, "classes": classes, "bytes": size, "rec": rec_path, "idx": idx_path, "property": prop_path}
