"""Backbone inference: eager vs channels_last vs torch.compile, equality and images/s.

    python benchmarks/bench_backbones.py [--names mobilefacenet ir_se50] [--batch 8] [--iters 2] [--rounds 3]
                                         [--threads 2] [--no-compile]

For each backbone: build (seed 0), calibrate its BN running statistics on a few random batches
so that eval-mode embeddings are O(1) (a fresh net's eval output is ~1e-8 and would make any
tolerance meaningless), then compare channels_last and torch.compile embeddings with eager
(max |diff| must be <= 1e-4) and time each (interleaved rounds, best kept). Prints a table on
stderr and one JSON line of results on stdout; exits 1 if a variant differs by more than 1e-4.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import backbones  # noqa: E402

TOLERANCE = 1e-4


def calibrate_bn(model: torch.nn.Module, batches: int = 4, batch: int = 16) -> None:
    """Cumulative-average BN statistics over a few random face-shaped batches."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.rand(batch, 3, 112, 112) * 2 - 1)
    model.eval()


def images_per_s(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, iters: int) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(iters):
            fn(x)
        return iters * x.shape[0] / (time.perf_counter() - start)


def bench_one(name: str, args: argparse.Namespace) -> Dict[str, object]:
    """Check equality once, then time the variants interleaved for ``rounds`` rounds, keeping the
    best round of each (the box may be shared: interleaving exposes all variants to the same load)."""
    torch.manual_seed(0)
    model = backbones.build(name)
    calibrate_bn(model)
    x = torch.rand(args.batch, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        ref = model(x)
    result: Dict[str, object] = {"embedding_abs_max": ref.abs().max().item()}
    variants: Dict[str, tuple] = {"eager": (model, x)}

    cl_model = backbones.build(name)
    cl_model.load_state_dict(model.state_dict())
    cl_model = cl_model.eval().to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        result["channels_last_max_diff"] = (cl_model(x_cl) - ref).abs().max().item()
    variants["channels_last"] = (cl_model, x_cl)

    if not args.no_compile:
        compiled = torch.compile(model)
        start = time.perf_counter()
        with torch.no_grad():
            out = compiled(x)
        result["compile_s"] = time.perf_counter() - start
        result["compile_max_diff"] = (out - ref).abs().max().item()
        variants["compile"] = (compiled, x)

    best = {k: 0.0 for k in variants}
    for _ in range(args.rounds):
        for key, (fn, inp) in variants.items():
            best[key] = max(best[key], images_per_s(fn, inp, args.iters))
    for key, v in best.items():
        result[f"{key}_img_s"] = v
    diffs = [v for k, v in result.items() if k.endswith("_max_diff")]
    result["within_tolerance"] = all(d <= TOLERANCE for d in diffs)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", nargs="+", default=["mobilefacenet", "ir_se50"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=2, help="batches per timing round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the best is kept")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for name in args.names:
        r = bench_one(name, args)
        results[name] = r
        line = (f"{name:<14} |emb|max {r['embedding_abs_max']:.3g}  eager {r['eager_img_s']:7.1f} img/s  "
                f"channels_last {r['channels_last_img_s']:7.1f} img/s (max diff {r['channels_last_max_diff']:.2e})")
        if "compile_img_s" in r:
            line += (f"  compile {r['compile_img_s']:7.1f} img/s (max diff {r['compile_max_diff']:.2e}, "
                     f"compiled in {r['compile_s']:.0f}s)")
        print(line + ("" if r["within_tolerance"] else f"  EXCEEDS {TOLERANCE}"), file=sys.stderr)
    meta = {"torch": torch.__version__, "threads": args.threads, "batch": args.batch, "device": "cpu"}
    print(json.dumps({"meta": meta, "results": results}))
    if not all(r["within_tolerance"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
