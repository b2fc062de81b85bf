"""Bad input to the three scripts is one line on stderr and exit status 2, never a traceback.

Values (every numeric flag's range), the parts' own ValueErrors, devices, paths the
scripts cannot write (a file where a folder should be, /proc, a full disk), an existing
run at --output, and malformed saved configs.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import evaluate
import train
from engine import distributed as dist_utils
from tests.cli_helpers import one_line_error, script_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--num-workers", "0", "--no-progress", "--eval-every", "-1", "--max-steps", "1"]


def _train(tiny_pack, tmp_path, *extra):
    return ["--data", tiny_pack, "--output", str(tmp_path / "r"), *FAST, *extra]


@pytest.mark.parametrize("flag,value,rule", [
    ("--lr", "nan", "> 0"), ("--lr", "inf", "> 0"), ("--lr", "0", "> 0"), ("--lr", "-0.1", "> 0"),
    ("--momentum", "nan", "in [0, 1)"), ("--momentum", "1", "in [0, 1)"),
    ("--epochs", "0", ">= 1"), ("--epochs", "-2", ">= 1"), ("--warmup-epochs", "-1", ">= 0"),
    ("--weight-decay", "-1e-4", ">= 0"), ("--weight-decay", "nan", ">= 0"),
    ("--dropout", "1.5", "in [0, 1)"), ("--embedding-size", "0", "in [1, 65536]"),
    ("--embedding-size", "1000000000", "in [1, 65536]"), ("--eval-batch-size", "0", ">= 1"),
    ("--batch-size", "0", ">= 1"), ("--grad-accum", "0", ">= 1"), ("--num-workers", "-1", "in [0, 256]"),
    ("--scale", "0", "> 0"), ("--scale", "nan", "> 0"), ("--scale", "-64", "> 0"), ("--margin", "nan", "finite"),
    ("--keep", "0", ">= 1"), ("--max-bad-fraction", "1.5", "in [0, 1]"), ("--max-bad-fraction", "-0.1", "in [0, 1]"),
    ("--max-bad-steps", "0", ">= 1"), ("--log-every", "0", ">= 1"), ("--sample-rate", "0", "in (0, 1]"),
    ("--sample-rate", "1.5", "in (0, 1]"), ("--grad-clip", "-1", ">= 0"), ("--milestones", "4,-1", ">= 0"),
    ("--milestones", "4,nan", ">= 0"), ("--lr-gamma", "0", "in (0, 1]"), ("--poly-power", "0", "> 0"),
    ("--focal-gamma", "-1", ">= 0"), ("--label-smoothing", "1", "in [0, 1)"),
    ("--dist-timeout", "0", "in (0, 10000000]"),
    ("--max-steps", "-1", ">= 0"), ("--seed", "-1", "in [0, 4294967295]"), ("--eval-every", "-2", ">= -1"),
    ("--save-every", "-5", ">= -1"),
])
def test_train_number_out_of_range(capsys, tmp_path, flag, value, rule):
    argv = ["--data", str(tmp_path), "--output", str(tmp_path / "r"), f"{flag}={value}"]
    err = script_error(capsys, train.main, argv, "train.py: error:", flag, rule)
    assert not (tmp_path / "r").exists(), "refused before anything was written"
    assert err.count("bad value") == 1


def test_range_is_in_help(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "allowed: in [0, 1)" in out and "allowed: in [1, 65536]" in out
    assert "executed as Python code" in out  # --config FILE.py runs code


@pytest.mark.parametrize("extra,needles", [
    (["--margin", "5"], ["--head arcface", "--margin 5.0", "m must be a finite number in [0, pi)"]),
    (["--head", "softmax", "--margin", "0.3"], ["--head softmax", "unknown parameter"]),
    (["--batch-size", "100"], ["--batch-size 100", "holds only 36"]),
    (["--batch-size", "12", "--grad-accum", "4"], ["--grad-accum 4", "= 48 images per step"]),
    (["--data", ""], ["--data", "may not be empty"]),
    (["--data", ",,"], ["--data ',,'", "names no data"]),
])
def test_train_values_the_parts_reject(capsys, tiny_pack, tmp_path, extra, needles):
    script_error(capsys, train.main, _train(tiny_pack, tmp_path, "--batch-size", "12", *extra),
                 "train.py: error:", *needles)


def test_backbone_constructor_value_error_names_the_flag(capsys, tiny_pack, tmp_path, monkeypatch):
    def reject(name, **kw):
        raise ValueError(f"{name}: embedding_size must be a multiple of 8")

    monkeypatch.setattr(train.backbones, "build", reject)
    script_error(capsys, train.main, _train(tiny_pack, tmp_path, "--batch-size", "12", "--embedding-size", "9"),
                 "train.py: error:", "--backbone mobilefacenet", "--embedding-size 9", "multiple of 8")


def test_output_is_an_existing_file(capsys, tiny_pack, tmp_path):
    (tmp_path / "r").write_text("not a folder")
    script_error(capsys, train.main, _train(tiny_pack, tmp_path), "--output", "is not a folder")


@pytest.mark.parametrize("where,needles", [
    ("file/run", ["[Errno 20]", "file/run"]),  # a folder under a regular file: NotADirectoryError
    ("/proc/facetrain-no/run", ["[Errno", "/proc/facetrain-no"]),  # a folder that cannot be created
])
def test_output_that_cannot_be_created(capsys, tiny_pack, tmp_path, where, needles):
    (tmp_path / "file").write_text("x")
    out = where if where.startswith("/") else str(tmp_path / where)
    script_error(capsys, train.main, ["--data", tiny_pack, "--output", out, *FAST], "train.py: error:", *needles)


def test_existing_run_is_refused_then_overwritten(capsys, tiny_pack, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.json").write_text("{}")
    script_error(capsys, train.main, _train(tiny_pack, tmp_path, "--batch-size", "12"),
                 "already holds a run (config.json)", f"--resume {run} to continue it", "--overwrite to replace it")
    assert (run / "config.json").read_text() == "{}", "the old run is untouched"
    (run / "checkpoint-00009999.pt").write_bytes(b"the old run's")  # would outrank the new run's own
    assert train.main(_train(tiny_pack, tmp_path, "--batch-size", "12", "--overwrite", "--keep", "2")) == 0
    assert json.loads((run / "config.json").read_text())["batch_size"] == 12
    assert sorted(p.name for p in run.glob("checkpoint*.pt")) == ["checkpoint-00000001.pt", "checkpoint.pt"]


def test_resume_auto_restarts_a_run_that_never_saved(tiny_pack, tmp_path):
    """A requeued job whose first try died before its first checkpoint starts again, not refused."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert train.main(_train(tiny_pack, tmp_path, "--batch-size", "12", "--resume", "auto")) == 0
    assert (run / "checkpoint.pt").is_file()


