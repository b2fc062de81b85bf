"""benchmarks/gpu_check.py: the dry run (all six checks at toy sizes on the CPU) passes and writes the
documented files; without CUDA it says so in one line; failures and timeouts are recorded, not raised."""

import json
import math
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_check  # noqa: E402
import gpu_checks  # noqa: E402
from pfc_step import memory_estimate_gb  # noqa: E402

CHECK_FIELDS = {"id", "name", "what", "budget_s", "status", "seconds", "ran", "numbers", "verdict"}
TOP_FIELDS = {"schema", "dry_run", "device", "torch", "cuda", "cudnn", "python", "cpus", "date", "budget_s", "total_s",
              "finished", "checks"}


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--out", str(out)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=900)
    return proc, out


def test_dry_run_runs_all_six_checks_and_passes(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "gpu_check_dryrun.json").read_text())
    assert TOP_FIELDS <= set(report)
    assert report["schema"] == "facetrain-gpu-check/1" and report["dry_run"] is True and report["finished"] is True
    assert [c["id"] for c in report["checks"]] == [1, 2, 3, 4, 5, 6]
    for c in report["checks"]:
        assert CHECK_FIELDS <= set(c), c["name"]
        assert c["status"] == "ok", (c["name"], c.get("error"), c.get("stderr_tail"))
        assert 0 < c["seconds"] <= c["budget_s"] and c["ran"]
    assert "plan" in proc.stdout and "6/6 checks ok" in proc.stdout
    assert not (out / "gpu_check.json").exists()  # a CPU rehearsal never takes the GPU results' name


def test_dry_run_numbers(dry_run):
    _, out = dry_run
    checks = {c["name"]: c for c in json.loads((out / "gpu_check_dryrun.json").read_text())["checks"]}
    bench = checks["bench_train"]["numbers"]["mobilefacenet"]
    assert set(gpu_checks.DRY.bench_modes.split(",")) <= set(bench) and bench["plain_img_per_s"] > 0
    loader = checks["loader"]["numbers"]
    assert loader["cpu_workers"]["img_per_s"] > 0 and loader["decode_on_device"]["img_per_s"] > 0
    assert loader["cpu_workers"]["gpu_util_mean"] is None  # no GPU, no utilisation samples
    pfc = checks["partial_fc_1m"]["numbers"]
    assert pfc["backend"] == "gloo" and pfc["world_size"] == 1 and pfc["classes"] == 10_000 and pfc["step_s"] > 0
    fp16 = checks["fp16_scaler"]["numbers"]
    assert fp16["steps"] == gpu_checks.DRY.fp16_steps and fp16["bad_steps"] == 0
    ev = checks["eval_amp"]["numbers"]
    assert len(ev["sets"]) == 7 and ev["worst_diff_pairs"] <= 1
    sig = checks["sigterm_resume"]["numbers"]
    assert sig["exit_after_sigterm"] == 143 and 0 < sig["stopped_at_step"] < sig["total_steps"]
    assert sig["resumed_to_step"] == sig["total_steps"]


def test_markdown_has_one_row_per_check(dry_run):
    _, out = dry_run
    md = (out / "gpu_check_dryrun.md").read_text()
    assert "| # | check | result | status | s (budget) |" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert [r.split("|")[2].strip() for r in rows] == [c[1] for c in gpu_check.CHECKS]
    assert all(r.split("|")[4].strip() == "ok" for r in rows)


def test_without_cuda_one_line_and_exit_0(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path)], cwd=ROOT,
                          env=_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert len(proc.stdout.strip().splitlines()) == 1 and "no CUDA" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_gpu_plan_fits_eight_minutes():
    assert sum(c[3] for c in gpu_check.CHECKS) <= 8 * 60


def test_memory_estimate_matches_readme():
    # README: "2M identities x 512 floats is 4 GB" (4 bytes each: 2e6 * 512 * 4 = 4.096e9 bytes)
    est = memory_estimate_gb(2_000_000, 512, 0.1)
    assert est["centres_gb"] == pytest.approx(4.096)
    assert est["centres_grad_momentum_gb"] == pytest.approx(3 * 4.096)
    assert memory_estimate_gb(2_000_000, 512, 0.1, world_size=8)["centres_gb"] == pytest.approx(0.512)


def test_scaler_skips_from_final_scale():
    # torch's GradScaler starts at 2**16 and halves per overflow; 2**13 after 300 steps: 3 skipped
    assert gpu_checks.scaler_skips({"scale": 2.0 ** 13, "backoff_factor": 0.5, "growth_interval": 2000}, 300) == 3
    assert gpu_checks.scaler_skips({"scale": 2.0 ** 13, "growth_interval": 2000}, 2500) is None  # may have grown
    assert gpu_checks.scaler_skips({}, 300) is None  # no scaler (bf16, CPU)


def test_failure_is_recorded_with_stderr_tail(tmp_path):
    run = gpu_checks.Run(sizes=gpu_checks.DRY, work=str(tmp_path))

    def crashing(run, check):
        gpu_checks.run_cmd([sys.executable, "-c", "import sys; print('boom line', file=sys.stderr); sys.exit(3)"],
                           check, run)

    res = gpu_check.run_check(crashing, run, budget=60)
    assert res["status"] == "failed" and "exit 3" in res["error"] and "boom line" in res["stderr_tail"]


def test_timeout_is_recorded_not_hung(tmp_path):
    run = gpu_checks.Run(sizes=gpu_checks.DRY, work=str(tmp_path))
    t0 = time.monotonic()
    res = gpu_check.run_check(lambda run, check: gpu_checks.run_cmd(
        [sys.executable, "-c", "import time; time.sleep(60)"], check, run), run, budget=3)
    assert res["status"] == "failed" and "timed out" in res["error"]
    assert time.monotonic() - t0 < 30 and not math.isnan(res["seconds"])


