"""This run's results merged into the eval.json a report folder already holds.

A folder's eval.json is its record of evaluations: a later run adds to it instead of replacing
it (an IJB-only run must not lose the .bin thresholds infer.py reads). Rows are identified by the
checkpoint's sha256, so a copied file is the same checkpoint and a file changed in place is not:

- a checkpoint this run evaluated: its row takes this run's path and label; each result this run
  computed (per .bin target, per IJB set) replaces the old one, every other result is kept;
- an old row whose path this run evaluated holding other bytes is dropped (with a note): the
  weights it describes are gone from there (retrained, overwritten), and infer.py, which looks a
  model up by sha256 and then by path, must not take its threshold for the new file's;
- every other old row is kept as it was: the report stays the folder's record.

Results from different settings are never mixed silently. The .bin results share the header's
``tta`` and ``data`` (the sha256 of each target's .bin); an IJB result carries its own options
and meta sha256. A run whose results would sit beside kept results scored with other settings
(another --tta for .bin sets, another file under a target's name, other IJB options or meta
files) is refused before any model runs, naming the clash; results the run replaces do not clash.
Refusing costs a ``--report DIR``; mixing would put incomparable numbers in one table, and
dropping the old ones would lose what this module exists to keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Tuple

from utils.errors import UserError


class ReportClashError(UserError):
    """This run's settings differ from those of results the report folder would keep beside them."""


@dataclass(frozen=True)
class Scope:
    """What a run computes, and the settings each result depends on."""

    checkpoints: Mapping[str, str]  # absolute path -> sha256, in run order
    tta: str
    bins: Mapping[str, str]  # .bin target -> sha256 of the file scored (empty: no .bin sets in this run)
    ijb: Mapping[str, Dict[str, Any]]  # IJB set -> {"options": {...}, "meta_sha256": "..."}

    @property
    def shas(self) -> set:
        return set(self.checkpoints.values())


def ijb_settings(summary: Mapping[str, Any]) -> Dict[str, Any]:
    """The part of an IJB result's summary its numbers depend on besides the weights."""
    return {"options": summary.get("options"), "meta_sha256": summary.get("meta_sha256")}


def scope_of(report: Mapping[str, Any]) -> Scope:
    """The scope of a report this run built (before merging): its rows, header tta and data, IJB settings."""
    ijb: Dict[str, Dict[str, Any]] = {}
    for row in report["checkpoints"]:
        for name, summary in row.get("ijb", {}).items():
            ijb.setdefault(name, ijb_settings(summary))
    return Scope({row["path"]: row["sha256"] for row in report["checkpoints"]}, report["tta"],
                 {t: d["sha256"] for t, d in report["data"].items()}, ijb)


def _fate(row: Mapping[str, Any], scope: Scope) -> str:
    """'merged' (same weights evaluated now), 'dropped' (its path now holds other weights) or 'kept'."""
    if row.get("sha256") in scope.shas:
        return "merged"
    return "dropped" if row.get("path") in scope.checkpoints else "kept"


def _surviving(row: Mapping[str, Any], scope: Scope) -> Tuple[List[str], List[str]]:
    """The .bin targets and IJB sets of an old row that stay in the merged report."""
    fate = _fate(row, scope)
    if fate == "dropped":
        return [], []
    bins, ijb = list(row.get("results") or {}), list(row.get("ijb") or {})
    if fate == "merged":
        bins, ijb = [t for t in bins if t not in scope.bins], [s for s in ijb if s not in scope.ijb]
    return bins, ijb


def clashes(old: Mapping[str, Any], scope: Scope) -> List[str]:
    """Why this run's results cannot sit beside the kept ones (one phrase each); [] when they can."""
    out: List[str] = []
    old_tta, old_data = old.get("tta"), old.get("data") or {}
    for row in old.get("checkpoints", []):
        bins, ijb = _surviving(row, scope)
        label = row.get("label", row.get("path", "?"))
        if bins and scope.bins and old_tta != scope.tta:
            out.append(f"it keeps {label}'s {', '.join(bins)} scored with --tta {old_tta}, this run uses "
                       f"--tta {scope.tta}")
        for t in bins:
            was = (old_data.get(t) or {}).get("sha256")
            if t in scope.bins and was != scope.bins[t]:
                out.append(f"it keeps {label}'s {t} scored on a .bin with sha256 {str(was)[:12]}, this run's {t} "
                           f"has sha256 {scope.bins[t][:12]}")
        for s in ijb:
            was = ijb_settings(row["ijb"][s])
            if s in scope.ijb and was != scope.ijb[s]:
                out.append(f"it keeps {label}'s {s} scored with {_describe(was)}, this run uses "
                           f"{_describe(scope.ijb[s])}")
    return out


def _describe(settings: Mapping[str, Any]) -> str:
    opts = settings.get("options") or {}
    text = ", ".join(f"{k}={v}" for k, v in opts.items())
    return f"{text or 'no options'} on meta files {str(settings.get('meta_sha256'))[:12]}"


