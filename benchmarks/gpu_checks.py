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
    loader_steps: int = 100  # ~90 steps after the first window: enough nvidia-smi samples at 0.5 s
    loader_workers: int = 8
    loader_args: Sequence[str] = ("--amp",)
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
    eval_args: Sequence[str] = ("--amp",)  # evaluate.py on the device (against fp32 on the CPU)
    child_env: Dict[str, str] = field(default_factory=dict)


GPU = Sizes(device="cuda")
DRY = Sizes(device="cpu", bench_backbones="mobilefacenet", bench_modes="eager,channels_last,amp", bench_batch=4,
            bench_steps=1, bench_warmup=1, pack=dict(identities=10, images_per_id=4, pairs=0.002, workers=1),
            loader_batch=8, loader_steps=4, loader_workers=1, log_every=1, pfc_classes=10_000, pfc_batch=4,
            loader_args=(), eval_args=(),  # bf16 autocast is 10x slower than fp32 on CPUs without AVX512-BF16
            pfc_steps=2, fp16_args=("--amp",), fp16_steps=4, fp16_batch=8, sigterm_steps=40, sigterm_batch=4,
            eval_batch=16, child_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})


class CheckFailed(Exception):
    """A check's command failed or its result is wrong; ``tail`` holds the child's last stderr lines,
    ``out`` its whole stdout so far (what a killed benchmark had already printed)."""

    def __init__(self, message: str, tail: str = "", out: str = "") -> None:
        super().__init__(message)
        self.tail, self.out = tail, out


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


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (a CUDA error's message runs on for dozens of lines)."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"[:300]


def _text(data: str | bytes | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def run_cmd(cmd: List[str], check: Check, run: Run, cwd: str = ROOT, limit: float | None = None
            ) -> subprocess.CompletedProcess:
    """Run ``cmd`` within the check's time (and at most ``limit`` s); CheckFailed (with its stderr tail
    and stdout so far) on a timeout or exit != 0."""
    timeout = check.left() if limit is None else min(check.left(), limit)
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=run.env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # (its output arrives as bytes whatever ``text`` says)
        raise CheckFailed(f"timed out after {timeout:.0f} s: {' '.join(cmd[1:3])} ...", tail(_text(exc.stderr)),
                          _text(exc.stdout)) from None
    if proc.returncode != 0:
        raise CheckFailed(f"exit {proc.returncode}: {' '.join(cmd[1:3])} ...", tail(proc.stderr or proc.stdout),
                          proc.stdout)
    return proc


def last_json(text: str) -> Dict[str, Any] | None:
    """The last complete JSON object line of ``text`` (a benchmark prints its result so far after each part)."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:  # cut off mid-line by the kill
                continue
    return None


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
    Returns (exit code, stderr, monotonic time of the first window or None); the exit code is
    None when the check's time ran out first (train.py killed)."""
    log = os.path.join(run_dir, "train.log")
    with open(os.path.join(run.work, "child.err"), "w+", encoding="utf-8") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=run.env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        first, code = None, None
        try:
            while time.monotonic() < check.deadline:
                code = proc.poll()
                if code is not None:
                    break
                if first is None and os.path.exists(log) and windows(run_dir):
                    first = time.monotonic()
                    if on_step is not None:
                        on_step(proc)
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            err.seek(0)
            stderr = err.read()
    return code, stderr, first


# ------------------------------------------------------------------ 1. training-step modes
def bench_train(run: Run, check: Check) -> Dict[str, Any]:
    """One bench_train.py per backbone, each given an equal share of the time left, so a slow cold
    compile of the first cannot starve the second; a run stopped at its share (or crashed) keeps the
    modes it printed before (eager, channels_last, amp come before amp+compile)."""
    s = run.sizes
    numbers: Dict[str, Any] = {}
    cells, ran, errors = [], [], []
    names = s.bench_backbones.split(",")
    modes = s.bench_modes.split(",")
    for i, name in enumerate(names):
        cmd = [PY, os.path.join(ROOT, "benchmarks", "bench_train.py"), "--backbones", name, "--batch-size",
               str(s.bench_batch), "--steps", str(s.bench_steps), "--warmup", str(s.bench_warmup), "--modes",
               s.bench_modes, "--device", s.device]
        ran.append(shown(cmd))
        failure = None
        try:
            share = (check.deadline - time.monotonic()) / (len(names) - i)
            result = last_json(run_cmd(cmd, check, run, limit=share).stdout)
        except CheckFailed as exc:  # (also "out of time" before it started: the other backbones' numbers stay)
            failure = exc
            result = last_json(exc.out)
        row = (result or {}).get("backbones", {}).get(name)
        if result and result.get("bf16_matmul_peak_tflops"):
            numbers["bf16_matmul_peak_tflops"] = result["bf16_matmul_peak_tflops"]
        numbers[name], cell, missing = bench_row(row, modes)
        if failure is not None:
            numbers[name].update(error=str(failure), stderr_tail=failure.tail)
        problems = missing + ([str(failure)] if failure is not None else [])
        cells.append(f"{name} {cell}" + (f" [{'; '.join(problems)}]" if problems else ""))
        errors += problems
    numbers.setdefault("bf16_matmul_peak_tflops", None)
    return {"ran": ran, "numbers": numbers, "ok": not errors, "verdict": "; ".join(cells)}


def bench_row(row: Dict[str, Any] | None, modes: List[str]) -> tuple[Dict[str, Any], str, List[str]]:
    """(numbers, verdict cell, problems) of one backbone's bench_train.py row, which may lack modes
    (not reached) or hold {"error"} for some (failed)."""
    row = row or {}
    plain = row.get("plain", {})
    numbers: Dict[str, Any] = {"gmacs": row.get("gmacs"), "plain_img_per_s": plain.get("img_per_s")}
    problems = [f"plain loop: {plain['error']}"] if "error" in plain else []
    for mode in modes:
        r = row.get(mode)
        if r is None:
            problems.append(f"{mode}: not reached")
            numbers[mode] = {"error": "not reached (out of time or an earlier crash)"}
        elif "error" in r:
            problems.append(f"{mode}: {r['error']}")
            numbers[mode] = {"error": r["error"]}
        else:
            numbers[mode] = {k: r.get(k) for k in ("img_per_s", "vs_plain", "share_of_peak", "peak_gb", "warmup_s")}
    done = [m for m in modes if numbers[m].get("img_per_s")]
    if not done:
        return numbers, "no mode measured", problems
    best = max(done, key=lambda m: numbers[m]["img_per_s"])
    b = numbers[best]
    notes = []
    if b.get("vs_plain"):
        notes.append(f"{b['vs_plain']:.2f}x plain")
    if b.get("share_of_peak"):
        notes.append(f"{100 * b['share_of_peak']:.0f}% of bf16 peak")
    if b.get("peak_gb"):
        notes.append(f"peak {b['peak_gb']:.1f} GB")
    notes += [f"{m} compile + warm-up {numbers[m]['warmup_s']:.0f} s" for m in done
              if "compile" in m and numbers[m].get("warmup_s") is not None]
    return numbers, f"best {best} {b['img_per_s']:.0f} img/s" + (f" ({', '.join(notes)})" if notes else ""), problems


# ------------------------------------------------------------------ 2. loader: decode on device vs CPU workers
def loader(run: Run, check: Check) -> Dict[str, Any]:
    """Both train.py runs are recorded even if one fails (its error and stderr tail in its numbers)."""
    s = run.sizes
    make_pack(run, check)
    numbers: Dict[str, Any] = {}
    ran, errors = [], []
    for name, extra in (("cpu_workers", ["--num-workers", str(s.loader_workers)]),
                        ("decode_on_device", ["--num-workers", str(s.loader_workers), "--decode-on-device"])):
        out = os.path.join(run.work, f"loader_{name}")
        cmd = train_cmd(run, out, s.loader_batch, s.loader_steps, *s.loader_args, *extra)
        ran.append(shown(cmd))
        with UtilSampler(s.device == "cuda") as sampler:
            code, err, first = watch_train(cmd, out, check, run)  # out of time: what it logged still counts
        util = [u for t, u in sampler.samples if first is not None and t >= first]  # training, not start-up
        rows = windows(out) if os.path.exists(os.path.join(out, "train.log")) else []
        numbers[name] = {"img_per_s": steady_img_per_s(rows), "windows": len(rows),
                         "gpu_util_mean": statistics.fmean(util) if util else None, "util_samples": len(util)}
        if code != 0:
            why = "timed out" if code is None else f"train.py exit {code}"
            numbers[name].update(error=why, stderr_tail=tail(err))
            errors.append(f"{name}: {why}" + (f": {tail(err, 1)}" if err.strip() else ""))
    cpu, dev = numbers["cpu_workers"], numbers["decode_on_device"]
    numbers["device_over_workers"] = (dev["img_per_s"] / cpu["img_per_s"]
                                      if cpu["img_per_s"] and dev["img_per_s"] else None)
    numbers["codecs_img_per_s"], numbers["codec_errors"] = codec_rates(run, check)
    codecs = ", ".join(f"{k} {v:.0f}" for k, v in numbers["codecs_img_per_s"].items() if v) or "none"
    verdict = (f"workers {_rate(cpu)}, on device {_rate(dev)}: {bottleneck(cpu, dev)}"
               + f"; decode_batch img/s: {codecs}" + (f" [{'; '.join(errors)}]" if errors else ""))
    return {"ran": ran, "numbers": numbers, "ok": bool(cpu["img_per_s"] and dev["img_per_s"]) and not errors,
            "verdict": verdict}


def bottleneck(cpu: Dict[str, Any], dev: Dict[str, Any], busy: float = 80.0, faster: float = 1.1) -> str:
    """Is the CPU loader what holds training back? Only if the GPU is under ``busy`` % busy with CPU
    workers AND decoding on the device trains ``faster`` times quicker: a small network's step can
    leave the GPU idle by itself (kernel launches, host syncs), which more loader speed won't fix."""
    util = cpu["gpu_util_mean"]
    if util is None:
        return "no GPU utilisation samples"
    if util >= busy:
        return f"the CPU loader is not the bottleneck (GPU {util:.0f}% busy)"
    ratio = dev["img_per_s"] / cpu["img_per_s"] if cpu["img_per_s"] and dev["img_per_s"] else None
    if ratio is None:
        return f"GPU {util:.0f}% busy with CPU workers; no decode-on-device rate to compare"
    if ratio >= faster:
        return f"the CPU loader IS the bottleneck (GPU {util:.0f}% busy; on device {ratio:.2f}x the img/s)"
    return (f"GPU {util:.0f}% busy, but decoding on the device is not faster ({ratio:.2f}x): the step itself, "
            f"not the loader, leaves it idle")


def _rate(r: Dict[str, Any]) -> str:
    """"1234 img/s at 87% GPU" from a loader run's numbers, whichever of them exist."""
    text = f"{r['img_per_s']:.0f} img/s" if r["img_per_s"] else "no img/s"
    return text + (f" at {r['gpu_util_mean']:.0f}% GPU" if r["gpu_util_mean"] is not None else "")


def codec_rates(run: Run, check: Check, images: int = 1024, batch: int = 256
                ) -> tuple[Dict[str, float | None], Dict[str, str]]:
    """img/s of data.device_decode.decode_batch through each codec (TorchCodec, torchvision), on the
    run's device, over the pack's first ``images`` JPEGs in batches of ``batch`` (best of two passes),
    and why a codec has None (it does not load or decode there, or it failed: one line each)."""
    import torch

    from data import device_decode
    from data.dataset import build_dataset

    ds = build_dataset(run.pack, decode=False)
    payloads = [ds[i][0] for i in range(min(images, len(ds)))]
    device = torch.device(run.sizes.device)
    rates: Dict[str, float | None] = {}
    errors: Dict[str, str] = {}
    for name in device_decode.CODECS:
        rates[name] = None
        if check.deadline - time.monotonic() < 5:
            errors[name] = "not run: the check's time is spent"
            continue
        try:
            device_decode.codec(name, device)
            best = 0.0
            for _ in range(2):
                t0 = time.perf_counter()
                for k in range(0, len(payloads), batch):
                    device_decode.decode_batch(payloads[k:k + batch], device, codec_name=name)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best = max(best, len(payloads) / (time.perf_counter() - t0))
            rates[name] = best
        except Exception as exc:  # a codec that cannot run here is a result, not the end of the check
            errors[name] = first_line(exc)
    return rates, errors


# ------------------------------------------------------------------ 3. Partial FC at 1M classes under torchrun
def partial_fc(run: Run, check: Check) -> Dict[str, Any]:
    s = run.sizes
    out = os.path.join(run.work, "pfc.json")
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           os.path.join(ROOT, "benchmarks", "pfc_step.py"), "--classes", str(s.pfc_classes), "--sample-rate", "0.1",
           "--backbone", s.backbone, "--batch-size", str(s.pfc_batch), "--steps", str(s.pfc_steps),
           "--device", s.device, "--json", out] + (["--amp"] if s.device == "cuda" else [])
    if os.path.exists(out):
        os.remove(out)
    failure = None
    try:
        run_cmd(cmd, check, run)
    except CheckFailed as exc:
        if not os.path.exists(out):  # nothing measured: the check's error is the child's
            raise
        failure = exc  # the step was measured, the all-reduce or the exit after it failed
    with open(out, encoding="utf-8") as fh:
        r = json.load(fh)
    est = r["estimate"]
    peak = r["peak_gb"]
    ok = (failure is None and r["loss_finite"] and r["bad_steps"] == 0
          and (r["backend"] is None or r["all_reduce_ok"] is True))
    verdict = (f"{r['backend']} x{r['world_size']} (all-reduce {'ok' if r['all_reduce_ok'] else 'FAILED'}), "
               f"{r['classes']} classes R={r['sample_rate']:g}: "
               f"{1000 * r['step_s']:.1f} ms/step ({r['img_per_s']:.0f} img/s)"
               + ("" if r["loss_finite"] and not r["bad_steps"] else f", loss finite {r['loss_finite']}, "
                  f"{r['bad_steps']} skipped steps"))
    if peak is not None:
        verdict += (f"; held between steps {r.get('allocated_after_steps_gb') or 0:.2f} GB (built: "
                    f"{r.get('allocated_built_gb') or 0:.2f} GB) vs README's rule "
                    f"{est['centres_grad_momentum_gb']:.2f} GB (centres {est['centres_gb']:.2f} GB x3 with gradient "
                    f"and momentum, backbone on top); "
                    f"peak {peak:.2f} GB vs {est['with_sampled_rows_gb']:.2f} GB with the sampled rows")
    if failure is not None:
        r = dict(r, error=str(failure), stderr_tail=failure.tail)
        verdict += f" [{failure}]"
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
             else "NO GradScaler state in checkpoint.pt" if scaled else "no GradScaler (not fp16)")
    verdict = (f"{numbers['steps']}/{s.fp16_steps} steps, {numbers['bad_steps']} non-finite, loss "
               f"{_num(numbers['first_loss'])} -> {_num(numbers['last_loss'])}, {scale}")
    return {"ran": [shown(cmd)], "numbers": numbers, "ok": ok, "verdict": verdict}


