"""evaluate.py on a run directory adds its report beside the training files and changes none of them."""

import json
import os

import pytest

import evaluate
import train
from evaluation.report import SCHEMA
from tests.cli_helpers import script_error


def snapshot(folder):
    """Every file under ``folder`` (relative path -> bytes)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


@pytest.fixture(scope="module")
def run_dir(tiny_pack, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    assert train.main(["--data", tiny_pack, "--output", out, "--batch-size", "12", "--max-steps", "2",
                       "--num-workers", "0", "--no-progress", "--targets", "lfw"]) == 0
    assert os.path.isfile(os.path.join(out, "verification.json")), "the training's own record is among those checked"
    return out


def test_evaluate_leaves_every_training_file_byte_identical(run_dir, tiny_pack, capsys):
    before = snapshot(run_dir)
    assert evaluate.main([run_dir, "--data", tiny_pack, "--targets", "lfw", "--no-progress"]) == 0
    after = snapshot(run_dir)
    assert {k: after[k] for k in before} == before
    assert {"eval.json", "eval.md", "roc_backbone.png"} <= set(after) - set(before)
    report = json.loads(after["eval.json"])
    assert report["schema"] == SCHEMA and report["checkpoints"][0]["path"] == os.path.join(run_dir, "backbone.pt")
    # a second evaluation replaces its own report
    assert evaluate.main([run_dir, "--data", tiny_pack, "--targets", "lfw", "--no-progress"]) == 0
    assert {k: v for k, v in snapshot(run_dir).items() if k in before} == before


@pytest.mark.parametrize("content", [
    '{"mean_accuracy": 0.5, "results": {}, "step": 2}\n',  # a training record: no schema marker
    '{"schema": "someone-else/3"}\n',
    "not json\n",
])
def test_a_foreign_eval_json_is_refused_not_overwritten(run_dir, tiny_pack, capsys, tmp_path, content):
    report_dir = tmp_path / "rep"
    report_dir.mkdir()
    (report_dir / "eval.json").write_text(content)
    script_error(capsys, evaluate.main, [run_dir, "--data", tiny_pack, "--targets", "lfw", "--no-progress",
                                         "--report", str(report_dir)],
                 "evaluate.py: error:", str(report_dir / "eval.json"), "not an evaluate.py report", "--report")
    assert (report_dir / "eval.json").read_text() == content
    assert sorted(os.listdir(report_dir)) == ["eval.json"]
