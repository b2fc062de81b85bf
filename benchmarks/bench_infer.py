"""infer.py embed throughput on this CPU: the torch model vs its exported ONNX model in onnxruntime.

Same run, same images (synthetic faces decoded once), same flip TTA (sum: two forwards per image),
same batch size; the export is parity-checked as `infer.py export` does it.

    python benchmarks/bench_infer.py [--backbone mobilefacenet] [--images 256] [--batch-size 64]
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import backbones  # noqa: E402
from backbones.weights import save_backbone  # noqa: E402
from inference.embed import embed_images  # noqa: E402
from inference.export import write_onnx  # noqa: E402
from inference.model import load_model  # noqa: E402
from prepare.synth import identity_traits  # noqa: E402
from prepare.synth.render import render_face  # noqa: E402


def rate(model, images, batch_size, tta):
    embed_images(model, images[:batch_size], tta)  # warm-up
    t0 = time.perf_counter()
    for s in range(0, len(images), batch_size):
        embed_images(model, images[s:s + batch_size], tta)
    return len(images) / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="mobilefacenet")
    p.add_argument("--embedding-size", type=int, default=512)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tta", default="sum")
    args = p.parse_args()
    images = np.stack([render_face(identity_traits(0, i % 50), np.random.default_rng(i), 1.0)
                       for i in range(args.images)])
    with tempfile.TemporaryDirectory() as tmp:
        pt, ox = os.path.join(tmp, "backbone.pt"), os.path.join(tmp, "model.onnx")
        torch.manual_seed(0)
        m = backbones.build(args.backbone, embedding_size=args.embedding_size).eval()
        save_backbone(pt, m.state_dict(), args.backbone, args.embedding_size, "rgb")
        torch_model = load_model(pt)
        parity = write_onnx(torch_model, ox, "torchscript", images[:8])
        onnx_model = load_model(ox)
        r_torch = rate(torch_model, images, args.batch_size, args.tta)
        r_onnx = rate(onnx_model, images, args.batch_size, args.tta)
    print(f"{args.backbone} ({args.embedding_size}-d), {args.images} images, batch {args.batch_size}, tta={args.tta}, "
          f"torch {torch.__version__} threads {torch.get_num_threads()}")
    print(f"parity: {parity.text()}")
    print(f"torch       : {r_torch:8.1f} images/s")
    print(f"onnxruntime : {r_onnx:8.1f} images/s")
    print(f"ratio onnx/torch: {r_onnx / r_torch:.2f}x")


if __name__ == "__main__":
    main()
