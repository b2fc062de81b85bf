"""torch.distributed as torchrun sets it up: who am I, wait for the others, agree on a flag.

A process group exists only when the script was started by torchrun (or anything
that sets the same environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
with WORLD_SIZE > 1; nothing happens at import. NCCL on CUDA, gloo on CPU. Every
helper here is a no-op (or the identity) in a single process, so the training loop
is one code path for 1 and N processes.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.errors import UserError


class DeviceError(UserError, ValueError):
    """A --device this machine does not have or torch does not know (one line, names the flag's value)."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job. ``world_size`` 1 means no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates and writes files; the others wait for it."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when the environment describes a multi-process job (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "auto", timeout_minutes: float = 120.0) -> tuple[DistInfo, torch.device]:
    """Join the job torchrun started (if any) and pick this process's device.

    ``device`` "auto" is cuda:LOCAL_RANK when CUDA is available, else the CPU. The
    timeout bounds how long ranks wait for each other (e.g. while rank 0 evaluates);
    it is generous by default because a full seven-set evaluation of a large model can
    take minutes.
    """
    if not launched_by_torchrun():
        return DistInfo(), _single_device(device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = resolve_device(f"cuda:{local if dev.index is None else dev.index}")
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistInfo(rank, world, local), dev


def _single_device(device: str) -> torch.device:
    return resolve_device(device)


def resolve_device(device: str) -> torch.device:
    """The torch.device for a --device value: "auto" (CUDA if available, else the CPU), cpu, cuda, cuda:N.

    Raises DeviceError for a name torch does not know, CUDA on a machine without it, or a
    cuda:N past the visible devices, before anything is allocated on it.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"--device {device!r}: not a device name (auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise DeviceError(f"--device {device}: not supported here (auto, cpu, cuda or cuda:N)")
    return dev


_WAIT_GROUP: list = []  # the gloo group barriers use, created on first use, dropped by cleanup()
WAIT_TIMEOUT = datetime.timedelta(days=7)


def barrier(info: DistInfo, device: torch.device) -> None:
    """Wait until every rank gets here, however long that takes (no-op in one process).

    Used while rank 0 evaluates or writes a checkpoint, which may take longer than the
    process group's timeout: the wait runs on a separate gloo group (CPU, no NCCL
    watchdog) whose timeout is a week. If rank 0 dies instead, torchrun stops the job.
    """
    if not info.distributed:
        return
    dist.barrier(group=cpu_group())


def cpu_group():
    """The CPU (gloo) group of all ranks, for barriers, flags and host-memory gathers.

    Created on first use, by every rank at once (a collective); its timeout is a week.
    """
    if not _WAIT_GROUP:
        _WAIT_GROUP.append(dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT))
    return _WAIT_GROUP[0]


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on at least one (e.g. "a stop signal arrived").

    Called every step: it runs on the CPU gloo group, so the GPU queue is not drained
    (a CUDA tensor's ``.item()`` would make the host wait for every queued kernel).
    """
    if not info.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=cpu_group())
    return bool(t.item())


def mean_over_ranks(value: float, info: DistInfo, device: torch.device) -> float:
    """The mean of a scalar across ranks (e.g. the logged loss)."""
    if not info.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def cleanup() -> None:
    """Leave the process group (if one was joined), so the process exits without warnings."""
    _WAIT_GROUP.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
