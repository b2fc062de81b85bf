"""IJB end to end: faces/s of the whole evaluation (decode + align + embed + score) on this machine.

    python benchmarks/bench_ijb_pipeline.py [--subjects 100] [--backbone mobilefacenet] [--device cpu]
                                            [--workers 2] [--batch-size 64] [--json PATH]

A synthetic IJB-C release (prepare_data.py synth --ijb-only: loose JPEG crops of held-out synthetic
identities, 5 points, media, templates, pairs, 1:N files) in a temporary folder, scored by
evaluation.ijb.evaluate_ijb with an untrained backbone, four ways in one run:

- align only: decode + 5-point alignment (evaluation.ijb_faces.iter_aligned), no network;
- uncached: the whole pipeline with --no-cache (alignment in loader workers while the model embeds);
- first cached: the same, writing the crop cache as it goes (what a first checkpoint pays);
- second cached: crops read back from the cache (what every later checkpoint pays).

The three pipeline runs must give identical pair scores (the cache changes nothing but time).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import backbones  # noqa: E402
from evaluation.ijb import IJBOptions, evaluate_ijb, load_ijb  # noqa: E402
from evaluation.ijb_faces import iter_aligned  # noqa: E402
from prepare.synth import generate_ijb  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, default=100, help="synthetic subjects (3 templates each)")
    p.add_argument("--backbone", default="mobilefacenet")
    p.add_argument("--embedding-size", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = backbones.build(args.backbone, embedding_size=args.embedding_size).to(args.device)
    model = model.to(memory_format=torch.channels_last).eval()
    out: dict = {"backbone": args.backbone, "device": args.device, "workers": args.workers,
                 "batch_size": args.batch_size, "torch": torch.__version__, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        info = generate_ijb(os.path.join(tmp, "data"), subjects=args.subjects, seed=0, workers=args.workers)
        data = load_ijb(info["root"])
        n = len(data.faces.names)
        out.update(faces=n, templates=info["templates"], pairs=info["pairs"])

        t0 = time.perf_counter()
        for _ in iter_aligned(data.faces, data.layout.image_dir, batch_size=args.batch_size, workers=args.workers):
            pass
        out["align_only_faces_per_s"] = n / (time.perf_counter() - t0)

        scores = {}
        cache = os.path.join(tmp, "cache")
        for name, cache_dir in (("uncached", None), ("first_cached", cache), ("second_cached", cache)):
            t0 = time.perf_counter()
            r = evaluate_ijb(model, data, IJBOptions(), batch_size=args.batch_size, device=args.device,
                             amp=args.amp, cache_dir=cache_dir, workers=args.workers, log=lambda m: None)
            out[f"{name}_faces_per_s"] = n / (time.perf_counter() - t0)
            scores[name] = r.scores
        same = all(np.array_equal(scores["uncached"], s) for s in scores.values())
        out["scores_identical"] = bool(same)
    print(f"{args.backbone} ({args.embedding_size}-d) on {args.device}, {out['faces']} faces, {out['templates']} "
          f"templates, {out['pairs']} pairs; workers {args.workers}, batch {args.batch_size}, "
          f"torch {out['torch']} ({out['threads']} threads)")
    for key in ("align_only", "uncached", "first_cached", "second_cached"):
        print(f"  {key:14s}: {out[key + '_faces_per_s']:8.1f} faces/s")
    print(f"  pair scores identical across the three pipeline runs: {same}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    if not same:
        raise SystemExit("pair scores differ between cached and uncached runs")
    return out


if __name__ == "__main__":
    main()
