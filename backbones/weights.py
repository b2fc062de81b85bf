"""Backbone weights: our backbone.pt files (weights + what rebuilds the model) and published
checkpoints of other projects, loaded safely, with a short report when they do not fit.

One loader for every weights file (utils.torchfile.load_file): ``weights_only=True`` (a
checkpoint is data, never code), zip CRCs checked, every failure one CheckpointError line.
Accepted wrappers: a raw state_dict, or one under ``state_dict`` / ``net_state_dict`` /
``model`` / ``backbone``; ``module.`` prefixes (DataParallel / DDP) are stripped.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping

import torch
from torch import nn

from utils.torchfile import (
    BACKBONE_FORMAT,
    CHECKPOINT_FORMAT,
    VERSION,
    CheckpointError,
    check_header,
    format_of,
    is_int,
    load_file,
    require_field,
    save_file,
    short_repr,
    tensor_field,
    typed_field,
)

_SHOW = 5  # how many names of each kind the mismatch report lists


def load_state_dict_file(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """Read ``path`` into a flat ``{key: tensor}`` dict (unwrapped, ``module.`` stripped).

    Raises utils.torchfile.CheckpointError (a ValueError) naming the file and what is wrong.
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


MAX_EMBEDDING = 65536  # embedding sizes: checked before a model of that width is allocated


CHANNEL_ORDERS = ("rgb", "bgr")


WRAPPER_KEYS = ("state_dict", "net_state_dict", "model", "backbone")  # where foreign files keep their weights


def _model_fields(name: Any, emb: Any, order: Any, path: str, prefix: str) -> None:
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{path}: field '{prefix}backbone' is {short_repr(name)}, not an architecture name")
    if not is_int(emb, 1, MAX_EMBEDDING):
        raise CheckpointError(f"{path}: field '{prefix}embedding_size' is {short_repr(emb)}, "
                              f"not an integer in 1..{MAX_EMBEDDING}")
    if not isinstance(order, str) or order not in CHANNEL_ORDERS:
        field = f"{prefix}input_order" if prefix else "channel_order"
        raise CheckpointError(f"{path}: field {field!r} is {short_repr(order)}, not one of {CHANNEL_ORDERS}")


def describe_backbone(data: Any, path: str) -> Dict[str, Any] | None:
    """What rebuilds the model of one of our files, validated; None for a file of another format.

    Returns ``{"backbone", "embedding_size", "channel_order", "state_dict", "config"}`` for a
    backbone.pt (its own fields) or a training checkpoint (its config; embedding 512, rgb if absent).
    """
    fmt = format_of(data)
    if fmt == BACKBONE_FORMAT:
        check_header(data, path, BACKBONE_FORMAT, "backbone file")
        state = tensor_field(require_field(data, "state_dict", path, "backbone file"), path, "state_dict")
        name, emb, order = data.get("backbone"), data.get("embedding_size"), data.get("channel_order")
        _model_fields(name, emb, order, path, "")
        config = data.get("config", {})
        if not isinstance(config, Mapping):
            raise CheckpointError(f"{path}: field 'config' is a {type(config).__name__}, not a mapping")
    elif fmt == CHECKPOINT_FORMAT:
        check_header(data, path, CHECKPOINT_FORMAT, "training checkpoint")  # its model and config only
        tensor_field(require_field(data, "model", path, "training checkpoint"), path, "model")
        typed_field(data, "config", path, (Mapping,), "a mapping")
        config = data.get("config", {})
        name, emb, order = config.get("backbone"), config.get("embedding_size", 512), config.get("input_order", "rgb")
        _model_fields(name, emb, order, path, "config.")
        state = data["model"]
    else:
        return None
    return {"backbone": name, "embedding_size": emb, "channel_order": order, "state_dict": state,
            "config": dict(config)}


def load_backbone_checkpoint(path: str) -> Dict[str, Any]:
    """Read and validate a backbone.pt (or a training checkpoint's model) for evaluation or export.

    Returns ``{"backbone", "embedding_size", "channel_order", "state_dict", "config"}``; every
    field is checked before anything is built from it (a 10**9-wide embedding is refused unbuilt).
    """
    info = describe_backbone(load_file(path), path)
    if info is None:
        raise CheckpointError(f"{path}: not a backbone file of this project (no format={BACKBONE_FORMAT!r}); "
                              f"foreign weights need the architecture named")
    return info


def state_dict_of(obj: Any, path: str) -> Dict[str, torch.Tensor]:
    """The flat ``{key: tensor}`` weights of a foreign file: a raw state_dict or one under WRAPPER_KEYS.

    ``module.`` prefixes (DataParallel / DDP) are stripped.
    """
    for key in WRAPPER_KEYS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: expected a state_dict (key -> tensor) or one wrapped under {WRAPPER_KEYS}, "
                              f"got {type(obj).__name__}")
    out: Dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {short_repr(k)} is a {type(v).__name__}, not a tensor; "
                                  f"not a backbone state_dict")
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


def save_backbone(path: str, state_dict: Mapping[str, torch.Tensor], backbone: str, embedding_size: int,
                  channel_order: str, config: Mapping[str, Any] | None = None, **extra: Any) -> None:
    """Write the evaluation/export file: weights and how to rebuild the model."""
    save_file({"format": BACKBONE_FORMAT, "version": VERSION, "backbone": backbone,
               "embedding_size": int(embedding_size), "channel_order": channel_order,
               "config": dict(config or {}), "state_dict": dict(state_dict), **extra}, path)
