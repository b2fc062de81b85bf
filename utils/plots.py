"""PNG figures people would rather look at than JSON: loss curves, ROC curves.

matplotlib is imported inside the functions with the non-interactive Agg
backend, so importing this module costs nothing and needs no display.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

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
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    for name, c in curves.items():
        fpr = [max(f, 1e-6) for f in c["fpr"]]
        label = f"{name} ({100 * c['accuracy']:.2f}%)" if "accuracy" in c else name
        ax.plot(fpr, c["tpr"], label=label)
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate (FAR, log scale)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