def _num(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"


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
    reports, emb = {}, {}
    for name, extra in (("device_amp", ["--device", s.device, *s.eval_args]), ("cpu_fp32", ["--device", "cpu"])):
        rep = os.path.join(run.work, f"eval_{name}")
        emb[name] = os.path.join(run.work, f"emb_{name}")
        cmd = [PY, os.path.join(ROOT, "evaluate.py"), weights, "--data", run.pack, "--report", rep, "--batch-size",
               str(s.eval_batch), "--no-progress", "--no-cache", "--save-embeddings", emb[name], *extra]
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
                   "diff_pairs": diff, "max_score_diff": pair_score_diff(emb["device_amp"], emb["cpu_fp32"], t)}
    worst = max(v["diff_pairs"] for v in sets.values())
    score = max(v["max_score_diff"] for v in sets.values())
    ok = worst <= 1.0 + 1e-6
    return {"ran": ran, "numbers": {"sets": sets, "worst_diff_pairs": worst, "max_score_diff": score}, "ok": ok,
            "verdict": f"{len(sets)} sets, largest difference {worst:.2f} pair(s) (allowed: 1); pair cosines "
                       f"differ by at most {score:.2g}"}


def pair_score_diff(dir_a: str, dir_b: str, target: str) -> float:
    """Largest |cos_a - cos_b| over a set's pairs, from evaluate.py --save-embeddings (normalised rows,
    pair i = rows 2i and 2i+1): how far the device's precision moves the scores the accuracy thresholds."""
    import numpy as np

    a, b = (np.load(os.path.join(d, f"{target}.npy")) for d in (dir_a, dir_b))
    cos_a, cos_b = ((e[0::2] * e[1::2]).sum(axis=1) for e in (a, b))
    return float(np.abs(cos_a - cos_b).max()) if len(cos_a) else 0.0


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
    if code is None:
        raise CheckFailed(f"timed out{' after the SIGTERM' if sent else ' before train.py logged a step'}", tail(err))
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
