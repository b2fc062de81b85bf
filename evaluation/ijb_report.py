"""IJB-B / IJB-C in evaluate.py's report: console tables, eval.md sections, the log-FAR ROC figure.

The numbers come from evaluation.ijb (``IJBResult.summary``, stored per checkpoint row under
``"ijb"``); this module only lays them out. TAR cells are the reference's (% with 2 decimals);
a FAR the set cannot resolve (fewer than 1/FAR impostor pairs) is marked ``*``: the reference
prints the nearest ROC point there too, but it is not a TAR at that FAR.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping

from utils.plots import plot_far_roc

PROTOCOL = ("IJB (insightface arcface_torch eval_ijbc.py / ijb_1n.py): loose crops aligned with their 5 points "
            "(similarity to the ArcFace 112x112 template, bilinear, border 0, BGR read -> RGB); face feature = "
            "e(x) + e(flip x) (tta=sum), kept un-normalised (norm score) and multiplied by the faceness score "
            "(detector score); template = sum over media of the mean face feature per media, L2-normalised; "
            "1:1 score = dot product; TAR@FAR = TPR at the sklearn roc_curve point whose FPR is nearest to the "
            "FAR (highest TPR on ties). 1:N: gallery = G1+G2 (IJB-B: S1+S2), rank-k = share of probe templates "
            "whose mate has rank <= k (ties in the probe's favour); TPIR@FPIR per gallery (NIST open set): probes "
            "of subjects not in that gallery are non-mated searches, threshold = the score that only floor(FPIR x "
            "non-mated) non-mated top-1 scores exceed, TPIR = share of mated searches with the mate at rank 1 "
            "scoring above it.")

HOW_TO_READ = (
    "How to read: 1:1 cells are the true accept rate (%) of template pairs at the false accept rate in the "
    "header (IJB-C 1:1 papers quote FAR=1e-4 and 1e-5; arcface_torch's r100 on MS1MV3: 96.85 at 1e-4). "
    "A `*` marks a FAR the set cannot resolve (fewer than 1/FAR impostor pairs): the nearest ROC point is "
    "shown, as the reference does, but it is not a TAR at that FAR. AUC is over all pairs. 1:N: rank-k is "
    "the share of probe templates whose own subject's gallery template is among the k best-scoring ones "
    "(closed set, both galleries together); TPIR@FPIR is per gallery (open set): the share of searches for "
    "someone in that gallery that find them at rank 1 above a threshold that only the given share of "
    "searches for people not in it exceed.")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _sets(rows: List[Dict[str, Any]]) -> List[str]:
    seen: Dict[str, None] = {}
    for row in rows:
        for name in row.get("ijb", {}):
            seen.setdefault(name, None)
    return list(seen)


def verification_table(rows: List[Dict[str, Any]]) -> str:
    """1:1: one line per (checkpoint, set): TAR (%) at each FAR, AUC; '' when no row has a 1:1 result."""
    lines: List[str] = []
    fars: List[str] = []
    unresolved = False
    for row in rows:
        for name, s in row.get("ijb", {}).items():
            v = s.get("verification")
            if not v:
                continue
            if not lines:
                fars = list(v["tar_at_far"])
                header = ["checkpoint", "set"] + [f"FAR={f}" for f in fars] + ["AUC", "pairs (genuine)"]
                lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            cells = [row["label"], name]
            for f in fars:
                mark = "" if v["resolved"].get(f, True) else "*"
                unresolved |= bool(mark)
                cells.append(_pct(v["tar_at_far"].get(f)) + mark)
            cells += ["n/a" if v["auc"] is None else f"{100 * v['auc']:.2f}", f"{v['pairs']} ({v['genuine']})"]
            lines.append("| " + " | ".join(cells) + " |")
    if unresolved:
        lines.append("* fewer impostor pairs than 1/FAR: the nearest ROC point, not a TAR at that FAR")
    return "\n".join(lines)


def identification_table(rows: List[Dict[str, Any]]) -> str:
    """1:N: rank-1/5/10 and TPIR@FPIR per gallery (%); '' when no row has a 1:N result."""
    lines: List[str] = []
    ranks: List[str] = []
    fpirs: List[str] = []
    for row in rows:
        for name, s in row.get("ijb", {}).items():
            ident = s.get("identification")
            if not ident:
                continue
            if not lines:
                ranks = list(ident["rank"])
                first = next(iter(ident["tpir_at_fpir"].values()), {})
                fpirs = list(first)
                header = (["checkpoint", "set"] + [f"rank-{k}" for k in ranks]
                          + [f"TPIR@FPIR={f}" for f in fpirs] + ["probes (unmated)", "gallery templates"])
                lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            cells = [row["label"], name] + [_pct(ident["rank"][k]) for k in ranks]
            for f in fpirs:
                cells.append(", ".join(f"{g} {_pct(v.get(f))}" for g, v in ident["tpir_at_fpir"].items()))
            cells += [f"{ident['probes']} ({ident['unmated_probes']})", str(ident["gallery_templates"])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _notes(rows: List[Dict[str, Any]]) -> List[str]:
    """Counts and options per set, once; unreadable faces per checkpoint (they had zero features)."""
    notes: List[str] = []
    described: set = set()
    for row in rows:
        for name, s in row.get("ijb", {}).items():
            if name not in described:
                described.add(name)
                o = s["options"]
                notes.append(f"{name}: {s['faces']} faces, {s['templates']} templates; tta={o['tta']}, "
                             f"detector score {'on' if o['detector_score'] else 'off'}, "
                             f"norm score {'on' if o['norm_score'] else 'off'} ({s['path']})")
            if s["unreadable_faces"]:
                notes.append(f"{name}: {s['unreadable_faces']} faces could not be read or aligned; their "
                             f"features are zero (as the reference's would be)")
    return notes


def console_text(rows: List[Dict[str, Any]]) -> str:
    """The IJB part of what evaluate.py prints ('' when no IJB set was evaluated)."""
    if not _sets(rows):
        return ""
    parts = [""] + _notes(rows)
    ver, ident = verification_table(rows), identification_table(rows)
    if ver:
        parts += ["", "IJB 1:1 verification: TAR (%) at FAR", ver]
    if ident:
        parts += ["", "IJB 1:N identification (%)", ident]
    return "\n".join(parts)


def markdown(rows: List[Dict[str, Any]]) -> List[str]:
    """eval.md lines of the IJB section ([] when no IJB set was evaluated)."""
    if not _sets(rows):
        return []
    lines = ["# IJB-B / IJB-C", ""] + [f"- {n}" for n in _notes(rows)] + [""]
    ver, ident = verification_table(rows), identification_table(rows)
    if ver:
        lines += ["## 1:1 verification: TAR (%) at FAR", "", ver, ""]
    if ident:
        lines += ["## 1:N identification (%)", "", ident, ""]
    return lines + [HOW_TO_READ, "", f"Protocol: {PROTOCOL}", ""]


def figure_name(stem: str, target: str) -> str:
    """roc_ijb_<checkpoint>_<set>.png: one figure per result, so a report merged over runs keeps each one's."""
    return f"roc_ijb_{stem}_{target}.png"


def plot_rocs(report_dir: str, row: Dict[str, Any], curves: Mapping[str, Dict[str, Any]]) -> List[str]:
    """roc_ijb_<checkpoint>_<set>.png (TAR against log FAR from 1e-6) per set with a curve; the paths written."""
    stem = os.path.splitext(os.path.basename(row["path"]))[0]
    paths = []
    for target, c in curves.items():
        v = row["ijb"][target]["verification"]
        tar = v["tar_at_far"].get("0.0001")
        curve = {"fpr": c["fpr"], "tpr": c["tpr"], "min_far": 1.0 / max(1, v["impostor"]),
                 "label": f"{target} (TAR@FAR=1e-4 {_pct(tar)}%)"}
        path = os.path.join(report_dir, figure_name(stem, target))
        plot_far_roc({target: curve}, path, title=f"IJB {target} 1:1 ROC: {row['label']}")
        paths.append(path)
    return paths
