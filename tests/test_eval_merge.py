"""evaluate.py merges into a report folder's eval.json instead of replacing it (evaluation/report_merge.py).

End to end on a tiny untrained model, two of tiny_pack's 20-pair .bin sets and a 6-subject synthetic
IJB-C: the reference for "kept" is the earlier run's eval.json itself (byte-equal results, the same
PNG bytes), for "replaced" a second file scored on its own, and for infer.py's threshold the
published rule cosine = 1 - d/2 over the mean best_threshold of the kept rows.
"""

import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch

import backbones
import evaluate
import infer
from backbones.weights import save_backbone
from evaluation.report_merge import ReportClashError, Scope, clashes, merge
from prepare.synth import generate_ijb
from tests.cli_helpers import script_error

QUIET = ["--no-progress", "--workers", "0", "--batch-size", "64"]


def save_model(path, seed):
    torch.manual_seed(seed)
    model = backbones.build("mobilefacenet", embedding_size=32)
    save_backbone(str(path), model.state_dict(), "mobilefacenet", 32, "rgb")
    return str(path)


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory):
    return generate_ijb(str(tmp_path_factory.mktemp("ijb")), subjects=6, seed=3)["root"]


@pytest.fixture
def run(tmp_path):
    """An empty run folder (the report folder by default: the checkpoint's own)."""
    folder = tmp_path / "run"
    folder.mkdir()
    return str(folder)


def evaluate_ok(argv, capsys=None):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert evaluate.main(list(argv) + QUIET) == 0
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out if capsys else None


def report(folder):
    with open(os.path.join(folder, "eval.json")) as fh:
        return json.load(fh)


def read(path):
    with open(path, "rb") as fh:
        return fh.read()


def bin_run(run, tiny_pack, seed=0, name="backbone.pt"):
    model = save_model(os.path.join(run, name), seed)
    evaluate_ok([model, "--data", tiny_pack, "--targets", "lfw,cfp_fp"])
    return model, report(run)


def face_images(folder):
    """Two synthetic 112x112 face files for infer.py verify."""
    from prepare.synth import identity_traits
    from prepare.synth.render import render_face

    paths = []
    for i in range(2):
        img = render_face(identity_traits(7, i), np.random.default_rng([7, i]), 0.0)
        paths.append(os.path.join(folder, f"face{i}.png"))
        cv2.imwrite(paths[-1], np.ascontiguousarray(img[..., ::-1]))
    return paths


def test_an_ijb_only_run_keeps_the_bin_results_and_infer_still_finds_the_threshold(
        run, tiny_pack, ijb_root, tmp_path, capsys):
    model, before = bin_run(run, tiny_pack)
    png = read(os.path.join(run, "roc_backbone.png"))
    out = evaluate_ok([model, "--ijb", ijb_root], capsys)
    assert "kept its earlier cfp_fp, lfw" in out
    after = report(run)
    [row] = after["checkpoints"]
    assert row["results"] == before["checkpoints"][0]["results"]
    assert row["mean_accuracy"] == before["checkpoints"][0]["mean_accuracy"]
    assert after["data"] == before["data"] and after["tta"] == "sum"
    assert row["ijb"]["IJBC"]["verification"]["pairs"] == 2 * 6 ** 2
    assert read(os.path.join(run, "roc_backbone.png")) == png  # a kept result's figure stays
    assert os.path.getsize(os.path.join(run, "roc_ijb_backbone_IJBC.png")) > 5000
    md = open(os.path.join(run, "eval.md")).read()
    assert "# Verification on" in md and "# IJB-B / IJB-C" in md
    # infer.py: the threshold of the kept .bin results, cosine = 1 - mean(best_threshold) / 2
    d = np.mean([r["best_threshold"] for r in before["checkpoints"][0]["results"].values()])
    a, b = face_images(str(tmp_path))
    assert infer.main(["verify", model, a, b]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("threshold"))
    assert f"cosine {1 - d / 2:.4f}" in line and os.path.join(run, "eval.json") in line


