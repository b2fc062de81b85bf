"""Optimizers by name (``--optimizer``) and the parameter groups they train.

One grouping function, ``param_groups``, serves plain training, fine-tuning
(``--backbone-lr-mult``), ``--head-lr-mult`` and ViT layer-wise lr decay (``--layer-decay``):
every parameter gets a weight decay (its value or 0) and an lr scale; parameters that share
both share a group. Each group keeps its scale as ``lr_scale`` (the group's lr is
``lr * lr_scale``; LambdaLR multiplies every group by the same schedule), so the base lr the
log reports is ``base_lr(optimizer)`` whatever group comes first.

Which parameters get no weight decay (``no_decay``):

* every optimizer: parameters with ``ndim <= 1``: biases, BatchNorm/LayerNorm weights, PReLU
  slopes (what SGD has always skipped here);
* AdamW in addition, by the last component of the parameter's NAME: ``pos_embed``,
  ``cls_token``, ``mask_token`` (arcface_torch's ViT names; they are 3-d tensors, so the ndim
  rule misses them). SGD keeps the ndim rule alone, as before this registry.

Layer-wise lr decay with factor d over a backbone of L transformer blocks (parameters named
``...blocks.<i>.`` with i = 0..L-1): block i trains at ``d**(L - i)``; the patch embedding,
``pos_embed``, ``cls_token`` and ``mask_token`` (the layers before block 0) at ``d**(L + 1)``;
everything after the blocks (final norm, feature/embedding layers) and the head at 1.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Iterable, List, Tuple

import torch
import torch.nn as nn

from config import Config, ConfigError
from utils.registry import Registry

OPTIMIZERS = Registry("optimizer")

# Tokens and embeddings AdamW does not decay (ViT names, as arcface_torch's vit.py spells them).
EMBEDDING_NAMES = ("pos_embed", "cls_token", "mask_token")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


@OPTIMIZERS.register("sgd")
def _sgd(groups: List[Dict[str, Any]], cfg: Config) -> torch.optim.Optimizer:
    """SGD with momentum ``--momentum``; weight decay (L2, added to the gradient) per group."""
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


@OPTIMIZERS.register("adamw")
def _adamw(groups: List[Dict[str, Any]], cfg: Config) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter): ``--betas``, ``--eps``; decoupled decay p <- p * (1 - lr * wd)."""
    if len(cfg.betas) != 2:
        raise ConfigError(f"--betas {','.join(f'{b:g}' for b in cfg.betas)}: give two values, e.g. 0.9,0.999")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps)


# Per optimizer: the parameter names (last component) that get no weight decay beyond ndim <= 1.
NO_DECAY_NAMES: Dict[str, Tuple[str, ...]] = {"sgd": (), "adamw": EMBEDDING_NAMES}


def no_decay(name: str, p: torch.Tensor, names: Tuple[str, ...] = EMBEDDING_NAMES) -> bool:
    """True when parameter ``name`` gets no weight decay: ndim <= 1, or its last name component in ``names``."""
    return p.ndim <= 1 or name.rsplit(".", 1)[-1] in names


def layer_scales(names: Iterable[str], decay: float, what: str = "the backbone") -> Dict[str, float]:
    """The lr scale of each backbone parameter name under layer-wise decay ``decay`` (see the module doc).

    ``decay`` 1 gives 1 everywhere; otherwise a backbone without ``blocks.<i>.`` parameters is a ConfigError.
    """
    names = list(names)
    if decay == 1:
        return {n: 1.0 for n in names}
    blocks = {n: int(m.group(1)) for n in names if (m := _BLOCK.search(n))}
    if not blocks:
        raise ConfigError(f"--layer-decay {decay:g}: {what} has no transformer blocks (parameters named "
                          f"blocks.<i>.); use --layer-decay 1 (off) or a ViT backbone")
    depth = max(blocks.values()) + 1
    scales = {}
    for n in names:
        if n in blocks:
            scales[n] = decay ** (depth - blocks[n])
        elif n.split(".", 1)[0] in EMBEDDING_NAMES or n.startswith("patch_embed."):
            scales[n] = decay ** (depth + 1)
        else:
            scales[n] = 1.0
    return scales


