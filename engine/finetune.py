"""Fine-tuning: start a run from published or earlier weights instead of random ones.

``--init-backbone FILE`` reads one of three kinds of file, all through the one safe loader
(utils.torchfile.load_file, ``weights_only=True``):

- our ``backbone.pt`` (format facetrain-backbone) or a training ``checkpoint.pt``: the file
  names its architecture, embedding size and channel order; fields not typed on the command
  line are taken from it;
- a foreign state_dict (arcface_torch ``backbone.pth``, InsightFace_Pytorch
  ``model_ir_se50.pth``, raw or under state_dict/model/..., ``module.`` stripped): our
  backbones use those projects' key names, so the keys decide the layout. Without
  ``--backbone`` the architecture is the one registered layout whose keys equal the file's
  (built on the meta device: nothing allocated); without ``--embedding-size`` the width is
  read off the file; without ``--input-order`` the channel order is the one that layout was
  published with (BGR for InsightFace_Pytorch, RGB for arcface_torch).

Weights must fit exactly (backbones.weights.mismatch_report) and be finite; otherwise one
line, before any training. ``--init-head CHECKPOINT`` loads only the margin head (and its
criterion's state) of one of our training checkpoints when classes and embedding size match.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping

import torch
from torch import nn

import backbones
from backbones.weights import describe_backbone, mismatch_report, state_dict_of
from config import Config, ConfigError, apply_overrides
from engine.checkpoint import load_training_checkpoint
from engine.objective import DenseLoss
from utils.torchfile import CheckpointError, check_finite, load_file, sha256_file


@dataclass
class BackboneInit:
    """What --init-backbone read: the weights and what the file says about them (None: it does not say)."""

    path: str
    sha256: str
    kind: str  # "facetrain backbone file", "training checkpoint", "foreign state_dict"
    state_dict: Dict[str, torch.Tensor]
    backbone: str | None = None
    embedding_size: int | None = None
    channel_order: str | None = None


def read_backbone_init(path: str) -> BackboneInit:
    """Read and validate an --init-backbone file (one CheckpointError line when it is not weights)."""
    try:
        data = load_file(path)
        info = describe_backbone(data, path)
        state = state_dict_of(data, path) if info is None else None
    except CheckpointError as exc:  # the flag that named the file, then the file's own one line
        raise CheckpointError(f"--init-backbone {exc}") from None
    digest = sha256_file(path)
    if state is not None:
        init = BackboneInit(path, digest, "foreign state_dict", state)
    else:
        kind = "training checkpoint" if "step" in data else "facetrain backbone file"
        init = BackboneInit(path, digest, kind, dict(info["state_dict"]), info["backbone"],
                            int(info["embedding_size"]), info["channel_order"])
    check_finite(init.state_dict, f"--init-backbone {path}")
    return init


def _meta_keys(name: str, embedding_size: int) -> Dict[str, torch.Size]:
    """Key -> shape of backbone ``name`` without allocating it (meta device)."""
    with torch.device("meta"):
        model = backbones.build(name, embedding_size=embedding_size)
    return {k: v.shape for k, v in model.state_dict().items()}


def layouts_fitting(state: Mapping[str, torch.Tensor]) -> List[str]:
    """Registered backbones with a published layout whose state_dict keys equal the file's."""
    keys = set(state)
    return [n for n in backbones.names() if backbones.spec(n).layout and set(_meta_keys(n, 2)) == keys]


def embedding_size_of(name: str, state: Mapping[str, torch.Tensor]) -> int | None:
    """The embedding width the file's weights have for architecture ``name`` (None if they do not say)."""
    one, two = _meta_keys(name, 1), _meta_keys(name, 2)
    for key, shape in one.items():
        if key in state and shape != two[key]:
            dim = next(i for i, (a, b) in enumerate(zip(shape, two[key])) if a != b)
            if state[key].dim() == len(shape):
                return int(state[key].shape[dim])
    return None


