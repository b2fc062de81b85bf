"""Run a function on W local processes, as torchrun would, for multi-process CPU tests (gloo).

    from tests.distributed import run_ranks

    def check(rank, world_size, n):          # module level: pickled by reference under "spawn"
        x = torch.full((n,), float(rank))
        dist.all_reduce(x)
        return x.tolist()                    # picklable return values come back to the parent

    results = run_ranks(check, 2, 3)         # [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], indexed by rank

Each child is a fresh interpreter (start method "spawn": no state forked from pytest), with
``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` set
as torchrun sets them, torch limited to ``threads`` intra-op threads, and, unless
``init_group=False``, the default process group already initialised (``backend``, from those
variables) and destroyed after ``fn`` returns. With ``init_group=False`` the child only gets
the variables, so code under test can call ``dist.init_process_group()`` itself (env://).

A rank that raises makes ``run_ranks`` stop the others and raise ``RankError`` with the rank and
the child's traceback text; a rank that dies without reporting, or a run past ``timeout``
seconds, raises as well. Children inherit the parent's ``sys.path`` and working directory (the
spawn start method passes them on), so repo modules import as they do in the parent.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable, List


class RankError(RuntimeError):
    """A child rank failed: the message names the rank and carries its traceback text."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, init_group: bool,
           backend: str, threads: int, timeout: float, results: Any) -> None:
    """Entry point of one rank: torchrun's environment, optional process group, ``fn``, report."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        if init_group:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout))
        try:
            value = fn(rank, world_size, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        results.put((rank, True, pickle.dumps(value)))  # by value: a tensor shared by fd dies with the child
    except BaseException:  # noqa: BLE001  every failure goes back to the parent as text
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120, init_group: bool = True,
              backend: str = "gloo", threads: int = 1) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; its return values by rank.

    ``fn`` and ``args`` must be picklable (``fn`` a module-level function); ``timeout`` is in
    seconds for the whole run (also the process group's collective timeout).
    """
    if world_size < 1:
        raise ValueError(f"run_ranks: world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, rank, world_size, port, args, init_group, backend, threads,
                                              timeout, results), daemon=True)
             for rank in range(world_size)]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            try:
                rank, ok, value = results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in values and p.exitcode is not None]
                if dead:
                    time.sleep(0.5)  # a rank that reported just before exiting: its message may still be in flight
                    if results.empty():
                        raise RankError(f"rank {dead[0]} of {world_size} exited with code "
                                        f"{procs[dead[0]].exitcode} without reporting") from None
                elif time.monotonic() > deadline:
                    missing = [r for r in range(world_size) if r not in values]
                    raise TimeoutError(f"run_ranks: rank(s) {missing} of {world_size} still running after "
                                       f"{timeout} s (a collective one rank never reached?)") from None
                continue
            if not ok:
                raise RankError(f"rank {rank} of {world_size} failed in {getattr(fn, '__name__', fn)}:\n{value}")
            values[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=5 if len(values) == world_size else 0)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    return [values[r] for r in range(world_size)]
