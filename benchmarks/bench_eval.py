"""Evaluation speed: the vectorised k-fold protocol against the published loop over thresholds.

    python benchmarks/bench_eval.py [--pairs 6000] [--repeat 5] [--dim 512]

Prints a readable summary on stderr and one JSON line of results on stdout. Each section is a
function taking the parsed args and returning a dict; main() collects them under their names.
(Backbone embedding throughput is to be added as its own section, next to bench_verification.)
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from utils.verification import (  # noqa: E402
    ACCURACY_THRESHOLDS,
    VAL_FAR_TARGET,
    VAL_THRESHOLDS,
    evaluate_pairs,
    kfold_accuracy,
    kfold_indices,
    pair_distances,
    threshold_at_far,
)


def make_pairs(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit float32 embeddings (2n, dim) and labels: half the pairs "same", at angles around 70
    degrees (different pairs around 88), overlapping enough that accuracy is near 95%."""
    rng = np.random.default_rng(seed)
    issame = np.arange(n) % 2 == 0
    a = rng.standard_normal((n, dim))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    u = rng.standard_normal((n, dim))
    u -= np.sum(u * a, axis=1, keepdims=True) * a  # orthogonal to a
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    angle = np.radians(np.where(issame, rng.normal(70, 9, n), rng.normal(88, 4, n)))
    b = np.cos(angle)[:, None] * a + np.sin(angle)[:, None] * u
    emb = np.empty((2 * n, dim), np.float32)
    emb[0::2], emb[1::2] = a, b
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb, issame


def loop_accuracy(dist: np.ndarray, issame: np.ndarray, nfolds: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The published accuracy search, plainly: every threshold scored one at a time."""

    def accuracy(threshold, d, s):
        predict = np.less(d, threshold)
        tp = np.sum(np.logical_and(predict, s))
        tn = np.sum(np.logical_and(np.logical_not(predict), np.logical_not(s)))
        return float(tp + tn) / d.size

    accs, thrs = [], []
    for train, test in kfold_indices(dist.size, nfolds):
        acc_train = np.array([accuracy(t, dist[train], issame[train]) for t in ACCURACY_THRESHOLDS])
        best = ACCURACY_THRESHOLDS[np.argmax(acc_train)]
        thrs.append(best)
        accs.append(accuracy(best, dist[test], issame[test]))
    return np.array(accs), np.array(thrs)


def loop_val(dist: np.ndarray, issame: np.ndarray, nfolds: int = 10) -> float:
    """The published VAL@FAR=1e-3 search, plainly (4000 thresholds per fold); returns mean VAL."""
    vals = []
    for train, test in kfold_indices(dist.size, nfolds):
        d_train, s_train = dist[train], issame[train]
        far_train = np.array([np.sum(np.less(d_train, t) & ~s_train) / np.sum(~s_train) for t in VAL_THRESHOLDS])
        threshold = threshold_at_far(far_train, VAL_THRESHOLDS, VAL_FAR_TARGET) if far_train.max() >= 1e-3 else 0.0
        accepted = np.less(dist[test], threshold)
        vals.append(np.sum(accepted & issame[test]) / np.sum(issame[test]))
    return float(np.mean(vals))


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_verification(args) -> dict:
    emb, issame = make_pairs(args.pairs, args.dim)
    dist = pair_distances(emb[0::2], emb[1::2])

    acc_loop, thr_loop = loop_accuracy(dist, issame)
    acc_vec, thr_vec = kfold_accuracy(dist, issame)
    if not (np.array_equal(acc_loop, acc_vec) and np.array_equal(thr_loop, thr_vec)):
        raise AssertionError(f"fold results differ:\nloop {acc_loop} {thr_loop}\nvectorised {acc_vec} {thr_vec}")
    result = evaluate_pairs(dist, issame)
    val_loop = loop_val(dist, issame)
    if val_loop != result.val:
        raise AssertionError(f"VAL differs: loop {val_loop}, vectorised {result.val}")

    t_loop = best_time(lambda: loop_accuracy(dist, issame), args.repeat)
    t_vec = best_time(lambda: kfold_accuracy(dist, issame), args.repeat)
    t_val_loop = best_time(lambda: loop_val(dist, issame), max(1, args.repeat // 5))
    t_full = best_time(lambda: evaluate_pairs(dist, issame), args.repeat)
    return {
        "pairs": args.pairs,
        "dim": args.dim,
        "repeat": args.repeat,
        "accuracy": result.accuracy,
        "val": result.val,
        "loop_accuracy_s": t_loop,
        "vectorised_accuracy_s": t_vec,
        "accuracy_speedup": t_loop / t_vec,
        "loop_accuracy_plus_val_s": t_loop + t_val_loop,
        "evaluate_pairs_s": t_full,
        "full_speedup": (t_loop + t_val_loop) / t_full,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6000, help="number of verification pairs")
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per method (best is kept)")
    args = parser.parse_args(argv)

    results = {"verification": bench_verification(args)}
    v = results["verification"]
    print(
        f"{v['pairs']} pairs: fold accuracies identical (accuracy {v['accuracy']:.4f}, VAL@1e-3 {v['val']:.4f})\n"
        f"accuracy search: loop {v['loop_accuracy_s'] * 1e3:.1f} ms,"
        f" vectorised {v['vectorised_accuracy_s'] * 1e3:.2f} ms"
        f" -> {v['accuracy_speedup']:.0f}x (goal >= 20x)\n"
        f"accuracy + VAL: loop {v['loop_accuracy_plus_val_s'] * 1e3:.0f} ms, evaluate_pairs (full report)"
        f" {v['evaluate_pairs_s'] * 1e3:.2f} ms -> {v['full_speedup']:.0f}x",
        file=sys.stderr,
    )
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