def check(old: Mapping[str, Any] | None, scope: Scope, path: str) -> None:
    """Refuse (ReportClashError, one line naming ``path`` and the first clash) a run that would mix settings."""
    found = clashes(old, scope) if old else []
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ReportClashError(f"{path}: {found[0]}{more}; one report keeps one setting per result table: write "
                               f"this run elsewhere with --report DIR, or move that eval.json away")


def _mean_accuracy(results: Mapping[str, Any]) -> float | None:
    """Mean over the row's .bin targets of the 10-fold accuracy (fraction); None without results or with a NaN."""
    accs = [r.get("accuracy") for r in results.values()]
    if not accs or any(a is None for a in accs):
        return None
    return sum(accs) / len(accs)


def _combine(new_row: Dict[str, Any], olds: List[Mapping[str, Any]]) -> Dict[str, Any]:
    """The new row with the old rows' results (of the same weights) that it did not recompute."""
    results: Dict[str, Any] = {}
    ijb: Dict[str, Any] = {}
    for o in olds:
        results.update(o.get("results") or {})
        ijb.update(o.get("ijb") or {})
    results.update(new_row.get("results") or {})
    ijb.update(new_row.get("ijb") or {})
    row = dict(new_row, results=results, ijb=ijb)
    row["mean_accuracy"] = _mean_accuracy(results)
    return row


@dataclass
class Merged:
    report: Dict[str, Any]
    notes: List[str]  # one line each: what was kept, what was dropped
    previous: Dict[str, List[Mapping[str, Any]]]  # sha256 of a row this run evaluated -> its old rows
    dropped: List[Mapping[str, Any]]  # old rows whose path now holds other weights


def merge(old: Mapping[str, Any] | None, new: Dict[str, Any], path: str = "eval.json") -> Merged:
    """``new`` (this run's report) merged into ``old`` (the folder's, or None) as the module docstring says.

    Rows keep the old report's order, a re-evaluated checkpoint in its old place, new ones after.
    Raises ReportClashError where ``check`` would.
    """
    if not old:
        return Merged(new, [], {}, [])
    scope = scope_of(new)
    check(old, scope, path)
    old_rows = [r for r in old.get("checkpoints", []) if isinstance(r, dict)]
    previous: Dict[str, List[Mapping[str, Any]]] = {}
    for r in old_rows:
        if _fate(r, scope) == "merged":
            previous.setdefault(r["sha256"], []).append(r)
    new_rows = [_combine(r, previous.get(r["sha256"], [])) for r in new["checkpoints"]]
    rows: List[Dict[str, Any]] = []
    placed: set = set()
    notes: List[str] = []
    dropped: List[Mapping[str, Any]] = []
    kept = 0
    for r in old_rows:
        fate = _fate(r, scope)
        if fate == "kept":
            rows.append(dict(r))
            kept += 1
        elif fate == "dropped":
            dropped.append(r)
            notes.append(f"{path}: dropped the results of {r.get('label', r['path'])} (sha256 "
                         f"{str(r.get('sha256'))[:12]}): that file now holds other weights")
        elif r["sha256"] not in placed:
            placed.add(r["sha256"])
            i = next(i for i, n in enumerate(new["checkpoints"]) if n["sha256"] == r["sha256"])
            rows.append(new_rows[i])
            new_rows[i] = None
    rows += [r for r in new_rows if r is not None]
    for sha, olds in previous.items():
        row = next(r for r in rows if r["sha256"] == sha)
        again = set(scope.bins) | set(scope.ijb)
        old_names = {n for o in olds for n in list(o.get("results") or {}) + list(o.get("ijb") or {})}
        if old_names - again:
            notes.append(f"{path}: {row['label']}: kept its earlier {', '.join(sorted(old_names - again))}")
    if kept:
        notes.append(f"{path}: kept {kept} checkpoint(s) evaluated earlier and not now")
    return Merged(_header(old, new, rows), notes, previous, dropped)


def _header(old: Mapping[str, Any], new: Dict[str, Any], rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The merged report: this run's schema, protocol and code version; .bin header over the rows' targets."""
    scored = {t for r in rows for t in (r.get("results") or {})}
    data: Dict[str, Any] = {}
    for t, d in list((old.get("data") or {}).items()) + list(new["data"].items()):
        if t in scored:
            data[t] = new["data"].get(t, d)
    tta = new["tta"] if new["data"] or not data else old.get("tta", new["tta"])
    missing = [m for m in dict.fromkeys(list(old.get("missing_targets") or []) + new["missing_targets"])
               if m not in data]
    report = dict(new, tta=tta, data=data, missing_targets=missing, checkpoints=rows)
    if any(r.get("ijb") for r in rows):
        report["ijb_protocol"] = new.get("ijb_protocol") or old.get("ijb_protocol")
    return report
