"""Evaluation speed: the k-fold protocol, embedding throughput, and the decoded-.bin cache.

    python benchmarks/bench_eval.py [--pairs 6000] [--repeat 5] [--dim 512] [--embed-images 256]

Sections (each a function taking the parsed args and returning a dict; main() collects them):
- verification: our vectorised threshold search against the published loop over thresholds,
  written here, on the same embeddings (fold accuracies checked identical first);
- embedding: img/s of evaluation.embed.embed (what evaluation runs: uint8 in, normalise, model on
  the image and its flip, channels_last) for mobilefacenet and ir_se50 on this machine's CPU;
- decode_cache: decoding a .bin of JPEGs against reading the decoded pixels back from the
  on-disk cache (evaluation/cache.py).
Prints a readable summary on stderr and one JSON line of results on stdout.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from evaluation.protocol import (  # noqa: E402
    ACCURACY_THRESHOLDS,
    VAL_FAR_TARGET,
    VAL_THRESHOLDS,
    evaluate_pairs,
    kfold_accuracy,
    pair_distances,
    threshold_at_far,
)
from utils.runtime import keep_freed_memory  # noqa: E402


def folds(n: int, nfolds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index arrays of the protocol's contiguous folds (sklearn KFold without shuffling)."""
    idx = np.arange(n)
    return [(np.setdiff1d(idx, test), test) for test in np.array_split(idx, nfolds)]


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
    for train, test in folds(dist.size, nfolds):
        acc_train = np.array([accuracy(t, dist[train], issame[train]) for t in ACCURACY_THRESHOLDS])
        best = ACCURACY_THRESHOLDS[np.argmax(acc_train)]
        thrs.append(best)
        accs.append(accuracy(best, dist[test], issame[test]))
    return np.array(accs), np.array(thrs)


def loop_val(dist: np.ndarray, issame: np.ndarray, nfolds: int = 10) -> float:
    """The published VAL@FAR=1e-3 search, plainly (4000 thresholds per fold); returns mean VAL."""
    vals = []
    for train, test in folds(dist.size, nfolds):
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


def bench_embedding(args) -> dict:
    """Images per second through embed(), flip TTA included (two forward passes per image)."""
    import torch

    import backbones
    from evaluation.embed import embed

    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, (args.embed_images, 112, 112, 3), dtype=np.uint8)
    out = {"threads": torch.get_num_threads(), "images": args.embed_images, "batch_size": args.embed_batch}
    from benchmarks.bench_backbones import calibrate_bn

    for name in args.embed_backbones.split(","):
        model = backbones.build(name, embedding_size=512)
        calibrate_bn(model)  # a fresh net's eval activations decay into denormals, slow on CPUs: not a real model
        model = model.eval().to(memory_format=torch.channels_last)
        embed(model, images[: args.embed_batch], batch_size=args.embed_batch, tta="sum")  # warm-up
        row = {}
        for tta in ("sum", "none"):
            t = best_time(lambda m=model, mode=tta: embed(m, images, batch_size=args.embed_batch, tta=mode), 2)
            row[f"img_per_s_tta_{tta}"] = args.embed_images / t
        out[name] = row
    return out


def bench_decode_cache(args) -> dict:
    """Decode a .bin of 112x112 JPEGs vs. load the decoded copy from the cache (all pixels touched)."""
    import cv2

    from data.bins import decode_bin, write_bin
    from evaluation.cache import load_decoded

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:112, 0:112]
    payloads = []
    for i in range(args.cache_images):  # smooth face-sized images with noise: JPEG sizes like real ones
        base = (np.stack([xx, yy, (xx + yy) // 2], -1) * (1 + i % 3) + rng.integers(0, 40, (112, 112, 3))) % 256
        payloads.append(cv2.imencode(".jpg", base.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "set.bin")
        write_bin(path, payloads, np.arange(len(payloads) // 2) % 2 == 0)
        cache = os.path.join(tmp, "cache")
        t_decode = best_time(lambda: decode_bin(path), 2)
        load_decoded(path, cache_dir=cache)  # fills the cache

        def cached():
            hit = load_decoded(path, cache_dir=cache)
            assert hit.cached
            return int(np.asarray(hit.images).sum(dtype=np.uint64))

        t_cached = best_time(cached, 3)
    return {"images": args.cache_images, "decode_s": t_decode, "cached_s": t_cached,
            "speedup": t_decode / t_cached}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6000, help="number of verification pairs")
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per method (best is kept)")
    parser.add_argument("--embed-images", type=int, default=256, help="images embedded per backbone")
    parser.add_argument("--embed-batch", type=int, default=64, help="embedding batch size")
    parser.add_argument("--embed-backbones", default="mobilefacenet,ir_se50", help="comma-separated backbones")
    parser.add_argument("--cache-images", type=int, default=2000, help="images in the .bin of the cache section")
    parser.add_argument("--sections", default="verification,embedding,decode_cache", help="which sections to run")
    args = parser.parse_args(argv)

    keep_freed_memory()  # as evaluate.py and train.py do at start
    sections = {"verification": bench_verification, "embedding": bench_embedding, "decode_cache": bench_decode_cache}
    results = {name: sections[name](args) for name in args.sections.split(",")}
    if "verification" in results:
        _print_verification(results["verification"])
    if "embedding" in results:
        e = results["embedding"]
        for name in args.embed_backbones.split(","):
            print(f"embed {name}: {e[name]['img_per_s_tta_sum']:.1f} img/s with flip TTA (sum), "
                  f"{e[name]['img_per_s_tta_none']:.1f} img/s without ({e['threads']} threads, batch "
                  f"{e['batch_size']})", file=sys.stderr)
    if "decode_cache" in results:
        c = results["decode_cache"]
        print(f"{c['images']} JPEGs: decode {c['decode_s']:.2f} s, from the cache {c['cached_s'] * 1e3:.0f} ms "
              f"-> {c['speedup']:.0f}x", file=sys.stderr)
    print(json.dumps(results))
    return results


def _print_verification(v: dict) -> None:
    print(
        f"{v['pairs']} pairs: fold accuracies identical (accuracy {v['accuracy']:.4f}, VAL@1e-3 {v['val']:.4f})\n"
        f"accuracy search: loop {v['loop_accuracy_s'] * 1e3:.1f} ms,"
        f" vectorised {v['vectorised_accuracy_s'] * 1e3:.2f} ms"
        f" -> {v['accuracy_speedup']:.0f}x (goal >= 20x)\n"
        f"accuracy + VAL: loop {v['loop_accuracy_plus_val_s'] * 1e3:.0f} ms, evaluate_pairs (full report)"
        f" {v['evaluate_pairs_s'] * 1e3:.2f} ms -> {v['full_speedup']:.0f}x",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
