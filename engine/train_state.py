"""What the run's parts put into checkpoint.pt and take back out: the backbone, the head and its
criterion, the optimizer, the lr scheduler, the loss scaler and the EMA (the counters beside them
are the trainer's).

The state is independent of the world size: a sharded head (Partial FC) gathers its centres
(``Objective.checkpoint_state``) and their per-parameter optimizer state (momentum, AdamW's
moments) as full matrices in rank 0's host memory, never on a GPU, and re-shards them on load
at whatever world size the run resumes with. Gathering is collective: every rank calls
:func:`parts_state`; only rank 0's copy is complete.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn as nn

from engine.ema import BackboneEMA
from engine.objective import Objective
from engine.optim import optimizer_params, per_parameter_state


def gathered_optimizer_state(optimizer: torch.optim.Optimizer, objective: Objective, group: Any) -> Dict[str, Any]:
    """``optimizer.state_dict()`` with each sharded parameter's state as full matrices (collective, via ``group``)."""
    state = optimizer.state_dict()
    sharded = {id(p) for p in objective.sharded_parameters()}
    for i, p in enumerate(optimizer_params(optimizer)):
        entry = state["state"].get(i, {})
        if id(p) in sharded:  # a new entry: the optimizer's own state is not touched
            state["state"][i] = dict(entry, **{k: objective.gather_rows(entry[k], dst=0, group=group)
                                               for k in per_parameter_state(entry, p)})
    return state


def resharded_optimizer_state(saved: Dict[str, Any], optimizer: torch.optim.Optimizer,
                              objective: Objective) -> Dict[str, Any]:
    """A saved optimizer state with each sharded parameter's full matrices cut back to this rank's rows."""
    state = dict(saved, state=dict(saved["state"]))
    sharded = {id(p) for p in objective.sharded_parameters()}
    for i, p in enumerate(optimizer_params(optimizer)):
        entry = state["state"].get(i, {})
        if id(p) in sharded:  # full matrices (momentum, exp_avg, ...) back to this rank's rows
            state["state"][i] = dict(entry, **{k: objective.shard_rows(entry[k])
                                               for k in per_parameter_state(entry, p)
                                               if entry[k].shape != p.shape})
    return state


def parts_state(model: nn.Module, objective: Objective, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                ema: BackboneEMA | None, group: Any) -> Dict[str, Any]:
    """checkpoint.pt's ``ema`` (with --ema-decay), ``model``, ``head``, ``criterion``, ``optimizer``,
    ``scheduler`` and ``scaler`` fields. Collective (``group``: the CPU process group, or None)."""
    optimizer_state = gathered_optimizer_state(optimizer, objective, group)
    return {**({} if ema is None else {"ema": ema.state_dict()}), "model": model.state_dict(),
            **objective.checkpoint_state(group), "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict()}


def load_parts_state(state: Dict[str, Any], model: nn.Module, objective: Objective,
                     optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                     scaler: torch.amp.GradScaler, ema: BackboneEMA | None, use_scaler: bool) -> None:
    """The reverse of :func:`parts_state`, from a checkpoint written at any world size.

    A checkpoint without an average (``--ema-decay`` newly switched on) starts the EMA from its
    weights; an empty ``scaler`` (saved without loss scaling: CPU, bf16) leaves a new scaler afresh.
    """
    model.load_state_dict(state["model"])
    objective.load_checkpoint_state(state)
    optimizer.load_state_dict(resharded_optimizer_state(state["optimizer"], optimizer, objective))
    if ema is not None and "ema" in state:
        ema.load_state_dict(state["ema"])
    elif ema is not None:
        ema.module.load_state_dict(state["model"])
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] or not use_scaler:
        scaler.load_state_dict(state["scaler"])