def test_a_second_bin_run_of_the_same_checkpoint_replaces_what_it_scored(run, tiny_pack, tmp_path):
    model, before = bin_run(run, tiny_pack)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(os.path.join(tiny_pack, "cfp_fp.bin"), other / "lfw.bin")  # other bytes under lfw's name
    evaluate_ok([model, "--data", str(other)])
    [row] = report(run)["checkpoints"]
    old = before["checkpoints"][0]["results"]
    # lfw now holds the scores of cfp_fp's pairs (the same file scored again), cfp_fp is kept
    assert row["results"]["lfw"] == old["cfp_fp"] and row["results"]["cfp_fp"] == old["cfp_fp"]
    assert report(run)["data"]["lfw"]["path"] == str(other / "lfw.bin")
    assert row["mean_accuracy"] == pytest.approx(old["cfp_fp"]["accuracy"], abs=1e-15)


def test_a_copy_with_the_same_sha256_is_the_same_checkpoint(run, tiny_pack, ijb_root, tmp_path, capsys):
    model, before = bin_run(run, tiny_pack)
    png = read(os.path.join(run, "roc_backbone.png"))
    copy = tmp_path / "elsewhere" / "best.pt"
    copy.parent.mkdir()
    shutil.copy(model, copy)
    evaluate_ok([str(copy), "--ijb", ijb_root, "--report", run])
    [row] = report(run)["checkpoints"]
    assert row["path"] == str(copy) and row["results"] == before["checkpoints"][0]["results"] and row["ijb"]
    # the figures follow the row's file name; the kept .bin figure is moved, not redrawn
    assert sorted(f for f in os.listdir(run) if f.endswith(".png")) == ["roc_best.png", "roc_ijb_best_IJBC.png"]
    assert read(os.path.join(run, "roc_best.png")) == png


def test_a_changed_checkpoint_at_the_same_path_is_not_merged(run, tiny_pack, ijb_root, tmp_path, capsys):
    model, _ = bin_run(run, tiny_pack)
    save_model(model, seed=1)  # retrained in place: other bytes, same path
    out = evaluate_ok([model, "--ijb", ijb_root], capsys)
    assert "dropped the results of" in out
    [row] = report(run)["checkpoints"]
    assert row["results"] == {} and row["ijb"] and report(run)["data"] == {}
    assert not os.path.exists(os.path.join(run, "roc_backbone.png"))  # it showed the old weights
    # infer.py no longer takes the old weights' threshold
    a, b = face_images(str(tmp_path))
    assert infer.main(["verify", model, a, b]) == 0
    assert "the default" in capsys.readouterr().out


def test_other_checkpoints_are_kept_and_settings_do_not_mix(run, tiny_pack, tmp_path, capsys):
    model, _ = bin_run(run, tiny_pack)
    second = save_model(os.path.join(run, "second.pt"), seed=1)
    evaluate_ok([second, "--data", tiny_pack, "--targets", "lfw", "--report", run])
    rows = report(run)["checkpoints"]
    assert [r["path"] for r in rows] == [model, second]
    assert list(rows[1]["results"]) == ["lfw"]
    table = open(os.path.join(run, "eval.md")).read()
    assert any(line.endswith("| - | " + f"{100 * rows[1]['mean_accuracy']:.2f} |") for line in table.splitlines())
    before = read(os.path.join(run, "eval.json"))
    # --tta none beside kept tta=sum results: refused before any model runs, report untouched
    script_error(capsys, evaluate.main, [second, "--data", tiny_pack, "--targets", "lfw", "--tta", "none",
                                         "--report", run] + QUIET,
                 "evaluate.py: error:", os.path.join(run, "eval.json"), "--tta sum", "--tta none", "--report DIR")
    # another file under lfw's name while the first checkpoint's lfw stays: refused too
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(os.path.join(tiny_pack, "cfp_fp.bin"), other / "lfw.bin")
    script_error(capsys, evaluate.main, [second, "--data", str(other), "--report", run] + QUIET,
                 "evaluate.py: error:", "lfw scored on a .bin with sha256")
    assert read(os.path.join(run, "eval.json")) == before


