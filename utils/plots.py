"""PNG figures people would rather look at than JSON: loss curves, ROC curves.

matplotlib is imported inside the functions with the non-interactive Agg
backend, so importing this module costs nothing and needs no display.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import numpy as np

from utils.atomic import write_atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_loss(history: Mapping[str, Any], path: str) -> None:
    """Training loss (log scale) and, on a second axis, mean verification accuracy (%)."""
    if not history.get("step"):
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(history["step"], history["loss"], color="tab:blue", label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    evals = [e for e in history.get("eval", []) if e.get("mean_accuracy") == e.get("mean_accuracy")]
    if evals:
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in evals], [100 * e["mean_accuracy"] for e in evals], "o-", color="tab:red",
                 label="mean verification accuracy")
        ax2.set_ylabel("mean verification accuracy (%)")
    fig.legend(loc="upper right")
    ax.set_title("training")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def plot_roc(curves: Dict[str, Dict[str, Any]], path: str, title: str = "ROC") -> None:
    """One ROC curve per target: TAR against FAR on a log axis.

    `curves` maps target name -> {"fpr": [...], "tpr": [...], "accuracy": fraction}.
    The axes zoom onto where the curves differ: good models all sit near TAR = 1,
    so the TAR axis starts a little below the lowest TAR at the smallest FAR the
    sets can resolve (one false accept), and the FAR axis at half that FAR. Curves
    that coincide (several sets at TAR = 1) stay visible: the first ones are drawn
    wider and the line styles alternate.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    smallest_far, lowest_tar = 1e-3, 1.0
    styles = ("-", "--", "-.", ":")
    for k, (name, c) in enumerate(curves.items()):
        fpr, tpr = np.asarray(c["fpr"], dtype=float), np.asarray(c["tpr"], dtype=float)
        if fpr.size == 0:
            continue
        positive = fpr[fpr > 0]
        if positive.size:
            far0 = positive.min()
            smallest_far = min(smallest_far, far0)
            lowest_tar = min(lowest_tar, float(tpr[fpr <= far0].max()))
        label = f"{name} ({100 * c['accuracy']:.2f}%)" if c.get("accuracy") is not None else name
        # sets that reach TAR = 1 lie on top of each other: earlier ones wider, styles alternating
        ax.plot(np.maximum(fpr, 1e-9), tpr, label=label, drawstyle="steps-post",
                linewidth=max(1.2, 3.2 - 0.35 * k), linestyle=styles[k % len(styles)])
    ax.set_xscale("log")
    ax.set_xlim(max(smallest_far / 2, 1e-6), 1.0)
    ax.set_ylim(max(0.0, np.floor((lowest_tar - 0.02) * 20) / 20), 1.002)
    for far in (1e-4, 1e-3, 1e-2):
        ax.axvline(far, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("false accept rate (FAR, log scale)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, title="set (10-fold accuracy)", title_fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def plot_far_roc(curves: Dict[str, Dict[str, Any]], path: str, title: str = "ROC", far_min: float = 1e-6,
                 marks: tuple = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)) -> None:
    """TAR against FAR on a fixed log axis from ``far_min`` (IJB's reporting range), one curve per set.

    `curves` maps a name -> {"fpr": [...], "tpr": [...]} and optionally "label" (legend text) and
    "min_far" (1 / impostor pairs: FARs below it are shaded, the set cannot resolve them).
    Unlike plot_roc the axes do not zoom: IJB curves are read at FARs fixed by the protocol, so
    every figure shows the same range and two models' figures can be compared side by side.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    unresolved = max((float(c.get("min_far", 0.0)) for c in curves.values()), default=0.0)
    if unresolved > far_min:
        ax.axvspan(far_min, unresolved, color="grey", alpha=0.15, linewidth=0,
                   label="FAR below 1 / impostor pairs: not resolved")
    for name, c in curves.items():
        fpr, tpr = np.asarray(c["fpr"], dtype=float), np.asarray(c["tpr"], dtype=float)
        if fpr.size:
            ax.plot(np.maximum(fpr, far_min / 10), tpr, label=c.get("label", name), drawstyle="steps-post",
                    linewidth=1.5)
    ax.set_xscale("log")
    ax.set_xlim(far_min, 1.0)
    ax.set_ylim(0.0, 1.002)
    for far in marks:
        ax.axvline(far, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xticks(list(marks) + [1.0])
    ax.set_xlabel("false accept rate (FAR, log scale)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