@pytest.mark.parametrize("config,needles", [
    ("a string", ["old/checkpoint.pt", "field 'config' is a str, not a mapping"]),
    ({"lr": float("nan")}, ["old (its saved config)", "--lr", "> 0"]),
])
def test_resume_from_a_malformed_saved_config(capsys, tiny_pack, tmp_path, config, needles):
    from utils.torchfile import CHECKPOINT_FORMAT, VERSION

    run = tmp_path / "old"
    run.mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "version": VERSION, "step": 0, "model": {"w": torch.zeros(1)},
                "config": config}, run / "checkpoint.pt")
    script_error(capsys, train.main, ["--resume", str(run), *FAST], "train.py: error:", *needles)


@pytest.mark.parametrize("device,needle", [("foo", "not a device name"), ("cuda:3", "--device cuda:3")])
def test_train_bad_device(capsys, tiny_pack, tmp_path, device, needle):
    script_error(capsys, train.main, _train(tiny_pack, tmp_path, "--device", device), "train.py: error:", needle)


def test_resolve_device_counts_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dist_utils.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(dist_utils.DeviceError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\)"):
        dist_utils.resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(dist_utils.DeviceError, match="CUDA is not available"):
        dist_utils.resolve_device("cuda")
    assert dist_utils.resolve_device("auto") == torch.device("cpu")


