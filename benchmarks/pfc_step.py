"""Partial FC training step at a million classes, under torchrun: step time and peak device memory.

    torchrun --nproc_per_node=1 benchmarks/pfc_step.py --classes 1000000 --sample-rate 0.1 \
        --backbone mobilefacenet --batch-size 256 --amp --steps 20 --json out.json

A pack with a million classes cannot be made small (its property is checked against the
records), so this drives engine.trainer.Trainer.train_step directly, as bench_train.py does,
with random uint8 batches and labels in [0, classes): the head is built the way train.py builds
it (centres deferred, each rank draws its own shard; PartialFC around an ArcFace head and
cross-entropy). Under torchrun it joins the process group itself (NCCL on CUDA, gloo on the
CPU) even at one process, where engine.distributed would not (it starts a group only for
WORLD_SIZE > 1); without ``device_id`` (NCCL connects at its first collective, not at init, so
a backend that cannot start does not cost the step's numbers). At one process the training
step runs no collective, so after the timed steps one all-reduce proves the backend works
(``all_reduce_ok``). Rank 0 writes one JSON object (``--json``) and prints it on stdout; the
file is written before that all-reduce too, so a backend that fails or hangs there leaves the
step's numbers behind.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import backbones  # noqa: E402
import heads  # noqa: E402
import losses  # noqa: E402
from config import Config, apply_overrides  # noqa: E402
from engine.distributed import DistInfo  # noqa: E402
from engine.trainer import Trainer  # noqa: E402
from heads.base import deferred_centres  # noqa: E402
from heads.partial_fc import PartialFC  # noqa: E402
from utils.atomic import write_json  # noqa: E402


class _Sized:
    """Stands in for a dataset: the trainer only needs its length to plan epochs."""

    def __len__(self) -> int:
        return 10 ** 8


def memory_estimate_gb(classes: int, embedding: int, sample_rate: float, world_size: int = 1) -> dict:
    """What the centres of one rank cost on the device, in GB (1e9 bytes), fp32.

    README: "2M identities x 512 floats is 4 GB" (the centres alone). Training keeps, per rank,
    the shard (C/W x D x 4 bytes), its gradient (dense, the shard's shape: the gather of the
    sampled rows scatters back into a full-size gradient) and its SGD momentum; plus the sampled
    rows (R x shard) and their gradient. The backbone's activations come on top.
    """
    shard = classes / world_size * embedding * 4 / 1e9
    return {"centres_gb": shard, "centres_grad_momentum_gb": 3 * shard,
            "with_sampled_rows_gb": 3 * shard + 2 * sample_rate * shard}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=1_000_000)
    p.add_argument("--sample-rate", type=float, default=0.1)
    p.add_argument("--backbone", default="mobilefacenet")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default="", help="write the result here (rank 0)")
    args = p.parse_args(argv)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    backend = None
    if "RANK" in os.environ:  # started by torchrun: join its group even at one process
        if use_cuda:
            torch.cuda.set_device(device)
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=5))
    if use_cuda:
        torch.backends.cudnn.benchmark = True
    info = DistInfo(rank, world, local)
    torch.manual_seed(0)
    cfg = apply_overrides(Config(), dict(backbone=args.backbone, batch_size=args.batch_size, amp=args.amp,
                                         partial_fc=True, sample_rate=args.sample_rate, lr=0.01, grad_clip=5.0,
                                         progress=False, num_workers=0, output=os.devnull))
    t0 = time.perf_counter()
    model = backbones.build(args.backbone)
    with deferred_centres():
        head = heads.build("arcface", cfg.embedding_size, args.classes)
    objective = PartialFC(head, losses.build("cross_entropy"), sample_rate=args.sample_rate, rank=rank,
                          world_size=world, seed=0)
    if use_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(cfg, model, objective, _Sized(), device, dist_info=info)
    build_s = time.perf_counter() - t0
    built_gb = torch.cuda.memory_allocated(device) / 1e9 if use_cuda else None  # weights only
    g = torch.Generator().manual_seed(rank)
    images = torch.randint(0, 256, (args.batch_size, 3, 112, 112), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, args.classes, (args.batch_size,), generator=g)
    if use_cuda:
        images, labels = images.pin_memory(), labels.pin_memory()
    batch = [(images, labels)]
    losses_seen = []
    for _ in range(args.warmup):
        losses_seen.append(float(trainer.train_step(batch)))
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = trainer.train_step(batch)
    _sync(device)
    step_s = (time.perf_counter() - t0) / max(args.steps, 1)
    losses_seen.append(float(loss))
    result = {"device": torch.cuda.get_device_name(device) if use_cuda else "cpu", "backend": backend,
              "world_size": world, "classes": args.classes, "sample_rate": args.sample_rate,
              "backbone": args.backbone, "batch_size": args.batch_size, "amp": args.amp, "steps": args.steps,
              "build_s": build_s, "step_s": step_s, "img_per_s": args.batch_size * world / step_s,
              "loss_finite": all(v == v and abs(v) != float("inf") for v in losses_seen),
              "bad_steps": trainer.bad_steps,
              "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if use_cuda else None,
              # held between steps (weights, gradients, momentum): what the README's x3 rule describes
              "allocated_built_gb": built_gb,
              "allocated_after_steps_gb": torch.cuda.memory_allocated(device) / 1e9 if use_cuda else None,
              "estimate": memory_estimate_gb(args.classes, cfg.embedding_size, args.sample_rate, world),
              "all_reduce_ok": None}
    if rank == 0 and args.json:
        write_json(args.json, result)
    if dist.is_initialized():
        t = torch.ones(1, device=device)
        dist.all_reduce(t)
        result["all_reduce_ok"] = float(t) == world
    if rank == 0:
        if args.json:
            write_json(args.json, result)
        print(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
