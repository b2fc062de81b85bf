"""Partial FC: memory per rank and step time of the sharded head, on W gloo ranks on this machine.

    python benchmarks/bench_partial_fc.py [--classes 100000,1000000,2000000] [--rates 1.0,0.1]
                                          [--world-sizes 1,2,4] [--dim 512] [--batch 256] [--steps 3]

For each (classes C, sample rate R, world size W): W processes (tests/distributed.py's
``run_ranks``, gloo), each with an ArcFace head's shard of C/W classes in a ``PartialFC`` and
SGD with momentum on it; one step = forward + backward + ``optimizer.step()`` of the head only,
on random local embeddings (global batch / W rows each, as a backbone would hand over). The
head is built under ``deferred_centres()``, as train.py builds it, so only the shard's centres
are ever drawn and memory is the steady state of training.

Reported per configuration: parameter + gradient + momentum bytes per rank (from tensor sizes,
the largest shard), peak RSS per rank (``getrusage`` ru_maxrss, max over ranks, and the same
minus the rank's RSS before the head existed: torch itself), and the step time (median over
``--steps`` timed steps of the slowest rank, after one warm-up step). All ranks share this
machine's cores (``2 // W`` threads each, at least 1), so step times at W > cores measure
oversubscription, not scaling; memory per rank is the point. A configuration whose estimated
total memory does not fit in MemAvailable (less a margin) is skipped and reported as such.

Prints a table on stderr and the results as one JSON line on stdout; ``--json`` writes them too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import heads  # noqa: E402
import losses  # noqa: E402
from heads.base import deferred_centres  # noqa: E402
from heads.partial_fc import PartialFC, shard_range  # noqa: E402
from tests.distributed import run_ranks  # noqa: E402

GIB = 1 << 30


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mem_available() -> int:
    """MemAvailable of the machine in bytes (Linux /proc/meminfo)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def estimate_bytes(classes: int, rate: float, world: int, dim: int, batch: int) -> int:
    """Rough total over all ranks (10-20% above what the 100k and 1M-class runs measured): per rank the
    weight, its gradient and momentum, the normalised sampled centres with their gradient and a
    temporary, four (batch, sampled classes) float32 tensors, and 0.7 GiB of torch and gloo."""
    rows = math.ceil(classes / world)
    sampled = math.ceil(rate * rows)
    per_rank = 4 * (3 * rows * dim + 3 * sampled * dim + 4 * batch * sampled) + int(0.7 * GIB)
    return world * per_rank


def bench_rank(rank: int, world: int, classes: int, rate: float, dim: int, batch: int, steps: int) -> dict:
    """One rank of one configuration (run by ``run_ranks``); returns this rank's figures."""
    with open("/proc/self/oom_score_adj", "w") as f:  # if memory runs out after all, the kernel picks us first
        f.write("1000")
    rss_before = rss_bytes()
    with deferred_centres():  # as train.py builds it: the full (C, D) matrix is never allocated
        head = heads.build("arcface", dim, classes)
    pfc = PartialFC(head, losses.build("cross_entropy"), sample_rate=rate, rank=rank, world_size=world, seed=0)
    pfc.train()
    optimizer = torch.optim.SGD(pfc.parameters(), lr=0.1, momentum=0.9)
    local = batch // world
    g = torch.Generator().manual_seed(1000 + rank)
    times = []
    for step in range(steps + 1):
        emb = torch.randn(local, dim, generator=g).requires_grad_(True)
        labels = torch.randint(0, classes, (local,), generator=g)
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = pfc(emb, labels)
        loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss {loss.item()} at step {step}")
        if step > 0:
            times.append(elapsed)
    state = sum(t.numel() * t.element_size() for t in (pfc.weight, pfc.weight.grad,
                                                        optimizer.state[pfc.weight]["momentum_buffer"]))
    return dict(state_bytes=state, peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                rss_before=rss_before, times=times, shard=pfc.end - pfc.start)


def run_config(classes: int, rate: float, world: int, args: argparse.Namespace) -> dict:
    record = dict(classes=classes, sample_rate=rate, world_size=world, dim=args.dim, global_batch=args.batch,
                  shard_classes=shard_range(classes, 0, world)[1], threads_per_rank=max(1, 2 // world))
    need, have = estimate_bytes(classes, rate, world, args.dim, args.batch), mem_available()
    if need > have - args.margin_gib * GIB:
        return dict(record, status=f"skipped: needs about {need / GIB:.1f} GiB, MemAvailable {have / GIB:.1f} GiB "
                                   f"less a {args.margin_gib} GiB margin")
    ranks = run_ranks(bench_rank, world, classes, rate, args.dim, args.batch, args.steps, timeout=args.timeout,
                      threads=max(1, 2 // world))
    slowest = [max(r["times"][i] for r in ranks) for i in range(args.steps)]
    return dict(record, status="ok", state_bytes_per_rank=max(r["state_bytes"] for r in ranks),
                peak_rss_per_rank=max(r["peak_rss"] for r in ranks),
                head_rss_per_rank=max(r["peak_rss"] - r["rss_before"] for r in ranks),
                step_time_s=statistics.median(slowest))


def table(records: list[dict]) -> str:
    lines = ["| classes | R | W | classes/rank | param+grad+momentum / rank | peak RSS / rank | "
             "peak RSS - torch / rank | step (ms) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        head = f"| {r['classes']:,} | {r['sample_rate']:g} | {r['world_size']} | {r['shard_classes']:,} |"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']} | | | |")
            continue
        lines.append(f"{head} {r['state_bytes_per_rank'] / GIB:.2f} GiB | {r['peak_rss_per_rank'] / GIB:.2f} GiB | "
                     f"{r['head_rss_per_rank'] / GIB:.2f} GiB | {1000 * r['step_time_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="100000,1000000,2000000", help="comma-separated class counts")
    parser.add_argument("--rates", default="1.0,0.1", help="comma-separated sample rates in (0, 1]")
    parser.add_argument("--world-sizes", default="1,2,4", help="comma-separated numbers of gloo ranks")
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--batch", type=int, default=256, help="global batch (divided by W per rank)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--margin-gib", type=float, default=4.0, help="memory left free for everything else (GiB)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument("--json", default="runs/bench_partial_fc.json", help="also write the results here")
    args = parser.parse_args(argv)
    records = []
    for classes in (int(c) for c in args.classes.split(",")):
        for rate in (float(r) for r in args.rates.split(",")):
            for world in (int(w) for w in args.world_sizes.split(",")):
                records.append(run_config(classes, rate, world, args))
                print(table(records[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(f"\nPartial FC, ArcFace head, D={args.dim}, global batch {args.batch}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs\n{table(records)}", file=sys.stderr)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    print(json.dumps(records))
    return records


if __name__ == "__main__":
    main()