def test_a_killed_benchmark_keeps_what_it_printed(tmp_path):
    """bench_train.py prints its result so far after each mode: a run stopped at its share of the
    budget (a slow cold compile) still gives the modes it finished."""
    run = gpu_checks.Run(sizes=gpu_checks.DRY, work=str(tmp_path))
    check = gpu_checks.Check(deadline=time.monotonic() + 60)
    code = "import json, time; print(json.dumps({'a': 1}), flush=True); print('{\"cut', flush=True); time.sleep(60)"
    with pytest.raises(gpu_checks.CheckFailed) as err:
        gpu_checks.run_cmd([sys.executable, "-c", code], check, run, limit=3)
    assert "timed out after 3 s" in str(err.value) and gpu_checks.last_json(err.value.out) == {"a": 1}


def test_bench_row_with_failed_and_unreached_modes():
    row = {"gmacs": 0.5, "plain": {"img_per_s": 100.0},
           "eager": {"img_per_s": 150.0, "vs_plain": 1.5, "peak_gb": 2.0, "warmup_s": 0.1},
           "amp": {"error": "OutOfMemoryError: CUDA out of memory"}}
    numbers, cell, problems = gpu_checks.bench_row(row, ["eager", "amp", "amp+compile"])
    assert numbers["eager"]["img_per_s"] == 150.0
    assert numbers["amp"] == {"error": "OutOfMemoryError: CUDA out of memory"}
    assert "not reached" in numbers["amp+compile"]["error"]
    assert cell == "best eager 150 img/s (1.50x plain, peak 2.0 GB)"
    assert problems == ["amp: OutOfMemoryError: CUDA out of memory", "amp+compile: not reached"]
    assert gpu_checks.bench_row(None, ["eager"])[1] == "no mode measured"  # crashed before printing anything


def test_steady_img_per_s_skips_the_first_window():
    rows = [{"img_per_s": v} for v in (10.0, 300.0, 100.0, 200.0)]
    assert gpu_checks.steady_img_per_s(rows) == 200.0  # median of the later windows
    assert gpu_checks.steady_img_per_s(rows[:1]) == 10.0 and gpu_checks.steady_img_per_s([]) is None


def test_loader_rate_text_with_missing_numbers():
    assert gpu_checks._rate({"img_per_s": None, "gpu_util_mean": None}) == "no img/s"
    assert gpu_checks._rate({"img_per_s": 1234.4, "gpu_util_mean": 87.2}) == "1234 img/s at 87% GPU"


def test_scaler_skips_counts_halvings_at_any_backoff():
    # independent reference: start at 2**16 and apply k overflows by hand
    for backoff, k in ((0.5, 0), (0.5, 7), (0.25, 3)):
        scale = 2.0 ** 16
        for _ in range(k):
            scale *= backoff
        assert gpu_checks.scaler_skips({"scale": scale, "backoff_factor": backoff, "growth_interval": 2000}, 300) == k


def test_markdown_with_a_failed_and_pending_check():
    report = dict(gpu_check.environment(dry=True), budget_s=480, total_s=12.0, finished=False, checks=[
        {"id": 1, "name": "bench_train", "what": "w1", "budget_s": 180, "status": "failed", "seconds": 12.0,
         "error": "timed out | x", "stderr_tail": "line a\nline b", "ran": ["python a.py"]},
        {"id": 2, "name": "loader", "what": "w2", "budget_s": 80, "status": "pending", "seconds": None}])
    md = gpu_check.markdown(report)
    assert "NOT FINISHED" in md and "| 1 | bench_train | timed out / x | failed | 12 (180) |" in md
    assert "| 2 | loader | w2 | pending | - (80) |" in md and "    line b" in md


def test_pair_score_diff_against_a_loop(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 4))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = a + rng.normal(scale=1e-3, size=a.shape)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    for d, e in (("a", a), ("b", b)):
        (tmp_path / d).mkdir()
        np.save(tmp_path / d / "lfw.npy", e)
    want = max(abs(sum(a[2 * i, k] * a[2 * i + 1, k] for k in range(4)) - sum(b[2 * i, k] * b[2 * i + 1, k]
                                                                             for k in range(4))) for i in range(3))
    assert gpu_checks.pair_score_diff(str(tmp_path / "a"), str(tmp_path / "b"), "lfw") == pytest.approx(want, rel=1e-9)


def test_loader_bottleneck_needs_an_idle_gpu_and_a_faster_device_decode():
    run = lambda ips, util: {"img_per_s": ips, "gpu_util_mean": util}  # noqa: E731
    assert "IS the bottleneck" in gpu_checks.bottleneck(run(1000, 50), run(2000, 90))
    assert "is not the bottleneck" in gpu_checks.bottleneck(run(1000, 95), run(2000, 95))
    assert "not the loader" in gpu_checks.bottleneck(run(1000, 50), run(1020, 55))  # idle, but not for want of data
    assert "no decode-on-device rate" in gpu_checks.bottleneck(run(1000, 50), run(None, None))
    assert gpu_checks.bottleneck(run(1000, None), run(2000, None)) == "no GPU utilisation samples"


def test_bench_train_records_a_failing_mode_and_goes_on():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import torch
    from bench_train import measured

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    assert measured(oom, torch.device("cpu")) == {"error": "OutOfMemoryError: CUDA out of memory. Tried to allocate "
                                                           "2.00 GiB"}
    assert measured(lambda: {"img_per_s": 3.0}, torch.device("cpu")) == {"img_per_s": 3.0}
