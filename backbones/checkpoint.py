"""Load published backbone checkpoints safely, with a short report when they do not fit.

Always ``torch.load(weights_only=True)``: a checkpoint is data, never code. Accepted wrappers:
a raw state_dict, or one under ``state_dict`` / ``net_state_dict`` / ``model`` / ``backbone``;
``module.`` prefixes (DataParallel / DDP) are stripped.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from typing import Dict, List, Mapping

import torch
from torch import nn

WRAPPER_KEYS = ("state_dict", "net_state_dict", "model", "backbone")
_SHOW = 5  # how many names of each kind the mismatch report lists


def load_state_dict_file(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """Read ``path`` into a flat ``{key: tensor}`` dict (unwrapped, ``module.`` stripped)."""
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol chatter from the weights-only unpickler
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it needs code ({found.group(1)})" if found else "it holds objects other than tensors and containers"
        raise ValueError(f"{path}: refused, {what}; only plain state_dicts are loaded (weights_only=True)") from None
    except Exception as e:  # truncated file, not a torch file at all, ...
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__})") from None
    for key in WRAPPER_KEYS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path}: expected a state_dict (key -> tensor) or one wrapped under {WRAPPER_KEYS}, "
                         f"got {type(obj).__name__}")
    out: Dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor; not a backbone state_dict")
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


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
