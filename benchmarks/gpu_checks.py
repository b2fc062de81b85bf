"""The six checks of benchmarks/gpu_check.py, each a function of (Run, Check) -> result dict.

Every check runs our scripts as subprocesses (train.py, evaluate.py, bench_train.py, torchrun
pfc_step.py) with a wall-clock bound (the check's deadline), so a hang or a crash is recorded,
not inherited. A check returns {"ran": [commands], "numbers": {...}, "ok": bool, "verdict": str};
raising CheckFailed (or anything else) marks it failed with the message and the child's last
stderr lines. ``Sizes`` holds the GPU sizes and the dry-run (CPU, toy) sizes: one code path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
WINDOW = re.compile(r"^step (\d+)/(\d+) epoch \d+ loss (\S+) lr \S+ ([\d.]+) img/s$")


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between a GPU run and the CPU dry run (same code otherwise)."""

    device: str
    bench_backbones: str = "iresnet50,mobilefacenet"
    bench_modes: str = "eager,channels_last,amp,amp+compile"
    bench_batch: int = 256
    bench_steps: int = 10
    bench_warmup: int = 3
    pack: Dict[str, Any] = field(default_factory=lambda: dict(identities=300, images_per_id=12, pairs=0.02,
                                                              workers=8))
    backbone: str = "mobilefacenet"
    loader_batch: int = 256
    loader_steps: int = 60
    loader_workers: int = 8
    log_every: int = 10
    pfc_classes: int = 1_000_000
    pfc_batch: int = 256
    pfc_steps: int = 20
    fp16_args: Sequence[str] = ("--amp", "--amp-dtype", "fp16")
    fp16_steps: int = 300
    fp16_batch: int = 128
    sigterm_steps: int = 300
    sigterm_batch: int = 64
    eval_batch: int = 256
    child_env: Dict[str, str] = field(default_factory=dict)


GPU = Sizes(device="cuda")
DRY = Sizes(device="cpu", bench_backbones="mobilefacenet", bench_modes="eager,channels_last,amp", bench_batch=4,
            bench_steps=1, bench_warmup=1, pack=dict(identities=10, images_per_id=4, pairs=0.002, workers=1),
            loader_batch=8, loader_steps=4, loader_workers=1, log_every=1, pfc_classes=10_000, pfc_batch=4,
            pfc_steps=2, fp16_args=("--amp",), fp16_steps=4, fp16_batch=8, sigterm_steps=40, sigterm_batch=4,
            eval_batch=16, child_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})


class CheckFailed(Exception):
    """A check's command failed or its result is wrong; ``tail`` holds the child's last stderr lines."""

    def __init__(self, message: str, tail: str = "") -> None:
        super().__init__(message)
        self.tail = tail


@dataclass
class Run:
    """What the checks share: sizes, the scratch folder, the synthetic pack, the child environment."""

    sizes: Sizes
    work: str
    pack: str = ""
    env: Dict[str, str] = field(default_factory=dict)
    made: List[str] = field(default_factory=list)  # shared set-up commands run during the current check

    def __post_init__(self) -> None:
        self.env = dict(os.environ, **self.sizes.child_env, PYTHONUNBUFFERED="1")


@dataclass
class Check:
    """One check's wall-clock bound."""

    deadline: float

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 1:
            raise CheckFailed("out of time (its budget in the plan is spent)")
        return left


def tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_cmd(cmd: List[str], check: Check, run: Run, cwd: str = ROOT) -> subprocess.CompletedProcess:
    """Run ``cmd`` within the check's time; CheckFailed (with its stderr tail) on a timeout or exit != 0."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=run.env, capture_output=True, text=True, timeout=check.left())
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise CheckFailed(f"timed out: {' '.join(cmd[1:3])} ...", tail(err)) from None
    if proc.returncode != 0:
        raise CheckFailed(f"exit {proc.returncode}: {' '.join(cmd[1:3])} ...", tail(proc.stderr or proc.stdout))
    return proc


def shown(cmd: List[str]) -> str:
    """The command as a reader would type it (the interpreter as `python`, paths relative to the repo)."""
    return " ".join(["python"] + [os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[1:]])


# ------------------------------------------------------------------ shared pieces
def make_pack(run: Run, check: Check) -> str:
    """The synthetic pack (train.rec + seven .bin), made once per run under the scratch folder."""
    if run.pack:
        return run.pack
    out = os.path.join(run.work, "pack")
    p = run.sizes.pack
    cmd = [PY, os.path.join(ROOT, "prepare_data.py"), "synth", "--out", out, "--identities", str(p["identities"]),
           "--images-per-id", str(p["images_per_id"]), "--pairs", str(p["pairs"]), "--difficulty", "0.3",
           "--workers", str(p["workers"]), "--no-progress"]
    run.made.append(shown(cmd))
    run_cmd(cmd, check, run)
    run.pack = out
    return out


def train_cmd(run: Run, out: str, batch: int, steps: int, *extra: str) -> List[str]:
    s = run.sizes
    return [PY, os.path.join(ROOT, "train.py"), "--data", run.pack, "--output", out, "--backbone", s.backbone,
            "--batch-size", str(batch), "--max-steps", str(steps), "--epochs", "10000", "--eval-every", "-1",
            "--save-every", "-1", "--log-every", str(s.log_every), "--no-progress", "--device", s.device,
            "--lr", "0.02", "--overwrite", *extra]


def windows(run_dir: str) -> List[Dict[str, float]]:
    """The logged windows of a run's train.log: step, loss, img/s."""
    rows = []
    with open(os.path.join(run_dir, "train.log"), encoding="utf-8") as fh:
        for line in fh:
            m = WINDOW.match(line.strip())
            if m:
                rows.append({"step": int(m.group(1)), "loss": float(m.group(3)), "img_per_s": float(m.group(4))})
    return rows


def steady_img_per_s(rows: List[Dict[str, float]]) -> float | None:
    """Median img/s of the windows after the first (start-up, cuDNN autotune and worker spawn excluded)."""
    later = [r["img_per_s"] for r in rows[1:]] or [r["img_per_s"] for r in rows]
    return statistics.median(later) if later else None


