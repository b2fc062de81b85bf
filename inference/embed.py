"""Image files -> L2-normalised embeddings with flip TTA, batched, for any EmbeddingModel.

Files are read as training reads them (utils.files.read_regular under the image size cap, then
data.dataset.decode_image: any size is resized to 112x112 with INTER_AREA, BGR -> RGB) and
embedded as evaluation.embed does: normalise(e(x) + e(flip x)) for ``sum`` (the insightface
protocol), normalise([e(x), e(flip x)]) for ``concat``, normalise(e(x)) for ``none``; views
combined in float64, with evaluation.embed's TTA_MODES (one definition of the modes; the model
here may be an onnxruntime session, so the batching loop is this module's own).
tests/test_infer.py asserts the rows equal evaluation.embed's for the same images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from data.dataset import decode_image
from data.imageformat import oversize
from data.sources import IMAGE_EXTENSIONS
from data.transforms import normalize
from evaluation.embed import TTA_MODES
from utils.files import UnreadableFileError, max_image_bytes, read_regular

from .faces import DetectRules, NoFaceError, read_face
from .model import INPUT_SIZE, EmbeddingModel


def output_size(model: EmbeddingModel, tta: str) -> int:
    """Width of the rows ``embed_images`` returns (twice the model's for concat)."""
    return model.embedding_size * (2 if tta == "concat" else 1)


def list_images(inputs: Sequence[str]) -> List[str]:
    """Files as given (whatever their extension); folders walked recursively for image files, sorted."""
    out: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = [os.path.join(d, f) for d, _, files in os.walk(item) for f in files
                     if f.lower().endswith(IMAGE_EXTENSIONS)]
            out.extend(sorted(found))
        else:
            out.append(item)
    return out


def read_image(path: str) -> np.ndarray:
    """(112,112,3) uint8 RGB of an image file; ValueError/OSError with the reason if it cannot be used."""
    data = read_regular(path, "image", max_image_bytes())
    why = oversize(data) if data else "empty file"
    img = None if why else decode_image(data, INPUT_SIZE)
    if img is None:
        raise UnreadableFileError(f"{path}: {why or 'not a decodable image (JPEG/PNG/BMP/WebP)'}")
    return img


def embed_images(model: EmbeddingModel, images: np.ndarray, tta: str = "sum") -> np.ndarray:
    """float64 L2-normalised rows of one batch of uint8 RGB images (N,112,112,3) or (N,3,112,112)."""
    mode = TTA_MODES[tta]
    x = normalize(torch.from_numpy(np.ascontiguousarray(images)))
    e = torch.from_numpy(model.forward(x.numpy())).double()
    ef = torch.from_numpy(model.forward(x.flip(3).numpy())).double() if mode.flip else None
    return mode.combine(e, ef).numpy()


@dataclass
class Embedded:
    """Rows of the images that could be used, their paths in row order, and (path, reason) of the rest
    (``no_face``: those of the failed paths that were read but held no face, with detection)."""

    embeddings: np.ndarray
    paths: List[str]
    failed: List[Tuple[str, str]] = field(default_factory=list)
    no_face: List[str] = field(default_factory=list)


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def embed_files(model: EmbeddingModel, paths: Sequence[str], tta: str = "sum", batch_size: int = 64,
                progress: bool = False, desc: str = "embed", detect: DetectRules | None = None) -> Embedded:
    """Read, decode and embed ``paths`` in batches (float64 rows); unreadable files are listed, not fatal.

    ``detect``: the files are raw photos; each one's chosen face is found and aligned first
    (inference.faces), and a photo with no face is listed as failed.
    """
    def load(path: str) -> np.ndarray:
        return read_image(path) if detect is None else read_face(path, detect)

    no_face: List[str] = []
    rows: List[np.ndarray] = []
    ok: List[str] = []
    failed: List[Tuple[str, str]] = []
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for chunk in _chunks(paths, batch_size):
            images = []
            for path in chunk:
                try:
                    images.append(load(path))
                    ok.append(path)
                except NoFaceError as exc:
                    no_face.append(path)
                    failed.append((path, str(exc)))
                except (OSError, ValueError) as exc:
                    failed.append((path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
            if images:
                rows.append(embed_images(model, np.stack(images), tta))
            bar.update(len(chunk))
    emb = np.concatenate(rows) if rows else np.zeros((0, output_size(model, tta)), np.float64)
    return Embedded(emb, ok, failed, no_face)
