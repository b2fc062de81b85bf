"""A facebank: one embedding per known identity, and the matching of query embeddings against it.

An identity's embedding: each image's (flip-TTA, L2-normalised) embedding, averaged, and the mean
normalised again (the InsightFace_Pytorch seed's facebank). bank.npz holds ``names``, ``embeddings``
(float32, L2-normalised rows), ``counts`` (images per identity), ``model_sha256`` (the weights'
identity, inference.model), ``embedding_size`` and ``tta``; read with allow_pickle=False.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from utils.atomic import write_bytes
from utils.errors import UserError
from utils.files import read_regular

from .embed import embed_files, list_images
from .faces import DetectRules
from .model import EmbeddingModel

FORMAT = "facetrain-facebank/1"


class FacebankError(UserError, ValueError):
    """A bank file that is not ours, belongs to another model, or an identity that is not in it."""


@dataclass
class Facebank:
    names: List[str]
    embeddings: np.ndarray  # (K, D) float32, L2-normalised rows
    counts: np.ndarray  # (K,) int64 images per identity
    model_sha256: str
    embedding_size: int  # width of the rows (twice the model's for tta=concat)
    tta: str

    def save(self, path: str) -> None:
        buf = io.BytesIO()
        np.savez(buf, format=np.array(FORMAT), names=np.array(self.names, dtype=str),
                 embeddings=self.embeddings.astype(np.float32), counts=self.counts.astype(np.int64),
                 model_sha256=np.array(self.model_sha256), embedding_size=np.array(self.embedding_size, np.int64),
                 tta=np.array(self.tta))
        write_bytes(path, buf.getvalue(), fsync=True)

    def check_model(self, model: EmbeddingModel, path: str, tta: str) -> None:
        """Refuse (one line) a bank built by another model or with another TTA mode."""
        if self.model_sha256 != model.sha256:
            raise FacebankError(f"{path}: built by another model (weights sha256 {self.model_sha256[:12]}, "
                                f"this model {model.sha256[:12]}); rebuild it with this model")
        if self.tta != tta:
            raise FacebankError(f"{path}: built with --tta {self.tta}, not {tta}; use --tta {self.tta}")


def load(path: str) -> Facebank:
    try:
        with np.load(io.BytesIO(read_regular(path, "facebank")), allow_pickle=False) as z:
            if str(z["format"]) != FORMAT:
                raise KeyError("format")
            bank = Facebank([str(n) for n in z["names"]], z["embeddings"].astype(np.float32),
                            z["counts"].astype(np.int64), str(z["model_sha256"]), int(z["embedding_size"]),
                            str(z["tta"]))
    except (KeyError, ValueError, OSError, EOFError) as exc:
        if isinstance(exc, (FileNotFoundError, UserError)):
            raise
        raise FacebankError(f"{path}: not a facebank written by infer.py ({FORMAT}): {exc}") from None
    k = len(bank.names)
    if bank.embeddings.shape != (k, bank.embedding_size) or bank.counts.shape != (k,):
        raise FacebankError(f"{path}: {k} names but embeddings {bank.embeddings.shape} and counts "
                            f"{bank.counts.shape}")
    return bank


def identity_folders(root: str) -> List[Tuple[str, str]]:
    """(name, folder) of each sub-folder of ``root`` (FACEBANK_DIR/<name>/*), sorted by name."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such facebank folder (expected {root}/<name>/<images>)")
    found = [(d, os.path.join(root, d)) for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d))]
    if not found:
        raise FacebankError(f"{root}: no identity sub-folders (expected {root}/<name>/<images>)")
    return found


def mean_embedding(rows: np.ndarray) -> np.ndarray:
    """normalise(mean of the L2-normalised rows), in float64."""
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    m = rows.mean(axis=0)
    return m / np.linalg.norm(m)


def embed_identities(model: EmbeddingModel, folders: Sequence[Tuple[str, str]], tta: str, batch_size: int,
                     progress: bool, detect: DetectRules | None = None
                     ) -> Tuple[Dict[str, np.ndarray], Dict[str, int], List[Tuple[str, str]]]:
    """name -> mean embedding and image count of each folder with at least one usable image; failures listed.

    ``detect``: DetectRules when the folders hold raw photos (inference.embed.embed_files)."""
    means: Dict[str, np.ndarray] = {}
    counts: Dict[str, int] = {}
    failed: List[Tuple[str, str]] = []
    for name, folder in folders:
        if not name or name != name.strip() or "\n" in name:
            failed.append((folder, "identity name is empty or has surrounding blanks"))
            continue
        result = embed_files(model, list_images([folder]), tta, batch_size, progress, desc=name, detect=detect)
        failed.extend(result.failed)
        if len(result.paths) == 0:
            failed.append((folder, "no usable images: identity left out"))
            continue
        means[name] = mean_embedding(result.embeddings)
        counts[name] = len(result.paths)
    return means, counts, failed


def build(model: EmbeddingModel, means: Dict[str, np.ndarray], counts: Dict[str, int], tta: str,
          size: int) -> Facebank:
    names = sorted(means)
    emb = np.stack([means[n] for n in names]).astype(np.float32) if names else np.zeros((0, size), np.float32)
    return Facebank(names, emb, np.array([counts[n] for n in names], np.int64), model.sha256, size, tta)


def merged(bank: Facebank, means: Dict[str, np.ndarray], counts: Dict[str, int]) -> Facebank:
    """``bank`` with ``means`` added (an existing name is replaced); the other rows untouched."""
    keep = [i for i, n in enumerate(bank.names) if n not in means]
    names = [bank.names[i] for i in keep] + sorted(means)
    rows = [bank.embeddings[i] for i in keep] + [means[n].astype(np.float32) for n in sorted(means)]
    cnt = [int(bank.counts[i]) for i in keep] + [counts[n] for n in sorted(means)]
    emb = np.stack(rows).astype(np.float32) if rows else np.zeros((0, bank.embedding_size), np.float32)
    return Facebank(names, emb, np.array(cnt, np.int64), bank.model_sha256, bank.embedding_size, bank.tta)


def without(bank: Facebank, names: Sequence[str], path: str) -> Facebank:
    missing = [n for n in names if n not in bank.names]
    if missing:
        raise FacebankError(f"{path}: no identity named {', '.join(map(repr, missing))} (it holds "
                            f"{len(bank.names)}: {', '.join(bank.names[:10])}{' ...' if len(bank.names) > 10 else ''})")
    keep = [i for i, n in enumerate(bank.names) if n not in set(names)]
    return Facebank([bank.names[i] for i in keep], bank.embeddings[keep], bank.counts[keep], bank.model_sha256,
                    bank.embedding_size, bank.tta)


@dataclass
class Match:
    name: str  # best identity, or "unknown" below the threshold
    score: float  # cosine of the best identity
    top: List[Tuple[str, float]]  # the k best (name, cosine), best first


UNKNOWN = "unknown"


def match(bank: Facebank, queries: np.ndarray, threshold: float, k: int = 1) -> List[Match]:
    """Cosine of each query row with every identity; the best name, or UNKNOWN if its cosine < threshold."""
    if not bank.names:
        raise FacebankError("the facebank holds no identities")
    scores = queries.astype(np.float64) @ bank.embeddings.astype(np.float64).T
    out = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[:k]
        top = [(bank.names[i], float(row[i])) for i in order]
        best = top[0]
        out.append(Match(best[0] if best[1] >= threshold else UNKNOWN, best[1], top))
    return out
