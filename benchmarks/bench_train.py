"""Training-step throughput: our Trainer step in several modes against a plain PyTorch loop.

    python benchmarks/bench_train.py [--backbones mobilefacenet,ir_se50,vit_t,vit_s] [--batch-size 32] [--steps 4]
                                     [--modes eager,channels_last,amp,compile] [--device auto] [--classes 10000]

For each backbone, in one run, side by side:
- plain: a straightforward loop written here (float input normalised beforehand, backbone,
  normalised-linear ArcFace, cross-entropy, SGD), fp32, contiguous NCHW: what a seed does;
- ours in each mode, through engine.trainer.Trainer.train_step (uint8 batch in, flip and
  normalise on the device, head in fp32, gradient clipping): eager (NCHW fp32), channels_last,
  amp (channels_last + autocast as --amp-dtype auto picks it: bf16 on CPUs and A100/H100, else fp16 +
  GradScaler), compile (channels_last
  + torch.compile, fp32), amp+compile. Default modes: all on a GPU; on a CPU the amp ones are
  left out (bf16 autocast is several times slower than fp32 on CPUs without fast bf16 paths;
  ask for them with --modes).
Images/s is measured after warm-up steps (compile's warm-up excluded and reported apart). On a
GPU it also reports the share of the device's measured bf16 matmul peak the step reaches, from
the model's multiply-accumulates (training ~ 3 x forward, 2 FLOPs per MAC), and each mode's peak
device memory. Prints a table on stderr and, on stdout, the JSON object so far after every mode
(the last line is the whole result), so a run stopped at a deadline (a slow cold compile) keeps
the modes it finished; a mode that raises (a compile failure, out of memory) is recorded as
{"error": one line} and the next one runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import backbones  # noqa: E402
import heads  # noqa: E402
import losses  # noqa: E402
from backbones.profile import profile  # noqa: E402
from config import Config, apply_overrides  # noqa: E402
from engine.objective import DenseLoss  # noqa: E402
from engine.trainer import Trainer  # noqa: E402

MODES = {  # name -> Config overrides
    "eager": dict(channels_last=False, amp=False, compile=False),
    "channels_last": dict(channels_last=True, amp=False, compile=False),
    "amp": dict(channels_last=True, amp=True, compile=False),
    "compile": dict(channels_last=True, amp=False, compile=True),
    "amp+compile": dict(channels_last=True, amp=True, compile=True),
}


class _Sized:
    """Stands in for a dataset: the trainer only needs its length to plan epochs."""

    def __len__(self) -> int:
        return 10 ** 7


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, steps: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return time.perf_counter() - t0


def plain_loop(name: str, args, device: torch.device, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """The seeds' way: float NCHW input prepared on the host, fp32, no memory-format tricks."""
    torch.manual_seed(0)
    model = backbones.build(name).to(device).train()
    weight = torch.nn.Parameter(torch.randn(args.classes, 512, device=device) * 0.01)
    opt = torch.optim.SGD(list(model.parameters()) + [weight], lr=0.01, momentum=0.9, weight_decay=5e-4)
    x_host = images.float().div(255).sub(0.5).div(0.5)  # ToTensor + Normalize, done up front (favours plain)
    cos_m, sin_m, s = math.cos(0.5), math.sin(0.5), 64.0

    def step():
        x, y = x_host.to(device), labels.to(device)
        cos = F.linear(F.normalize(model(x)), F.normalize(weight)).clamp(-1, 1)
        sin = (1 - cos.pow(2)).clamp_min(0).sqrt()
        target = cos * cos_m - sin * sin_m
        one_hot = F.one_hot(y, args.classes).bool()
        loss = F.cross_entropy(s * torch.where(one_hot, target, cos), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    _timed(step, args.warmup, device)
    seconds = _timed(step, args.steps, device)
    return {"img_per_s": args.steps * args.batch_size / seconds}


def ours(name: str, mode: str, args, device: torch.device, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Trainer.train_step on a uint8 batch, in one of MODES."""
    torch.manual_seed(0)
    cfg = apply_overrides(Config(), dict(MODES[mode], backbone=name, batch_size=args.batch_size, lr=0.01,
                                         grad_clip=5.0, progress=False, num_workers=0, output=os.devnull))
    head = heads.build("arcface", 512, args.classes, s=64.0, m=0.5)
    trainer = Trainer(cfg, backbones.build(name), DenseLoss(head, losses.build("cross_entropy")), _Sized(), device)
    batch = [(images, labels)]
    t_warm = _timed(lambda: trainer.train_step(batch), args.warmup, device)
    seconds = _timed(lambda: trainer.train_step(batch), args.steps, device)
    return {"img_per_s": args.steps * args.batch_size / seconds, "warmup_s": t_warm}


def matmul_peak_tflops(device: torch.device) -> float | None:
    """Measured dense bf16 matmul throughput of the device (TFLOP/s), GPU only (after enough
    untimed products, about 15 ms on an H100, for the clocks to leave idle)."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    _timed(lambda: a @ b, 10, device)
    reps = 30
    seconds = _timed(lambda: a @ b, reps, device)
    return 2 * n ** 3 * reps / seconds / 1e12


def measured(fn: Callable[[], dict], device: torch.device) -> dict:
    """``fn()``'s result with the mode's peak device memory (GB, CUDA), or {"error": one line} if it raised."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        row = fn()
    except Exception as exc:  # a failed compile or an OOM is this mode's result; the next mode still runs
        lines = str(exc).strip().splitlines()
        return {"error": f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda":
        row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="mobilefacenet,ir_se50,vit_t,vit_s",
                        help="comma-separated (the issue's set: mobilefacenet,ir_se50,iresnet100,efficientnet_b0; "
                             "transformers: vit_t,vit_s)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile happens here)")
    parser.add_argument("--modes", default="", help=f"comma-separated of {', '.join(MODES)} (default: see above)")
    parser.add_argument("--classes", type=int, default=10000, help="identities of the ArcFace head")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    args.modes = args.modes or ",".join(m for m in MODES if device.type == "cuda" or "amp" not in m)
    unknown = [m for m in args.modes.split(",") if m not in MODES]
    if unknown:
        parser.error(f"--modes {','.join(unknown)}: not one of {', '.join(MODES)}")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, 112, 112), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, args.classes, (args.batch_size,), generator=g)
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
    peak = matmul_peak_tflops(device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "threads": torch.get_num_threads(), "torch": torch.__version__, "batch_size": args.batch_size,
               "bf16_matmul_peak_tflops": peak, "backbones": {}}
    for name in args.backbones.split(","):
        gmacs = profile(lambda n=name: backbones.build(n)).gmacs
        row = {"gmacs": gmacs}
        results["backbones"][name] = row
        row["plain"] = measured(lambda n=name: plain_loop(n, args, device, images, labels), device)
        print(json.dumps(results), flush=True)
        for mode in args.modes.split(","):
            row[mode] = measured(lambda n=name, m=mode: ours(n, m, args, device, images, labels), device)
            if "img_per_s" in row[mode] and "img_per_s" in row["plain"]:
                row[mode]["vs_plain"] = row[mode]["img_per_s"] / row["plain"]["img_per_s"]
            if peak and "img_per_s" in row[mode]:
                row[mode]["share_of_peak"] = row[mode]["img_per_s"] * 6 * gmacs * 1e9 / (peak * 1e12)
            print(json.dumps(results), flush=True)
        cells = ", ".join(f"{m} {_cell(row[m])}" for m in args.modes.split(","))
        print(f"{name} ({gmacs:.2f} GMACs) batch {args.batch_size} on {results['device']}: plain "
              f"{_cell(row['plain'])}; ours {cells}", file=sys.stderr)
    return results


def _cell(r: dict) -> str:
    if "error" in r:
        return f"failed ({r['error']})"
    ratio = f" ({r['vs_plain']:.2f}x)" if "vs_plain" in r else ""
    return f"{r['img_per_s']:.1f}{ratio}"


if __name__ == "__main__":
    main()
