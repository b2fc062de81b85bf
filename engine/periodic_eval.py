"""Verification during training (rank 0): the live weights' report, best.pt, and the EMA weights.

The evaluator maps a backbone to {"mean_accuracy": float, "results": {...}} (train.py builds it).
The live weights' report goes to the run log (history, TensorBoard, verification.json, one line);
a mean accuracy above the best so far (NaN never is) writes best.pt. With ``--ema-decay`` the
averaged weights go through the same evaluator: one line and history["eval_ema"] (best.pt and
verification.json stay the live weights').
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import torch.nn as nn

from engine.ema import BackboneEMA, ema_summary
from engine.runlog import RunLog

Evaluator = Callable[[nn.Module], Dict[str, Any]]


def evaluate_weights(evaluator: Evaluator, model: nn.Module, ema: BackboneEMA | None, step: int, best: float,
                     log: RunLog, save_best: Callable[[], None]) -> Tuple[Dict[str, Any], float]:
    """(the live weights' report, the best mean accuracy so far); ``save_best`` writes best.pt when it improved.
    history.json and loss.png are rewritten after."""
    report = evaluator(model)
    log.evaluation(step, report)
    acc = report.get("mean_accuracy", float("nan"))
    if acc == acc and acc > best:  # not NaN, improved
        best = acc
        save_best()
    if ema is not None:
        summary, line = ema_summary(evaluator(ema.module), step, ema.decay)
        log.history.setdefault("eval_ema", []).append(summary)
        log(line)
    log.write_history()
    return report, best