def param_groups(backbone: nn.Module, head: nn.Module | None, weight_decay: float, lr: float = 1.0,
                 backbone_lr_mult: float = 1.0, head_lr_mult: float = 1.0, layer_decay: float = 1.0,
                 no_decay_names: Tuple[str, ...] = ()) -> List[Dict[str, Any]]:
    """Optimizer groups of the trainable parameters of ``backbone`` and ``head``.

    Each group: ``params``, ``weight_decay`` (``weight_decay`` or 0, see ``no_decay``), ``lr_scale``
    (head: ``head_lr_mult``; backbone: ``backbone_lr_mult`` times its layer-decay scale) and
    ``lr = lr * lr_scale``. One pair of groups per lr scale, decay then no decay (either may be
    empty), in the order the scales are first met; the head is walked first when a multiplier is
    set (group 0 then carries the head's lr), else the backbone. So a run without multipliers has
    the two groups, and one with ``--backbone-lr-mult`` the four, that checkpoints written before
    this registry number their optimizer state by.
    """
    groups: Dict[Tuple[float, bool], Dict[str, Any]] = {}

    def add(named: List[Tuple[str, nn.Parameter]], scale_of: Callable[[str], float]) -> None:
        for name, p in named:
            if not p.requires_grad:
                continue
            scale = scale_of(name)
            if (scale, False) not in groups:
                for skip in (False, True):
                    groups[(scale, skip)] = {"params": [], "weight_decay": 0.0 if skip else weight_decay,
                                             "lr_scale": scale, "lr": lr * scale}
            groups[(scale, no_decay(name, p, no_decay_names))]["params"].append(p)

    named = list(backbone.named_parameters())
    layers = layer_scales([n for n, _ in named], layer_decay)
    parts = [(named, lambda n: backbone_lr_mult * layers[n])]
    if head is not None:
        head_part = (list(head.named_parameters()), lambda _: head_lr_mult)
        plain = backbone_lr_mult == 1 and head_lr_mult == 1 and layer_decay == 1
        parts = parts + [head_part] if plain else [head_part] + parts
    for part in parts:
        add(*part)
    return list(groups.values())


def build_optimizer(cfg: Config, backbone: nn.Module, head: nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` over ``param_groups`` of ``backbone`` and ``head`` as ``cfg`` says."""
    name = cfg.optimizer.lower()
    builder = OPTIMIZERS.get(name)
    groups = param_groups(backbone, head, cfg.weight_decay, cfg.lr, backbone_lr_mult=cfg.backbone_lr_mult,
                          head_lr_mult=cfg.head_lr_mult, layer_decay=cfg.layer_decay,
                          no_decay_names=NO_DECAY_NAMES.get(name, ()))
    return builder(groups, cfg)


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The scheduled lr before any per-group multiplier (what the log reports)."""
    for group in optimizer.param_groups:  # the first group with a non-zero multiplier
        if group.get("lr_scale", 1.0):
            return group["lr"] / group.get("lr_scale", 1.0)
    return optimizer.param_groups[0]["lr"]


def optimizer_params(optimizer: torch.optim.Optimizer) -> List[nn.Parameter]:
    """Parameters in the optimizer's state numbering."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def per_parameter_state(state: Dict[str, Any], p: torch.Tensor) -> List[str]:
    """Keys of one parameter's optimizer state that are tensors shaped like it (SGD's momentum_buffer,
    AdamW's exp_avg/exp_avg_sq; not the scalar step): the entries a sharded head gathers and re-shards."""
    return [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.ndim == p.ndim and v.ndim > 0
            and v.shape[1:] == p.shape[1:]]
