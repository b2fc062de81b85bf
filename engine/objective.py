"""The loss side of a training step: one surface for a dense head and for Partial FC.

The trainer sees every head through this surface (``Objective``), so its loop has no
special case for a sharded head. A dense margin head and its criterion are wrapped in
:class:`DenseLoss`; :class:`heads.partial_fc.PartialFC` offers the same methods itself.

    replica                 the module that runs with the backbone under DDP / DataParallel
                            (its gradients averaged over ranks like the backbone's), or None
    loss(emb, out, labels)  the scalar loss from the embeddings and the replica's output
    sharded_parameters()    parameters each rank holds a different part of (their gradients
                            are not averaged; their squared norms add up over ranks)
    checkpoint_state(group) {"head": ..., "criterion": ...}, world-size independent (collective
                            for a sharded head: full matrices gathered to rank 0 through ``group``)
    load_checkpoint_state   the reverse; accepts state written at any world size
    gather_rows / shard_rows  a sharded parameter's optimizer state (momentum), full <-> this rank's
"""

from __future__ import annotations

from typing import Any, Dict, List, Protocol

from torch import Tensor, nn


class Objective(Protocol):
    """What the trainer needs of a head and its loss (see the module docstring)."""

    replica: nn.Module | None

    def loss(self, embeddings: Tensor, out: Any, labels: Tensor) -> Tensor: ...

    def sharded_parameters(self) -> List[nn.Parameter]: ...

    def checkpoint_state(self, group: Any = None) -> Dict[str, Any]: ...

    def load_checkpoint_state(self, state: Dict[str, Any]) -> None: ...

    def gather_rows(self, shard: Tensor, dst: int | None = None, group: Any = None) -> Tensor | None: ...

    def shard_rows(self, full: Tensor) -> Tensor: ...


class DenseLoss(nn.Module):
    """A dense margin head (all class centres on every rank) and its criterion.

    The head runs inside the data-parallel wrapper with the backbone (``replica``), so DDP
    averages its gradients and DataParallel gathers its logits; the criterion runs on the
    gathered logits in fp32. Nothing is sharded, so the row methods are the identity.
    """

    def __init__(self, head: nn.Module, criterion: nn.Module) -> None:
        super().__init__()
        self.head, self.criterion = head, criterion

    @property
    def replica(self) -> nn.Module:
        return self.head

    def loss(self, embeddings: Tensor, out: Any, labels: Tensor) -> Tensor:
        """criterion(logits, labels) plus the head's extra loss (DataParallel gathers one per GPU: their mean)."""
        loss = self.criterion(out.logits, labels)
        return loss if out.extra_loss is None else loss + out.extra_loss.mean()

    def sharded_parameters(self) -> List[nn.Parameter]:
        return []

    def checkpoint_state(self, group: Any = None) -> Dict[str, Any]:
        return {"head": self.head.state_dict(), "criterion": self.criterion.state_dict()}

    def load_checkpoint_state(self, state: Dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.criterion.load_state_dict(state.get("criterion", {}))

    def gather_rows(self, shard: Tensor, dst: int | None = None, group: Any = None) -> Tensor | None:
        return shard.detach()

    def shard_rows(self, full: Tensor) -> Tensor:
        return full

