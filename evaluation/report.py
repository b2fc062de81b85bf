"""evaluate.py's report: the console tables, eval.json, eval.md and the ROC PNGs.

One schema per file name: the eval.json written here carries ``"schema": SCHEMA`` and is the only
eval.json this module overwrites. A folder's eval.json without that marker belongs to someone
else (an older run's training record, another tool) and is refused, never replaced. One with the
marker is merged with, not replaced (evaluation/report_merge.py: kept results, replaced results,
refused clashes of settings).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence

from evaluation import ijb_report, report_merge
from evaluation.protocol import VerificationResult
from utils.atomic import write_json, write_text
from utils.errors import UserError
from utils.plots import plot_roc
from utils.version import code_version

SCHEMA = "facetrain-eval/1"
REPORT_FILE = "eval.json"

PROTOCOL = ("10-fold verification (insightface protocol): embedding = L2-normalise(e(x) + e(flip x)) for tta=sum; "
            "squared L2 distance; 10 contiguous folds; per fold the threshold in 0.00..3.99 (step 0.01) maximising "
            "accuracy on the other 9 folds ('same' if dist < threshold, first maximum on ties) is applied to the "
            "held-out fold. accuracy = mean of the 10 fold accuracies (%), +- = their population std (ddof=0).")

HOW_TO_READ = (
    "How to read: accuracy cells are the mean over 10 folds of the held-out fold accuracy, in %, "
    "+- the population std of those 10 values (spread between folds, not a confidence interval). "
    "threshold: mean of the 10 chosen squared-L2 distance thresholds (0-4). VAL@FAR=1e-3: fold-wise "
    "true accept rate at the threshold where the training folds falsely accept 0.1% of different pairs. "
    "TAR@FAR: true accept rate over all pairs at that false accept rate (with a few hundred different "
    "pairs, FAR=1e-4 means accepting none of them). AUC/EER: all-pairs ROC. XNorm: mean L2 norm of the raw "
    "embeddings (insightface's number; a collapsing or exploding norm flags a broken run).")

DETAIL_COLUMNS = ("threshold", "VAL@FAR=1e-3", "TAR@FAR=1e-4", "TAR@FAR=1e-3", "TAR@FAR=1e-2", "AUC", "EER", "XNorm")


class ReportError(UserError):
    """The report folder holds a file of that name that is not ours to overwrite."""


def check_report_dir(report_dir: str) -> None:
    """Refuse, before any work, a folder whose eval.json is not an evaluate.py report (no or another schema)."""
    path = os.path.join(report_dir, REPORT_FILE)
    if not os.path.lexists(path):
        return
    try:
        with open(path, encoding="utf-8") as fh:
            schema = json.load(fh).get("schema")
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not a JSON object
        schema = None
    if schema != SCHEMA:
        found = "no schema marker" if schema is None else f"schema {schema!r}"
        raise ReportError(f"{path} exists and is not an evaluate.py report ({found}, want {SCHEMA!r}): "
                          f"not overwriting it; write the report elsewhere with --report DIR")


def read_report(report_dir: str) -> Dict[str, Any] | None:
    """The folder's evaluate.py eval.json as a dict, None when there is none; a foreign one is refused."""
    check_report_dir(report_dir)
    path = os.path.join(report_dir, REPORT_FILE)
    if not os.path.lexists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def checkpoint_row(label: str, path: str, sha256: str, backbone: str, channel_order: str, mean_accuracy: float,
                   results: Mapping[str, VerificationResult]) -> Dict[str, Any]:
    """One checkpoint's entry of eval.json (rates as fractions 0-1; NaN as null)."""
    return {"label": label, "path": os.path.abspath(path), "sha256": sha256, "backbone": backbone,
            "channel_order": channel_order, "mean_accuracy": mean_accuracy,
            "results": {k: r.to_dict() for k, r in results.items()}}


NOT_RUN = "-"  # a cell of a target that checkpoint was not scored on (reports merged over several runs)