class UtilSampler:
    """GPU utilisation (%) from nvidia-smi every ``period`` s in a thread: (monotonic time, %) pairs;
    none without nvidia-smi."""

    def __init__(self, enabled: bool, period: float = 0.5) -> None:
        self.tool = shutil.which("nvidia-smi") if enabled else None
        self.period, self.samples = period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                out = subprocess.run([self.tool, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout
                self.samples.append((time.monotonic(), float(out.strip().splitlines()[0])))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass

    def __enter__(self) -> UtilSampler:
        if self.tool:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self.tool:
            self._thread.join(timeout=10)


def watch_train(cmd: List[str], run_dir: str, check: Check, run: Run,
                on_step: Callable[[subprocess.Popen], None] | None = None) -> tuple[int, str, float | None]:
    """Start train.py, poll its train.log; ``on_step(proc)`` once the first window is logged.
    Returns (exit code, stderr, monotonic time of the first window or None)."""
    log = os.path.join(run_dir, "train.log")
    with open(os.path.join(run.work, "child.err"), "w+", encoding="utf-8") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=run.env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        first = None
        try:
            while proc.poll() is None:
                if first is None and os.path.exists(log) and windows(run_dir):
                    first = time.monotonic()
                    if on_step is not None:
                        on_step(proc)
                if time.monotonic() > check.deadline:
                    raise CheckFailed(f"timed out: {shown(cmd)[:80]} ...")
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            err.seek(0)
            stderr = err.read()
    return proc.returncode, stderr, first


# ------------------------------------------------------------------ 1. training-step modes
def bench_train(run: Run, check: Check) -> Dict[str, Any]:
    """One bench_train.py per backbone, so a slow compile of the second keeps the first's numbers."""
    s = run.sizes
    numbers: Dict[str, Any] = {}
    cells, ran, errors = [], [], []
    for name in s.bench_backbones.split(","):
        cmd = [PY, os.path.join(ROOT, "benchmarks", "bench_train.py"), "--backbones", name, "--batch-size",
               str(s.bench_batch), "--steps", str(s.bench_steps), "--warmup", str(s.bench_warmup), "--modes",
               s.bench_modes, "--device", s.device]
        ran.append(shown(cmd))
        try:
            result = json.loads(run_cmd(cmd, check, run).stdout.strip().splitlines()[-1])
        except CheckFailed as exc:
            numbers[name] = {"error": str(exc), "stderr_tail": exc.tail}
            errors.append(f"{name}: {exc}")
            continue
        numbers["bf16_matmul_peak_tflops"] = result.get("bf16_matmul_peak_tflops")
        row = result["backbones"][name]
        numbers[name] = {"gmacs": row["gmacs"], "plain_img_per_s": row["plain"]["img_per_s"]}
        for mode in s.bench_modes.split(","):
            numbers[name][mode] = {k: row[mode].get(k) for k in ("img_per_s", "vs_plain", "share_of_peak")}
        best = max(s.bench_modes.split(","), key=lambda m: row[m]["img_per_s"])
        share = row[best].get("share_of_peak")
        cells.append(f"{name} best {best} {row[best]['img_per_s']:.0f} img/s ({row[best]['vs_plain']:.2f}x plain"
                     + (f", {100 * share:.0f}% of bf16 peak)" if share else ")"))
    return {"ran": ran, "numbers": numbers, "ok": not errors, "verdict": "; ".join(cells + errors)}


# ------------------------------------------------------------------ 2. loader: decode on device vs CPU workers
def loader(run: Run, check: Check) -> Dict[str, Any]:
    s = run.sizes
    make_pack(run, check)
    numbers: Dict[str, Any] = {}
    ran = []
    for name, extra in (("cpu_workers", ["--num-workers", str(s.loader_workers)]),
                        ("decode_on_device", ["--num-workers", str(s.loader_workers), "--decode-on-device"])):
        out = os.path.join(run.work, f"loader_{name}")
        cmd = train_cmd(run, out, s.loader_batch, s.loader_steps, "--amp", *extra)
        ran.append(shown(cmd))
        with UtilSampler(s.device == "cuda") as sampler:
            code, err, first = watch_train(cmd, out, check, run)
        if code != 0:
            raise CheckFailed(f"{name}: train.py exit {code}", tail(err))
        util = [u for t, u in sampler.samples if first is not None and t >= first]  # training, not start-up
        numbers[name] = {"img_per_s": steady_img_per_s(windows(out)),
                         "gpu_util_mean": statistics.fmean(util) if util else None, "util_samples": len(util)}
    cpu, dev = numbers["cpu_workers"], numbers["decode_on_device"]
    numbers["device_over_workers"] = dev["img_per_s"] / cpu["img_per_s"] if cpu["img_per_s"] else None
    numbers["codecs_img_per_s"] = codec_rates(run, check)
    codecs = ", ".join(f"{k} {v:.0f}" for k, v in numbers["codecs_img_per_s"].items() if v)
    if cpu["gpu_util_mean"] is None:
        verdict = (f"workers {cpu['img_per_s']:.0f} img/s, on device {dev['img_per_s']:.0f} img/s; "
                   f"no GPU utilisation (no nvidia-smi / CPU run); decode_batch img/s: {codecs}")
    else:
        bound = cpu["gpu_util_mean"] < 80
        verdict = (f"workers {cpu['img_per_s']:.0f} img/s at {cpu['gpu_util_mean']:.0f}% GPU, on device "
                   f"{dev['img_per_s']:.0f} img/s at {dev['gpu_util_mean']:.0f}% GPU: the CPU loader "
                   + ("IS the bottleneck" if bound else "is not the bottleneck") + f"; decode_batch img/s: {codecs}")
    return {"ran": ran, "numbers": numbers, "ok": bool(cpu["img_per_s"] and dev["img_per_s"]), "verdict": verdict}


def codec_rates(run: Run, check: Check, images: int = 1024, batch: int = 256) -> Dict[str, float | None]:
    """img/s of data.device_decode.decode_batch through each codec this machine has (TorchCodec,
    torchvision), on the run's device, over the pack's first ``images`` JPEGs in batches of ``batch``
    (best of two passes); None for a codec that does not import."""
    import torch

    from data import device_decode
    from data.dataset import build_dataset

    ds = build_dataset(run.pack, decode=False)
    payloads = [ds[i][0] for i in range(min(images, len(ds)))]
    device = torch.device(run.sizes.device)
    rates: Dict[str, float | None] = {}
    for name in device_decode.CODECS:
        check.left()
        try:
            device_decode.codec(name)
        except ImportError:
            rates[name] = None
            continue
        best = 0.0
        for _ in range(2):
            t0 = time.perf_counter()
            for k in range(0, len(payloads), batch):
                device_decode.decode_batch(payloads[k:k + batch], device, codec_name=name)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, len(payloads) / (time.perf_counter() - t0))
        rates[name] = best
    return rates


# ------------------------------------------------------------------ 3. Partial FC at 1M classes under torchrun
def partial_fc(run: Run, check: Check) -> Dict[str, Any]:
    s = run.sizes
    out = os.path.join(run.work, "pfc.json")
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           os.path.join(ROOT, "benchmarks", "pfc_step.py"), "--classes", str(s.pfc_classes), "--sample-rate", "0.1",
           "--backbone", s.backbone, "--batch-size", str(s.pfc_batch), "--steps", str(s.pfc_steps),
           "--device", s.device, "--json", out] + (["--amp"] if s.device == "cuda" else [])
    run_cmd(cmd, check, run)
    with open(out, encoding="utf-8") as fh:
        r = json.load(fh)
    est = r["estimate"]
    peak = r["peak_gb"]
    ok = r["loss_finite"] and r["bad_steps"] == 0
    verdict = (f"{r['backend']} x{r['world_size']}, {r['classes']} classes R={r['sample_rate']:g}: "
               f"{1000 * r['step_s']:.1f} ms/step ({r['img_per_s']:.0f} img/s)")
    if peak is not None:
        verdict += (f"; peak {peak:.2f} GB vs estimate {est['with_sampled_rows_gb']:.2f} GB for the centres "
                    f"(README's rule: {est['centres_gb']:.2f} GB of centres, x3 with gradient and momentum)")
    return {"ran": [shown(cmd)], "numbers": r, "ok": ok, "verdict": verdict}


