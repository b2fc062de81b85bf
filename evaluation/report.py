"""evaluate.py's report: the console tables, eval.json, eval.md and one ROC PNG per checkpoint.

One schema per file name: the eval.json written here carries ``"schema": SCHEMA`` and is the only
eval.json this module overwrites. A folder's eval.json without that marker belongs to someone
else (an older run's training record, another tool) and is refused, never replaced.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Sequence

from evaluation import ijb_report
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


def checkpoint_row(label: str, path: str, sha256: str, backbone: str, channel_order: str, mean_accuracy: float,
                   results: Mapping[str, VerificationResult]) -> Dict[str, Any]:
    """One checkpoint's entry of eval.json (rates as fractions 0-1; NaN as null)."""
    return {"label": label, "path": os.path.abspath(path), "sha256": sha256, "backbone": backbone,
            "channel_order": channel_order, "mean_accuracy": mean_accuracy,
            "results": {k: r.to_dict() for k, r in results.items()}}


def format_table(rows: List[Dict[str, Any]], targets: List[str], missing: List[str]) -> str:
    """Markdown-style table: one row per checkpoint, accuracy % mean +- std per target, mean.

    A set whose accuracy measures nothing (all pairs one label) is marked ``(!)`` and explained under the table.
    """
    header = ["checkpoint"] + targets + missing + ["mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    warnings: Dict[str, str] = {}
    for row in rows:
        cells = [row["label"]]
        for t in targets:
            r = row["results"][t]
            mark = " (!)" if r.get("warning") else ""
            if mark:
                warnings[t] = r["warning"]
            cells.append(f"{100 * r['accuracy']:.2f} +- {100 * r['accuracy_std']:.2f}{mark}")
        cells += ["missing"] * len(missing)
        cells.append(f"{100 * row['mean_accuracy']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    if warnings:
        lines += [""] + [f"(!) {t}: {w}; its accuracy does not measure the model" for t, w in warnings.items()]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def format_details(row: Dict[str, Any], targets: List[str]) -> str:
    """Per-set table of one checkpoint: every metric besides accuracy (rates in %)."""
    lines = ["| set | " + " | ".join(DETAIL_COLUMNS) + " |", "|" + "---|" * (len(DETAIL_COLUMNS) + 1)]
    for t in targets:
        r = row["results"][t]
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
            parts += [f"\n{row['label']}: rates in %", format_details(row, targets)]
    return "\n".join(parts) + ijb_report.console_text(rows)


def markdown(rows: List[Dict[str, Any]], targets: List[str], missing: List[str], data: str, tta: str) -> str:
    """eval.md: the tables ready to paste, with what the numbers mean written beside them."""
    lines: List[str] = []
    if targets or missing:
        lines += [f"# Verification on `{data}` (tta={tta})", "", format_table(rows, targets, missing), "",
                  HOW_TO_READ, "", f"Protocol: {PROTOCOL}", ""]
        for row in rows:
            lines += [f"## `{row['label']}`", "", f"{row['backbone']}, {row['channel_order']} input, "
                      f"sha256 `{row['sha256'][:16]}`; rates in %", "", format_details(row, targets), ""]
    lines += ijb_report.markdown(rows)
    return "\n".join(lines) + "\n"


def write_report(report_dir: str, rows: List[Dict[str, Any]], data_sets: Mapping[str, Dict[str, Any]],
                 missing: Sequence[str], data: str, tta: str,
                 ijb_curves: Mapping[str, Mapping[str, Dict[str, Any]]] | None = None) -> str:
    """eval.json, eval.md, roc_<checkpoint>.png (and roc_ijb_<checkpoint>.png) in ``report_dir``.

    ``data_sets``: target name -> {"path", "sha256", "pairs"} of the .bin files scored, in table order.
    ``ijb_curves``: checkpoint path -> IJB set -> {"fpr", "tpr"} of its 1:1 ROC (the rows carry the
    IJB numbers under "ijb"; the curves stay out of eval.json). Returns the eval.json path.
    Refuses (ReportError) a foreign eval.json there, as check_report_dir does, before writing anything.
    """
    check_report_dir(report_dir)
    targets, missing = list(data_sets), list(missing)
    report = {"schema": SCHEMA, "protocol": PROTOCOL, "tta": tta, "code_version": code_version(),
              "data": dict(data_sets), "missing_targets": missing, "checkpoints": rows}
    if any(row.get("ijb") for row in rows):
        report["ijb_protocol"] = ijb_report.PROTOCOL
    path = os.path.join(report_dir, REPORT_FILE)
    write_json(path, report)
    write_text(os.path.join(report_dir, "eval.md"), markdown(rows, targets, missing, data, tta))
    for row in rows:
        name = os.path.splitext(os.path.basename(row["path"]))[0]
        if targets:
            plot_roc({t: row["results"][t] for t in targets}, os.path.join(report_dir, f"roc_{name}.png"),
                     title=f"ROC: {row['label']} (tta={tta})")
        ijb_report.plot_rocs(report_dir, row, (ijb_curves or {}).get(row["path"], {}))
    return path