def format_table(rows: List[Dict[str, Any]], targets: List[str], missing: List[str]) -> str:
    """Markdown-style table: one row per checkpoint, accuracy % mean +- std per target, mean.

    A set whose accuracy measures nothing (all pairs one label) is marked ``(!)`` and explained under the table.
    A row without a target (a merged report: scored in another run, on other sets) shows ``-`` there; its
    mean is over its own sets, and a line under the table says so.
    """
    header = ["checkpoint"] + targets + missing + ["mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    warnings: Dict[str, str] = {}
    partial = False
    for row in rows:
        if not row.get("results"):
            continue  # evaluated on IJB only
        cells = [row["label"]]
        for t in targets:
            r = row["results"].get(t)
            if r is None:
                partial = True
                cells.append(NOT_RUN)
                continue
            mark = " (!)" if r.get("warning") else ""
            if mark:
                warnings[t] = r["warning"]
            cells.append(f"{100 * r['accuracy']:.2f} +- {100 * r['accuracy_std']:.2f}{mark}")
        cells += ["missing"] * len(missing)
        cells.append(_pct(row["mean_accuracy"]))
        lines.append("| " + " | ".join(cells) + " |")
    if partial:
        lines += ["", f"{NOT_RUN}: not scored on that set; the mean is over the sets each row was scored on"]
    if warnings:
        lines += [""] + [f"(!) {t}: {w}; its accuracy does not measure the model" for t, w in warnings.items()]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def format_details(row: Dict[str, Any], targets: List[str]) -> str:
    """Per-set table of one checkpoint: every metric besides accuracy (rates in %)."""
    lines = ["| set | " + " | ".join(DETAIL_COLUMNS) + " |", "|" + "---|" * (len(DETAIL_COLUMNS) + 1)]
    for t in targets:
        r = row["results"].get(t)
        if r is None:
            continue
        tar = r["tar_at_far"]
        cells = [t, f"{r['best_threshold']:.3f}", f"{_pct(r['val'])} +- {_pct(r['val_std'])}",
                 _pct(tar.get("0.0001")), _pct(tar.get("0.001")), _pct(tar.get("0.01")),
                 "n/a" if r["auc"] is None else f"{r['auc']:.4f}", _pct(r["eer"]),
                 "n/a" if r["xnorm"] is None else f"{r['xnorm']:.4g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def console_text(rows: List[Dict[str, Any]], targets: List[str], missing: List[str], data: str, tta: str) -> str:
    """What evaluate.py prints: the accuracy table, each checkpoint's detail table, then the IJB tables.

    Without .bin targets (an IJB-only run) the verification part is left out.
    """
    parts: List[str] = []
    if targets or missing:
        parts += [f"\nverification accuracy (%) on {data}, tta={tta}: mean +- std over 10 folds",
                  format_table(rows, targets, missing)]
        for row in rows:
            if row.get("results"):
                parts += [f"\n{row['label']}: rates in %", format_details(row, targets)]
    return "\n".join(parts) + ijb_report.console_text(rows)


def markdown(rows: List[Dict[str, Any]], targets: List[str], missing: List[str], data: str, tta: str) -> str:
    """eval.md: the tables ready to paste, with what the numbers mean written beside them."""
    lines: List[str] = []
    if targets or missing:
        lines += [f"# Verification on `{data}` (tta={tta})", "", format_table(rows, targets, missing), "",
                  HOW_TO_READ, "", f"Protocol: {PROTOCOL}", ""]
        for row in rows:
            if row.get("results"):
                lines += [f"## `{row['label']}`", "", f"{row['backbone']}, {row['channel_order']} input, "
                          f"sha256 `{row['sha256'][:16]}`; rates in %", "", format_details(row, targets), ""]
    lines += ijb_report.markdown(rows)
    return "\n".join(lines) + "\n"


def _data_label(data: str, data_sets: Mapping[str, Dict[str, Any]]) -> str:
    """The --data folder as given, or the folders the (merged) report's .bin files lie in."""
    folders = list(dict.fromkeys(os.path.dirname(d["path"]) for d in data_sets.values()))
    return data if not folders or folders == [os.path.abspath(data)] else ", ".join(folders)


def figures(row: Mapping[str, Any]) -> Dict[str, str]:
    """The PNG file names a row owns: "bin" -> roc_<checkpoint>.png, IJB set -> roc_ijb_<checkpoint>_<set>.png."""
    out = {"bin": f"roc_{_stem(row)}.png"} if row.get("results") else {}
    out.update({name: ijb_report.figure_name(_stem(row), name) for name, s in (row.get("ijb") or {}).items()
                if s.get("verification")})
    return out


def _stem(row: Mapping[str, Any]) -> str:
    return os.path.splitext(os.path.basename(row["path"]))[0]


@dataclass
class Written:
    path: str  # of eval.json
    notes: List[str]  # what the merge with the folder's earlier report kept or dropped


def write_report(report_dir: str, rows: List[Dict[str, Any]], data_sets: Mapping[str, Dict[str, Any]],
                 missing: Sequence[str], data: str, tta: str,
                 ijb_curves: Mapping[str, Mapping[str, Dict[str, Any]]] | None = None) -> Written:
    """eval.json, eval.md, roc_<checkpoint>.png and roc_ijb_<checkpoint>_<set>.png in ``report_dir``.

    ``data_sets``: target name -> {"path", "sha256", "pairs"} of the .bin files scored, in table order.
    ``ijb_curves``: checkpoint path -> IJB set -> {"fpr", "tpr"} of its 1:1 ROC (the rows carry the
    IJB numbers under "ijb"; the curves stay out of eval.json).
    An evaluate.py eval.json already there is merged with (report_merge: same sha256 = same
    checkpoint; results this run computed replace, the others stay). eval.md is rewritten from the
    merged report. A row this run scored on .bin sets gets its .bin figure redrawn (all its sets,
    kept ones too, from the JSON); each IJB set this run scored gets its figure; a kept result's
    figure stays as it is (renamed with the row when the checkpoint's file name changed); figures
    no row owns any more (a replaced or dropped result's) are removed.
    Refuses (ReportError) a foreign eval.json there, as check_report_dir does, and (ReportClashError)
    results of other settings, before writing anything.
    """
    previous = read_report(report_dir)
    path = os.path.join(report_dir, REPORT_FILE)
    new = {"schema": SCHEMA, "protocol": PROTOCOL, "tta": tta, "code_version": code_version(),
           "data": dict(data_sets), "missing_targets": list(missing), "checkpoints": rows}
    if any(row.get("ijb") for row in rows):
        new["ijb_protocol"] = ijb_report.PROTOCOL
    merged = report_merge.merge(previous, new, path)
    report = merged.report
    write_json(path, report)
    targets = list(report["data"])
    write_text(os.path.join(report_dir, "eval.md"),
               markdown(report["checkpoints"], targets, report["missing_targets"],
                        _data_label(data, report["data"]), report["tta"]))
    _write_figures(report_dir, report, merged, rows, ijb_curves or {})
    return Written(path, merged.notes)


def _write_figures(report_dir: str, report: Mapping[str, Any], merged: report_merge.Merged,
                   this_run: Sequence[Mapping[str, Any]], ijb_curves: Mapping[str, Mapping[str, Dict[str, Any]]]
                   ) -> None:
    """Draw this run's figures, carry the kept ones to a renamed row, remove those no row owns any more."""
    scored = {row["path"] for row in this_run if row.get("results")}
    for row in report["checkpoints"]:
        if row["path"] not in {r["path"] for r in this_run}:
            continue
        names = figures(row)
        if row["path"] in scored:  # all its sets, kept ones too, from the JSON: one figure per checkpoint
            plot_roc({t: row["results"][t] for t in report["data"] if t in row["results"]},
                     os.path.join(report_dir, names["bin"]), title=f"ROC: {row['label']} (tta={report['tta']})")
        curves = ijb_curves.get(row["path"], {})
        ijb_report.plot_rocs(report_dir, row, curves)
        drawn = set(curves) | ({"bin"} if row["path"] in scored else set())
        for old in merged.previous.get(row["sha256"], []):
            for name, fig in figures(old).items():
                src, dst = os.path.join(report_dir, fig), os.path.join(report_dir, names.get(name, fig))
                if name in names and name not in drawn and src != dst and os.path.isfile(src):
                    os.replace(src, dst)  # a kept result under the checkpoint's new file name
    owned = {fig for row in report["checkpoints"] for fig in figures(row).values()}
    replaced = [old for olds in merged.previous.values() for old in olds] + merged.dropped
    for fig in {fig for old in replaced for fig in figures(old).values()} - owned:
        if os.path.isfile(os.path.join(report_dir, fig)):
            os.remove(os.path.join(report_dir, fig))