# ------------------------------------------------------------------ 4. fp16 + GradScaler
def fp16(run: Run, check: Check) -> Dict[str, Any]:
    from utils.torchfile import load_file

    s = run.sizes
    make_pack(run, check)
    out = os.path.join(run.work, "fp16")
    cmd = train_cmd(run, out, s.fp16_batch, s.fp16_steps, *s.fp16_args, "--num-workers", "4")
    run_cmd(cmd, check, run)
    with open(os.path.join(out, "history.json"), encoding="utf-8") as fh:
        hist = json.load(fh)
    scaler = load_file(os.path.join(out, "checkpoint.pt")).get("scaler") or {}
    losses = hist["loss"]
    finite = all(v == v and abs(v) != float("inf") for v in losses)
    numbers = {"steps": hist["step"][-1] if hist["step"] else 0, "bad_steps": len(hist["bad_steps"]),
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
               "final_scale": scaler.get("scale"), "scaler_skips": scaler_skips(scaler, s.fp16_steps),
               "scale_in_history": "scale" in hist}
    scaled = s.device == "cuda"  # fp16 + GradScaler; the dry run's bf16 on the CPU has no scaler
    skips = numbers["scaler_skips"]
    ok = (finite and not hist["bad_steps"] and numbers["steps"] == s.fp16_steps
          and (not scaled or (numbers["final_scale"] is not None and numbers["final_scale"] >= 1
                              and skips is not None and skips <= s.fp16_steps // 10
                              and numbers["scale_in_history"])))
    scale = (f"final scale {numbers['final_scale']:g} ({skips} overflow steps skipped by the scaler; logged "
             f"per window in history.json: {numbers['scale_in_history']})" if numbers["final_scale"]
             else "no GradScaler (not fp16)")
    verdict = (f"{numbers['steps']} steps, {numbers['bad_steps']} non-finite, loss {numbers['first_loss']:.3f} -> "
               f"{numbers['last_loss']:.3f}, {scale}")
    return {"ran": [shown(cmd)], "numbers": numbers, "ok": ok, "verdict": verdict}


def scaler_skips(state: Dict[str, Any], steps: int) -> int | None:
    """Steps GradScaler skipped for an overflow, from its final state: before ``growth_interval``
    good steps in a row the scale only falls (x backoff per overflow), so skips = log(init/scale) /
    log(1/backoff) with torch's initial 2**16. None when that does not hold or there is no scaler."""
    import math

    scale, backoff = state.get("scale"), state.get("backoff_factor", 0.5)
    if not scale or steps >= state.get("growth_interval", 2000) or not 0 < backoff < 1:
        return None
    return round(math.log(2.0 ** 16 / scale) / math.log(1 / backoff))