# merge rules on hand-built reports (no model): what is kept, replaced, dropped, refused


def _row(path, sha, results=(), ijb=None):
    return {"label": os.path.basename(path), "path": path, "sha256": sha, "backbone": "m", "channel_order": "rgb",
            "mean_accuracy": None, "results": {t: {"accuracy": a} for t, a in results}, "ijb": ijb or {}}


def _report(rows, tta="sum", data=None):
    return {"schema": "facetrain-eval/1", "tta": tta, "data": data or {}, "missing_targets": [], "checkpoints": rows}


BIN = {"lfw": {"path": "/d/lfw.bin", "sha256": "L" * 64}, "cfp_fp": {"path": "/d/cfp_fp.bin", "sha256": "C" * 64}}
IJB = {"options": {"tta": "sum", "detector_score": True, "norm_score": True}, "meta_sha256": "M" * 64}


def test_merge_keeps_replaces_and_drops_by_sha256():
    old = _report([_row("/r/a.pt", "A", [("lfw", 0.9), ("cfp_fp", 0.8)]), _row("/r/b.pt", "B", [("lfw", 0.7)]),
                   _row("/r/c.pt", "C", [("lfw", 0.6)])], data=BIN)
    new = _report([_row("/x/a_copy.pt", "A", [("lfw", 0.95)]), _row("/r/c.pt", "C2", [("lfw", 0.5)])],
                  data={"lfw": BIN["lfw"]})
    merged = merge(old, new)
    rows = merged.report["checkpoints"]
    assert [(r["path"], r["sha256"]) for r in rows] == [("/x/a_copy.pt", "A"), ("/r/b.pt", "B"), ("/r/c.pt", "C2")]
    assert rows[0]["results"] == {"lfw": {"accuracy": 0.95}, "cfp_fp": {"accuracy": 0.8}}
    assert rows[0]["mean_accuracy"] == pytest.approx((0.95 + 0.8) / 2, abs=1e-15)
    assert rows[1] == old["checkpoints"][1] and rows[2]["results"] == {"lfw": {"accuracy": 0.5}}
    assert merged.report["data"] == BIN and [r["path"] for r in merged.dropped] == ["/r/c.pt"]


def test_a_clash_is_only_with_results_that_stay():
    old = _report([_row("/r/a.pt", "A", [("lfw", 0.9)], {"IJBC": dict(IJB)})], data={"lfw": BIN["lfw"]})
    ijb_none = {"IJBC": dict(IJB, options=dict(IJB["options"], tta="none"))}
    # everything of the one row replaced: no clash, whatever the settings
    assert clashes(old, Scope({"/r/a.pt": "A"}, "none", {"lfw": "X" * 64}, ijb_none)) == []
    # a second checkpoint beside the kept row: its tta, its .bin bytes, its IJB options must agree
    assert len(clashes(old, Scope({"/r/b.pt": "B"}, "none", {"cfp_fp": "C" * 64}, {}))) == 1
    assert len(clashes(old, Scope({"/r/b.pt": "B"}, "sum", {"lfw": "X" * 64}, {}))) == 1
    assert len(clashes(old, Scope({"/r/b.pt": "B"}, "sum", {}, ijb_none))) == 1
    assert clashes(old, Scope({"/r/b.pt": "B"}, "sum", {"lfw": "L" * 64}, {"IJBC": dict(IJB)})) == []
    # an IJB-only run with another --tta does not touch the .bin header; a dropped row cannot clash
    assert clashes(old, Scope({"/r/a.pt": "A"}, "none", {}, ijb_none)) == []
    assert clashes(old, Scope({"/r/a.pt": "A2"}, "none", {"lfw": "X" * 64}, ijb_none)) == []
    with pytest.raises(ReportClashError, match="--report DIR"):
        merge(old, _report([_row("/r/b.pt", "B", [("lfw", 0.5)])], tta="none", data={"lfw": BIN["lfw"]}))
