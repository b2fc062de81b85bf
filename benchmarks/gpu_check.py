"""One prepared GPU proof: six checks only a GPU can show, recorded after each one (make gpu-check).

    python benchmarks/gpu_check.py [--dry-run] [--out benchmarks/results] [--only 1,3] [--keep]

1. bench_train.py, iresnet50 and mobilefacenet at batch 256: eager, channels_last, amp (bf16),
   amp+compile against the plain loop (img/s, share of the measured bf16 matmul peak);
2. train.py on a synthetic pack, --decode-on-device against CPU-worker decoding: img/s and the
   GPU utilisation while training (nvidia-smi every 0.5 s): is the loader the bottleneck?;
3. torchrun --nproc_per_node=1 (NCCL): Partial FC at 1M classes, R=0.1, batch 256, amp: step
   time and peak memory against the README's estimate;
4. fp16 + GradScaler (--amp-dtype fp16): a few hundred steps, none skipped, the final scale;
5. evaluate.py --amp on the GPU against fp32 on the CPU: the same accuracies within one pair;
6. SIGTERM during a CUDA run: a checkpoint is written and --resume runs to the end.

Planned to fit in 8 minutes on one H100/H200: each check has a budget (printed first) that
bounds its subprocesses; a failed or timed-out check is recorded with its last stderr lines
and the next one runs. After each check gpu_check.json and gpu_check.md are rewritten
(atomically) under --out, so a machine taken away mid-run leaves the finished checks.
Without CUDA it says so in one line and exits 0. --dry-run runs the same code at toy sizes on
the CPU (part of the test suite) and writes gpu_check_dryrun.json/.md instead. Format:
benchmarks/results/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_checks as gc  # noqa: E402
import torch  # noqa: E402

from utils.atomic import write_json, write_text  # noqa: E402

SCHEMA = "facetrain-gpu-check/1"
# (id, name, what, GPU budget s, dry-run budget s, function); GPU budgets sum to at most 480 s
CHECKS: List[tuple] = [
    (1, "bench_train", "training-step modes vs the plain loop (bench_train.py)", 180, 150, gc.bench_train),
    (2, "loader", "decode on device vs CPU workers, GPU utilisation (train.py)", 80, 150, gc.loader),
    (3, "partial_fc_1m", "torchrun nproc 1, Partial FC 1M classes R=0.1: step time, peak memory", 60, 120,
     gc.partial_fc),
    (4, "fp16_scaler", "fp16 + GradScaler: no skipped step, the scale (train.py)", 50, 120, gc.fp16),
    (5, "eval_amp", "evaluate.py --amp on the device vs fp32 on the CPU, within one pair", 45, 150, gc.eval_amp),
    (6, "sigterm_resume", "SIGTERM mid-run writes a checkpoint; --resume finishes (train.py)", 50, 150, gc.sigterm),
]
GPU_BUDGET_S = 480


def environment(dry: bool) -> Dict[str, Any]:
    cuda = torch.cuda.is_available() and not dry
    return {"schema": SCHEMA, "dry_run": dry,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def markdown(report: Dict[str, Any]) -> str:
    """The table: one row per check, its headline numbers and verdict; then the commands run."""
    head = (f"# GPU check{' (dry run: toy sizes on the CPU)' if report['dry_run'] else ''}\n\n"
            f"{report['device']} · torch {report['torch']} · CUDA {report['cuda']} · cuDNN {report['cudnn']} · "
            f"{report['cpus']} CPUs · {report['date']} · {report['total_s']:.0f} s of {report['budget_s']} s planned"
            f"{'' if report['finished'] else ' · NOT FINISHED (checks still pending were not run)'}\n\n"
            "| # | check | result | status | s (budget) |\n|---|---|---|---|---|\n")
    rows, details = [], []
    for c in report["checks"]:
        text = c.get("verdict") or c.get("error") or ""
        rows.append(f"| {c['id']} | {c['name']} | {text.replace('|', '/')} | {c['status']} | "
                    f"{c['seconds']:.0f} ({c['budget_s']}) |" if c["seconds"] is not None else
                    f"| {c['id']} | {c['name']} | {c['what']} | {c['status']} | - ({c['budget_s']}) |")
        if c.get("ran") or c.get("stderr_tail"):
            details.append(f"\n**{c['id']}. {c['what']}**\n\n" + "".join(f"    {r}\n" for r in c.get("ran", []))
                           + ("\n    stderr (last lines):\n" + "".join(f"    {line}\n" for line in
                                                                       c["stderr_tail"].splitlines())
                              if c.get("stderr_tail") else ""))
    return head + "\n".join(rows) + "\n\n## Commands\n" + "".join(details)


def write(out: str, stem: str, report: Dict[str, Any]) -> None:
    write_json(os.path.join(out, stem + ".json"), report)
    write_text(os.path.join(out, stem + ".md"), markdown(report))


def run_check(fn: Callable, run: gc.Run, budget: float) -> Dict[str, Any]:
    """Run one check within ``budget`` seconds; never raises (a failure is a result)."""
    t0 = time.monotonic()
    try:
        res = fn(run, gc.Check(deadline=t0 + budget))
        res["status"] = "ok" if res.pop("ok") else "failed"
    except gc.CheckFailed as exc:
        res = {"status": "failed", "error": str(exc), "stderr_tail": exc.tail}
    except Exception as exc:  # a bug or an unexpected file: recorded, the next check still runs
        res = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
               "stderr_tail": gc.tail(traceback.format_exc())}
    res["ran"] = [r.replace(run.work, "$WORK") for r in run.made + res.get("ran", [])]
    run.made.clear()
    res["seconds"] = time.monotonic() - t0
    return res


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU, same code; gpu_check_dryrun.*")
    p.add_argument("--out", default=os.path.join(gc.ROOT, "benchmarks", "results"), help="results folder")
    p.add_argument("--only", default="", help="comma-separated check numbers (default: all six)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (pack, runs) and print its path")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device on this machine (torch {torch.__version__}); nothing run "
              f"(--dry-run rehearses it on the CPU)")
        return 0
    only = {int(x) for x in args.only.split(",") if x.strip()} or {c[0] for c in CHECKS}
    sizes = gc.DRY if args.dry_run else gc.GPU
    stem = "gpu_check_dryrun" if args.dry_run else "gpu_check"
    report = dict(environment(args.dry_run), budget_s=sum(c[4 if args.dry_run else 3] for c in CHECKS if c[0] in only),
                  total_s=0.0, finished=False, checks=[])
    for cid, name, what, gpu_s, dry_s, _ in CHECKS:
        report["checks"].append({"id": cid, "name": name, "what": what, "budget_s": dry_s if args.dry_run else gpu_s,
                                 "status": "pending" if cid in only else "skipped", "seconds": None})
    limit = "" if args.dry_run else f", at most {GPU_BUDGET_S} s"
    print(f"gpu_check on {report['device']}: plan ({report['budget_s']} s in all{limit}); "
          f"results -> {os.path.join(args.out, stem)}.json/.md")
    for c in report["checks"]:
        skipped = "" if c["id"] in only else " (skipped)"
        print(f"  {c['id']}. {c['name']:<15} {c['budget_s']:>4} s  {c['what']}{skipped}")
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu_check_")
    run = gc.Run(sizes=sizes, work=work)
    t_all = time.monotonic()
    try:
        for entry, (cid, _, _, _, _, fn) in zip(report["checks"], CHECKS):
            if cid not in only:
                continue
            entry.update(run_check(fn, run, entry["budget_s"]))
            report["total_s"] = time.monotonic() - t_all
            write(args.out, stem, report)
            print(f"[{cid}] {entry['name']}: {entry['status']} ({entry['seconds']:.0f} s) "
                  f"{entry.get('verdict') or entry.get('error', '')}", flush=True)
        report["finished"] = True
        write(args.out, stem, report)
    finally:
        if args.keep:
            print(f"scratch kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    failed = [c["name"] for c in report["checks"] if c["status"] == "failed"]
    print(f"gpu_check: {len(only) - len(failed)}/{len(only)} checks ok in {report['total_s']:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