def test_train_config_file_errors_are_one_line(capsys, tiny_pack, tmp_path):
    bad = tmp_path / "c.py"
    bad.write_text("lr = 0.1\nraise RuntimeError('no such cluster\\nsecond line')\n")
    err = script_error(capsys, train.main, _train(tiny_pack, tmp_path, "--config", str(bad)),
                       "train.py: error:", "c.py", "line 2", "RuntimeError: no such cluster")
    assert "second line" not in err


@pytest.mark.parametrize("extra,needles", [
    (["--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["--batch-size", "-4"], ["--batch-size", ">= 1"]),
    (["--embedding-size", "1000000000"], ["--embedding-size", "65536"]),
    (["--device", "foo"], ["--device 'foo'", "not a device name"]),
    (["--device", "cuda:3"], ["--device cuda:3"]),
])
def test_evaluate_bad_flags(capsys, tiny_pack, tmp_path, extra, needles):
    script_error(capsys, evaluate.main, [str(tmp_path / "x.pt"), "--data", tiny_pack, *extra],
                 "evaluate.py: error:", *needles)


@pytest.mark.parametrize("flag", ["--save-embeddings", "--report"])
def test_evaluate_output_folder_is_a_file(capsys, tiny_pack, tmp_path, flag):
    (tmp_path / "f").write_text("x")
    script_error(capsys, evaluate.main, [str(tmp_path / "x.pt"), "--data", tiny_pack, flag, str(tmp_path / "f")],
                 "evaluate.py: error:", flag, "is not a folder")


@pytest.mark.parametrize("kind", ["text", "tensors"])
def test_evaluate_folder_with_a_non_checkpoint(capsys, tiny_pack, tmp_path, kind):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    if kind == "text":
        (folder / "notes.pt").write_bytes(b"{}\n")
    else:  # loads, but is neither ours nor weights evaluate.py can place without --backbone
        torch.save({"step": torch.zeros(1)}, folder / "notes.pt")
    script_error(capsys, evaluate.main, [str(folder), "--data", tiny_pack, "--no-progress"],
                 "evaluate.py: error:", "notes.pt")


def test_prepare_data_output_under_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    one_line_error(capsys, ["synth", "--out", str(tmp_path / "file" / "set"), "--identities", "2",
                            "--images-per-id", "2", "--no-progress"], "prepare_data.py synth: error:", "file/set")


FULL_DISK = """
import resource, signal, sys
sys.path.insert(0, {root!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))  # no file may grow past this: a full disk
import {module}
sys.exit({module}.main({argv!r}))
"""


@pytest.mark.parametrize("module,limit,argv,needle", [
    ("prepare_data", 20000, ["synth", "--out", "{out}", "--identities", "8", "--images-per-id", "8", "--no-progress"],
     "prepare_data.py synth: error:"),
    # 200 kB: config.json and the log fit, the 4 MB checkpoint does not (see the report: torch.save's own
    # failure below that is a RuntimeError from its zip writer, for utils/torchfile.save_file to translate)
    ("train", 200000, ["--data", "{pack}", "--output", "{out}", "--batch-size", "12", *FAST], "train.py: error:"),
])
def test_full_disk_is_one_line(tmp_path, tiny_pack, module, limit, argv, needle):
    out = str(tmp_path / "out")
    argv = [a.format(out=out, pack=tiny_pack) for a in argv]
    script = textwrap.dedent(FULL_DISK).format(root=ROOT, module=module, argv=argv, limit=limit)
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert "[Errno 27]" in lines[0] and out in lines[0]


def test_a_one_label_set_is_marked_in_the_table():
    """A set whose pairs are all 'same' scores high for any model: its cell is marked and explained."""
    from evaluation.report import format_table

    res = {"accuracy": 0.95, "accuracy_std": 0.05, "warning": "all 20 pairs are 'same'"}
    ok = {"accuracy": 0.9, "accuracy_std": 0.1, "warning": None}
    table = format_table([{"label": "m.pt", "results": {"lfw": res, "cfp_fp": ok}, "mean_accuracy": 0.925}],
                         ["lfw", "cfp_fp"], [])
    assert "| m.pt | 95.00 +- 5.00 (!) | 90.00 +- 10.00 | 92.50 |" in table
    assert table.endswith("\n\n(!) lfw: all 20 pairs are 'same'; its accuracy does not measure the model")
