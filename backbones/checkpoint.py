"""Load published backbone checkpoints safely, with a short report when they do not fit.

One loader for every weights file (utils.checkpoint.load_file): ``weights_only=True`` (a
checkpoint is data, never code), zip CRCs checked, every failure one CheckpointError line.
Accepted wrappers: a raw state_dict, or one under ``state_dict`` / ``net_state_dict`` /
``model`` / ``backbone``; ``module.`` prefixes (DataParallel / DDP) are stripped.
"""

from __future__ import annotations

import os
from typing import Dict, List, Mapping

import torch
from torch import nn

from utils.checkpoint import WRAPPER_KEYS, load_file, state_dict_of

__all__ = ["WRAPPER_KEYS", "load_state_dict_file", "load_weights", "mismatch_report"]
_SHOW = 5  # how many names of each kind the mismatch report lists


def load_state_dict_file(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """Read ``path`` into a flat ``{key: tensor}`` dict (unwrapped, ``module.`` stripped).

    Raises utils.checkpoint.CheckpointError (a ValueError) naming the file and what is wrong.
    """
    path = os.fspath(path)
    return state_dict_of(load_file(path), path)


def mismatch_report(model_sd: Mapping[str, torch.Tensor], ckpt: Mapping[str, torch.Tensor],
                    strict: bool = True) -> List[str]:
    """Readable lines describing missing / unexpected / wrong-shape keys (empty if they fit)."""
    missing = [k for k in model_sd if k not in ckpt]
    unexpected = [k for k in ckpt if k not in model_sd]
    wrong = [f"{k}: checkpoint {tuple(ckpt[k].shape)} vs model {tuple(model_sd[k].shape)}"
             for k in model_sd if k in ckpt and ckpt[k].shape != model_sd[k].shape]
    lines = []
    for label, items in (("wrong shape", wrong), ("missing", missing), ("unexpected", unexpected)):
        if items and (strict or label == "wrong shape"):
            more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
            lines.append(f"{len(items)} {label}: {', '.join(items[:_SHOW])}{more}")
    return lines


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load the checkpoint at ``path`` into ``model`` and return it.

    With ``strict`` the key sets must match exactly; shapes must always match. On mismatch
    raises ``ValueError`` naming the file, with counts and the first few offending keys.
    """
    ckpt = load_state_dict_file(path)
    model_sd = model.state_dict()
    problems = mismatch_report(model_sd, ckpt, strict)
    if problems:
        raise ValueError(f"{os.fspath(path)} does not fit {type(model).__name__} "
                         f"({len(ckpt)} keys in file, {len(model_sd)} in model): " + "; ".join(problems))
    model.load_state_dict(ckpt, strict=strict)
    return model
