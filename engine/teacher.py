"""Knowledge distillation: a frozen teacher and the term it adds to every micro-batch's loss.

    teacher = load_teacher(cfg)                       # None without --teacher
    distill = Distillation(teacher, cfg, amp_dtype)   # the trainer builds it
    loss, term = distill.add_term(margin_loss, x, student_emb)

The teacher is any weights file evaluate.py loads (backbones.from_file: our backbone.pt or
checkpoint.pt, foreign state_dicts with --teacher-backbone; non-finite weights refused). It is
frozen: eval mode (BatchNorm running statistics, no dropout), requires_grad off, run under
no_grad; it is not part of the model, the objective, the optimizer or the checkpoint, and not
wrapped in DDP (each rank runs its own copy on its own micro-batch). The checkpoint keeps only
its identity (path and sha256 of the file), so a resume with another teacher is refused.

The teacher sees the student's batch exactly: the same flipped, normalised RGB images (a BGR
teacher flips the channels itself, backbones.base), under the same autocast as the student
(--amp), its embeddings cast to float32 before the loss. The loss is

    margin_loss_weight * margin loss + distill_weight * D(student, teacher)

with D from losses/distill.py on the embeddings (no projection: the widths must agree). Under
Partial FC the term is added to each rank's local loss, like the margin loss.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any, Dict, Mapping, Tuple

import torch
from torch import Tensor, nn

import backbones
from config import Config, ConfigError
from losses.distill import build_distill
from utils.errors import user_errors
from utils.torchfile import CheckpointError


def file_sha256(path: str) -> str:
    """sha256 of the file's bytes (read in 1 MiB chunks): the identity of a teacher."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Teacher:
    """A frozen backbone: eval mode, no gradients, float32 embeddings of the student's batch."""

    def __init__(self, model: nn.Module, path: str = "", sha256: str = "", name: str = "",
                 channel_order: str = "rgb") -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.path, self.sha256, self.name, self.channel_order = path, sha256, name, channel_order
        self.embedding_size = int(getattr(model, "embedding_size", 0)) or None

    def to(self, device: torch.device, channels_last: bool = False) -> Teacher:
        self.model.to(device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        return self

    def embed(self, x: Tensor, amp_dtype: torch.dtype | None = None) -> Tensor:
        """(B, D) float32 embeddings of ``x`` (normalised RGB, as the student gets it), no autograd graph."""
        self.model.eval()  # whatever a caller did to the module since
        autocast = (torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype is not None
                    else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            emb = self.model(x)
        return emb.float() if emb.dtype in (torch.float16, torch.bfloat16) else emb

    def identity(self) -> Dict[str, str]:
        """What the checkpoint keeps of the teacher: its path (as given, absolute) and its file's sha256."""
        return {"path": os.path.abspath(self.path) if self.path else "", "sha256": self.sha256}

    def describe(self) -> str:
        return (f"{self.path} ({self.name}, {self.embedding_size}-d, {self.channel_order} input, "
                f"sha256 {self.sha256[:12]})")


def load_teacher(cfg: Config) -> Teacher | None:
    """The --teacher of ``cfg``, loaded, checked and frozen (on the CPU); None without --teacher.

    Every problem is one line naming the flag: a file that does not load or fit its architecture,
    foreign weights without --teacher-backbone, a width other than --embedding-size; also loss weights
    that leave nothing to learn (--margin-loss-weight 0 without a teacher and a --distill-weight > 0).
    """
    if cfg.margin_loss_weight == 0 and (not cfg.teacher or cfg.distill_weight == 0):
        raise ConfigError("--margin-loss-weight 0 leaves nothing to learn without --teacher and a --distill-weight "
                          "above 0")
    if not cfg.teacher:
        return None
    order = cfg.teacher_input_order.lower()
    if order not in ("", "rgb", "bgr"):
        raise ConfigError(f"bad value {cfg.teacher_input_order!r} for --teacher-input-order: must be rgb or bgr "
                          f"(or empty: what the file says)")
    try:
        loaded = backbones.from_file(cfg.teacher, cfg.teacher_backbone, cfg.teacher_embedding_size, order)
    except CheckpointError as exc:
        text = str(exc).replace("with --backbone NAME", "with --teacher-backbone NAME")
        raise ConfigError(f"--teacher: {text}") from None
    except (TypeError, ValueError) as exc:  # e.g. --teacher-embedding-size the architecture rejects
        if isinstance(exc, user_errors()):
            raise
        raise ConfigError(f"--teacher {cfg.teacher} (--teacher-backbone {cfg.teacher_backbone or 'from the file'}): "
                          f"{exc}") from None
    teacher = Teacher(loaded.model, cfg.teacher, file_sha256(cfg.teacher), loaded.name, loaded.channel_order)
    if teacher.embedding_size != cfg.embedding_size:
        raise ConfigError(f"--teacher {cfg.teacher} gives {teacher.embedding_size}-d embeddings but the student's "
                          f"--embedding-size is {cfg.embedding_size}: distillation compares them directly (no "
                          f"projection); use --embedding-size {teacher.embedding_size}")
    return teacher


class Distillation:
    """The distillation term of one micro-batch and the weighted sum with the margin loss."""

    def __init__(self, teacher: Teacher, loss: str = "cosine", weight: float = 1.0, margin_weight: float = 1.0,
                 amp_dtype: torch.dtype | None = None) -> None:
        self.teacher, self.criterion = teacher, build_distill(loss)
        self.weight, self.margin_weight, self.amp_dtype = float(weight), float(margin_weight), amp_dtype

    def add_term(self, margin_loss: Tensor, x: Tensor, student_emb: Tensor) -> Tuple[Tensor, Tensor]:
        """(margin_weight * margin_loss + weight * D, D detached) for the batch ``x`` the student embedded."""
        term = self.criterion(student_emb, self.teacher.embed(x, self.amp_dtype))
        total = (margin_loss if self.margin_weight == 1.0 else self.margin_weight * margin_loss) + self.weight * term
        return total, term.detach()


def check_same_teacher(saved: Mapping[str, Any] | None, teacher: Teacher | None, source: str) -> None:
    """Refuse to resume a run with another teacher than it was trained with (or with / without one)."""
    now = teacher.identity() if teacher is not None else None
    if saved is None and now is None:
        return
    if saved is None:
        raise ConfigError(f"--teacher {teacher.path}: {source} was trained without a teacher; distil in a new run "
                          f"(e.g. --init-backbone {source})")
    if now is None:
        raise ConfigError(f"{source} was distilled from teacher {saved.get('path')} (sha256 "
                          f"{str(saved.get('sha256'))[:12]}): resume with --teacher pointing at that file")
    if now["sha256"] != saved.get("sha256"):
        raise ConfigError(f"--teacher {teacher.path} (sha256 {now['sha256'][:12]}) is not the teacher {source} was "
                          f"distilled from ({saved.get('path')}, sha256 {str(saved.get('sha256'))[:12]})")