def adopt_fields(cfg: Config, init: BackboneInit, given: Mapping[str, Any]) -> tuple[Config, List[str]]:
    """The config to build with: fields typed on the command line stay; the others come from the file.

    Returns the config and notes saying where each adopted value came from (for the log).
    """
    typed = set(given)
    notes: List[str] = []
    take: Dict[str, Any] = {}
    if init.backbone is not None:  # one of ours: it names what it is
        if "input_order" in typed and given["input_order"] != init.channel_order:
            raise ConfigError(f"--input-order {given['input_order']} but --init-backbone {init.path} was trained on "
                              f"{init.channel_order} input (its channel_order): drop --input-order")
        for field, value in (("backbone", init.backbone), ("embedding_size", init.embedding_size),
                             ("input_order", init.channel_order)):
            if field not in typed and getattr(cfg, field) != value:
                take[field] = value
                notes.append(f"{field} {value} (from the file)")
        cfg = apply_overrides(cfg, take)
        check_fits(init, cfg)
        return cfg, notes
    name = cfg.backbone
    if "backbone" not in typed:
        fits = layouts_fitting(init.state_dict)
        if len(fits) != 1:
            what = (f"its keys fit several architectures ({', '.join(fits)})" if fits else
                    f"its keys ({', '.join(list(init.state_dict)[:3])}, ...) fit no published layout")
            raise ConfigError(f"--init-backbone {init.path}: foreign weights, and {what}: "
                              f"name the architecture with --backbone")
        name = fits[0]
        if name != cfg.backbone:
            take["backbone"] = name
        notes.append(f"backbone {name} (the file's keys are the {backbones.spec(name).layout} layout)")
    if "embedding_size" not in typed:
        width = embedding_size_of(name, init.state_dict)
        if width is not None and width != cfg.embedding_size:
            take["embedding_size"] = width
            notes.append(f"embedding_size {width} (from the file)")
    if "input_order" not in typed:
        order = backbones.spec(name).trained_channel_order
        if order != cfg.input_order:
            take["input_order"] = order
        notes.append(f"input_order {order} (the order {backbones.spec(name).layout or name} weights are published "
                     f"for; --input-order to change)")
    cfg = apply_overrides(cfg, take)
    check_fits(init, cfg)
    return cfg, notes


def check_fits(init: BackboneInit, cfg: Config, model_sd: Mapping[str, Any] | None = None) -> None:
    """One ConfigError line unless ``init``'s weights fit cfg's backbone key for key and shape for shape
    (checked on the meta device before the model exists, unless ``model_sd`` is given)."""
    if model_sd is None:
        with torch.device("meta"):
            model_sd = backbones.build(cfg.backbone, embedding_size=cfg.embedding_size).state_dict()
    problems = mismatch_report(model_sd, init.state_dict)
    if problems:
        raise ConfigError(f"--init-backbone {init.path} ({init.kind}) does not fit --backbone {cfg.backbone} with "
                          f"--embedding-size {cfg.embedding_size}: " + "; ".join(problems))


def load_backbone_init(model: nn.Module, init: BackboneInit, cfg: Config) -> str:
    """Copy ``init``'s weights into ``model`` (every key, exact shapes); the line that says what was loaded."""
    check_fits(init, cfg, model.state_dict())
    model.load_state_dict(init.state_dict)
    layout = backbones.spec(cfg.backbone).layout
    return (f"init backbone: {init.path} (sha256 {init.sha256[:12]}, {init.kind}"
            f"{', ' + layout + ' layout' if layout and init.backbone is None else ''}): "
            f"{cfg.backbone}, embedding {cfg.embedding_size}, {cfg.input_order} input, "
            f"{len(init.state_dict)} tensors loaded")


def load_head_init(objective: Any, path: str, num_classes: int, embedding_size: int) -> str:
    """Load the margin head (and its criterion's state) of our training checkpoint ``path`` into ``objective``.

    The class centres must be (num_classes, embedding_size); the head's other keys must match.
    Returns the line that says what was loaded.
    """
    state = load_training_checkpoint(path)
    head = state.get("head")
    if not isinstance(head, Mapping) or not isinstance(head.get("weight"), torch.Tensor):
        raise ConfigError(f"--init-head {path}: the checkpoint holds no margin head with class centres ('weight')")
    saved = tuple(head["weight"].shape)
    if saved != (num_classes, embedding_size):
        raise ConfigError(f"--init-head {path}: its head has {saved[0]} classes x embedding {saved[-1]}, "
                          f"this run needs {num_classes} x {embedding_size} (same data and --embedding-size)")
    ours = objective.head if isinstance(objective, DenseLoss) else objective  # Partial FC is its own head
    mine = {k: v for k, v in ours.state_dict().items() if k != "weight"}
    problems = mismatch_report(mine, {k: v for k, v in head.items() if k != "weight"})
    if problems:
        raise ConfigError(f"--init-head {path}: its head does not fit --head of this run: " + "; ".join(problems))
    check_finite(head, f"--init-head {path}")
    objective.load_checkpoint_state({"head": dict(head), "criterion": state.get("criterion", {})})
    name = state.get("config", {}).get("head", "?")
    return (f"init head: {path} (sha256 {sha256_file(_file_of(path))[:12]}, head {name}): "
            f"{num_classes} classes x {embedding_size}, {len(head)} tensors loaded")


def _file_of(path: str) -> str:
    return os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