# ------------------------------------------------------------------ 5. evaluate.py --amp (device) vs fp32 (CPU)
def eval_amp(run: Run, check: Check) -> Dict[str, Any]:
    s = run.sizes
    make_pack(run, check)
    weights = os.path.join(run.work, "fp16", "backbone.pt")
    ran = []
    if not os.path.exists(weights):  # check 4 did not leave a model: a two-step one will do
        cmd = train_cmd(run, os.path.join(run.work, "eval_model"), s.fp16_batch, 2, "--num-workers", "0")
        ran.append(shown(cmd))
        run_cmd(cmd, check, run)
        weights = os.path.join(run.work, "eval_model", "backbone.pt")
    reports = {}
    for name, extra in (("device_amp", ["--device", s.device, "--amp"]), ("cpu_fp32", ["--device", "cpu"])):
        rep = os.path.join(run.work, f"eval_{name}")
        cmd = [PY, os.path.join(ROOT, "evaluate.py"), weights, "--data", run.pack, "--report", rep, "--batch-size",
               str(s.eval_batch), "--no-progress", "--no-cache", *extra]
        ran.append(shown(cmd))
        run_cmd(cmd, check, run)
        with open(os.path.join(rep, "eval.json"), encoding="utf-8") as fh:
            reports[name] = json.load(fh)
    amp, ref = (reports[k]["checkpoints"][0]["results"] for k in ("device_amp", "cpu_fp32"))
    sets = {}
    for t, info in reports["cpu_fp32"]["data"].items():
        pairs = int(info["pairs"])
        diff = abs(amp[t]["accuracy"] - ref[t]["accuracy"]) * pairs
        sets[t] = {"pairs": pairs, "acc_amp": amp[t]["accuracy"], "acc_fp32_cpu": ref[t]["accuracy"],
                   "diff_pairs": diff}
    worst = max(v["diff_pairs"] for v in sets.values())
    ok = worst <= 1.0 + 1e-6
    return {"ran": ran, "numbers": {"sets": sets, "worst_diff_pairs": worst}, "ok": ok,
            "verdict": f"{len(sets)} sets, largest difference {worst:.2f} pair(s) (allowed: 1)"}


# ------------------------------------------------------------------ 6. SIGTERM writes a checkpoint that resumes
def sigterm(run: Run, check: Check) -> Dict[str, Any]:
    s = run.sizes
    make_pack(run, check)
    out = os.path.join(run.work, "sigterm")
    cmd = train_cmd(run, out, s.sigterm_batch, s.sigterm_steps, "--num-workers", "2")
    sent = []
    code, err, _ = watch_train(cmd, out, check, run, on_step=lambda p: (p.send_signal(signal.SIGTERM),
                                                                        sent.append(time.monotonic())))
    ckpt = os.path.join(out, "checkpoint.pt")
    if not sent:
        raise CheckFailed(f"train.py ended (exit {code}) before it logged a step", tail(err))
    if code != 128 + signal.SIGTERM or not os.path.exists(ckpt):
        raise CheckFailed(f"after SIGTERM: exit {code} (want {128 + signal.SIGTERM}), checkpoint.pt "
                          f"{'present' if os.path.exists(ckpt) else 'missing'}", tail(err))
    with open(os.path.join(out, "train.log"), encoding="utf-8") as fh:
        stops = re.findall(r"stopped by signal SIGTERM at step (\d+)", fh.read())
    if not stops:
        raise CheckFailed("train.log does not say the run stopped at SIGTERM", tail(err))
    stopped_at = int(stops[-1])
    resume = [PY, os.path.join(ROOT, "train.py"), "--resume", out, "--no-progress"]
    run_cmd(resume, check, run)
    with open(os.path.join(out, "history.json"), encoding="utf-8") as fh:
        end = json.load(fh)["step"][-1]
    with open(os.path.join(out, "train.log"), encoding="utf-8") as fh:
        resumed = [line for line in fh if line.startswith("resumed")]
    ok = end == s.sigterm_steps and bool(resumed) and stopped_at < s.sigterm_steps
    numbers = {"exit_after_sigterm": code, "stopped_at_step": stopped_at, "resumed_to_step": end,
               "total_steps": s.sigterm_steps}
    return {"ran": [shown(cmd) + "  (SIGTERM after the first logged step)", shown(resume)], "numbers": numbers,
            "ok": ok, "verdict": f"stopped at step {stopped_at} (exit {code}), resumed to {end}/{s.sigterm_steps}"}
