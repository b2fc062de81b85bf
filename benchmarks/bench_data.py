"""Data pipeline speed, ours against what the seeds do, side by side in one run (images/s per process).

    python benchmarks/bench_data.py [--images 3000] [--workers 0,1,2] [--batch-size 128] [--rounds 3]
                                    [--out benchmarks/results/bench_data.json] [--data PACK_DIR] [--tmp DIR]

1. Unpacking a .rec to JPEG files: ``prepare.unpack.unpack_rec`` against the seeds' way
   (InsightFace_Pytorch's prepare_data: per record unpack the IRHeader, decode the image,
   re-encode it as a JPEG at quality 95), written here with cv2. Best of --rounds, alternating.
2. The training loader over one epoch, batch --batch-size, for each DataLoader worker count:
   ours (FaceDataset from the .rec, uint8 batches, ``collate``, then the trainer's batched
   flip and normalisation, here on the CPU) against torchvision ImageFolder + PIL +
   RandomHorizontalFlip + ToTensor + Normalize over the same JPEG bytes unpacked to a folder.
   Steady state: the clock starts when the first batch arrives (worker start-up excluded).
   Every process runs one torch/OpenCV thread (DataLoader workers do anyway), so 0 workers
   is the figure of one core.
3. CPU cores needed to feed 5000 img/s, from each loader's single-process (0 workers) figure.

A synthetic pack of about --images training images is generated in a temporary folder
(prepare.synth, not timed) unless --data names an existing pack. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import struct
import sys
import tempfile
import time
from typing import Callable, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from data.recordio import RecordReader, unpack_irheader  # noqa: E402
from utils.atomic import write_json  # noqa: E402

FEED_TARGET = 5000  # img/s a fast GPU eats (arcface_torch iresnet50, 8x V100: ~5000 img/s for the machine)


def make_pack(out_dir: str, images: int) -> str:
    """A synthetic insightface pack with about `images` training images (20 per identity)."""
    from prepare.synth import generate_dataset

    generate_dataset(out_dir, identities=max(1, images // 20), images_per_id=20, pairs=0.0, seed=0,
                     progress=False, workers=2)
    return out_dir


def seeds_unpack(rec_path: str, out_dir: str) -> Dict[str, float]:
    """The seeds' unpacking: read each image record, decode it, save it again as a JPEG at quality 95."""
    t0 = time.perf_counter()
    reader = RecordReader(rec_path)
    header, _ = unpack_irheader(reader.read(0))
    n = 0
    made = set()
    for key in range(1, int(header.label[0])):
        head, payload = unpack_irheader(reader.read(key))
        label = int(np.atleast_1d(head.label)[0])
        img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
        folder = os.path.join(out_dir, str(label))
        if label not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(label)
        cv2.imwrite(os.path.join(folder, f"{key}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        n += 1
    return {"images": n, "seconds": time.perf_counter() - t0}


def ours_unpack(rec_path: str, out_dir: str) -> Dict[str, float]:
    from prepare.unpack import unpack_rec

    res = unpack_rec(rec_path, out_dir, workers=1, progress=False)
    return {"images": int(res["images"]), "seconds": float(res["seconds"])}


def bench_unpack(rec_path: str, work: str, rounds: int) -> Dict[str, object]:
    try:
        import prepare.unpack  # noqa: F401
    except ImportError:
        return {"skipped": "prepare/unpack.py not found"}
    best: Dict[str, Dict[str, float]] = {}
    for r in range(rounds):
        for name, fn in (("seeds", seeds_unpack), ("ours", ours_unpack)):
            out = os.path.join(work, f"unpack_{name}_{r}")
            res = fn(rec_path, out)
            shutil.rmtree(out)
            if name not in best or res["seconds"] < best[name]["seconds"]:
                best[name] = res
    if best["ours"]["images"] != best["seeds"]["images"]:
        raise AssertionError(f"unpack counts differ: ours {best['ours']['images']}, seeds {best['seeds']['images']}")
    rate = {k: v["images"] / v["seconds"] for k, v in best.items()}
    return {"images": best["ours"]["images"], "seeds_img_s": rate["seeds"], "ours_img_s": rate["ours"],
            "ratio": rate["ours"] / rate["seeds"], "goal": 3.0}


def unpack_raw(rec_path: str, out_dir: str) -> int:
    """The pack's JPEG bytes, unchanged, as `out_dir/<class>/<key>.jpg` (the folder ImageFolder reads)."""
    reader = RecordReader(rec_path)
    header, _ = unpack_irheader(reader.read(0))
    for key in range(1, int(header.label[0])):
        record = reader.read(key)
        label = int(struct.unpack_from("<f", record, 4)[0])
        folder = os.path.join(out_dir, f"{label:06d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{key}.jpg"), "wb") as fh:
            fh.write(unpack_irheader(record)[1])
    return int(header.label[0]) - 1


def steady_rate(batches, step: Callable[[object], int]) -> float:
    """Images/s from the arrival of the first batch to the end (the first batch is not counted)."""
    n, t0 = 0, None
    for batch in batches:
        k = step(batch)
        if t0 is None:
            t0 = time.perf_counter()
        else:
            n += k
    return n / (time.perf_counter() - t0)


def ours_loader(pack: str, workers: int, batch_size: int, transform: bool = True) -> float:
    """The training path: uint8 batches from the .rec, then (`transform`) the trainer's flip + normalise."""
    from data.dataset import ResumableBatchSampler, build_dataset, collate, worker_init
    from data.transforms import flip_normalize

    ds = build_dataset(pack)
    loader = DataLoader(ds, batch_sampler=ResumableBatchSampler(len(ds), batch_size, seed=0), num_workers=workers,
                        collate_fn=collate, worker_init_fn=worker_init if workers else None,
                        prefetch_factor=4 if workers else None)
    flips = torch.Generator().manual_seed(0)

    def step(batch) -> int:
        images, labels, _ = batch
        if transform:
            flip_normalize(images, torch.rand(len(images), generator=flips) < 0.5)
        return len(labels)

    return steady_rate(loader, step)


def seeds_loader(folder: str, workers: int, batch_size: int) -> float:
    """InsightFace_Pytorch's loader: ImageFolder + PIL + RandomHorizontalFlip + ToTensor + Normalize."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])])
    loader = DataLoader(datasets.ImageFolder(folder, transform=tf), batch_size=batch_size, shuffle=True,
                        drop_last=True, num_workers=workers, prefetch_factor=4 if workers else None)
    return steady_rate(loader, lambda batch: len(batch[1]))


def bench_loader(pack: str, folder: str, workers: List[int], batch_size: int, rounds: int) -> Dict[str, object]:
    """Rounds interleave the loaders so that a change in machine load hits all alike; best kept, all recorded.

    `ours_loader_only`: the same without the CPU flip + normalise, i.e. what the CPU does on a
    GPU machine, where those run on the device.
    """
    variants = (("seeds", lambda w: seeds_loader(folder, w, batch_size)),
                ("ours", lambda w: ours_loader(pack, w, batch_size)),
                ("ours_loader_only", lambda w: ours_loader(pack, w, batch_size, transform=False)))
    samples: Dict[str, Dict[int, List[float]]] = {name: {w: [] for w in workers} for name, _ in variants}
    for _ in range(rounds):
        for w in workers:
            for name, fn in variants:
                samples[name][w].append(fn(w))
    rows = []
    for w in workers:
        row: Dict[str, object] = {"workers": w}
        for name, _ in variants:
            row[f"{name}_img_s"] = max(samples[name][w])
            row[f"{name}_samples"] = [round(v, 1) for v in samples[name][w]]
        row["ratio"] = row["ours_img_s"] / row["seeds_img_s"]
        rows.append(row)
    return {"batch_size": batch_size, "main_process_threads": 1, "rows": rows, "goal": 3.0}


def cores_to_feed(loader: Dict[str, object]) -> Dict[str, float]:
    """Cores for FEED_TARGET img/s at each loader's one-process rate (0 workers: one core)."""
    single = next((r for r in loader["rows"] if r["workers"] == 0), None)
    if single is None:
        return {}
    res: Dict[str, float] = {"target_img_s": FEED_TARGET}
    for name in ("seeds", "ours", "ours_loader_only"):
        res[f"{name}_img_s_per_core"] = single[f"{name}_img_s"]
        res[f"{name}_cores"] = FEED_TARGET / single[f"{name}_img_s"]
    return res


def cpu_idle(seconds: float = 2.0) -> float:
    """Share of CPU time idle over `seconds` (Linux /proc/stat; NaN elsewhere): were others running?"""
    def snap():
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        return sum(v), v[3] + v[4]

    try:
        t0, i0 = snap()
        time.sleep(seconds)
        t1, i1 = snap()
    except OSError:
        return float("nan")
    return (i1 - i0) / max(t1 - t0, 1)


def machine() -> Dict[str, object]:
    import PIL
    import torchvision

    return {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.is_available(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "opencv": cv2.__version__,
            "pillow": PIL.__version__, "loadavg_start": os.getloadavg(), "cpu_idle_before": cpu_idle()}


def print_table(res: Dict[str, object]) -> None:
    m = res["machine"]
    print(f"machine: {m['cpu_count']} CPU cores, GPU: {m['gpu']}, torch {m['torch']}; CPU idle before start "
          f"{100 * m['cpu_idle_before']:.0f}%, load average at start {m['loadavg_start'][0]:.2f}, at end "
          f"{res['loadavg_end'][0]:.2f}; {res['images']} training images; files in {res['tmp']}")
    u = res["unpack"]
    if "skipped" in u:
        print(f"unpack-rec: skipped ({u['skipped']})")
    else:
        print(f"unpack-rec ({u['images']} images): seeds (decode + JPEG q95) {u['seeds_img_s']:.0f} img/s, "
              f"ours {u['ours_img_s']:.0f} img/s -> {u['ratio']:.1f}x (goal >= 3x)")
    print(f"\ntraining loader, batch {res['loader']['batch_size']} (img/s, steady state, best of the rounds)")
    print("| workers | seeds: ImageFolder + PIL + ToTensor + Normalize | ours: .rec + uint8 + batched flip/normalise "
          "| ratio | ours without the CPU flip/normalise (GPU machine) |")
    print("|---:|---:|---:|---:|---:|")
    for r in res["loader"]["rows"]:
        print(f"| {r['workers']} | {r['seeds_img_s']:.0f} | {r['ours_img_s']:.0f} | {r['ratio']:.2f}x "
              f"| {r['ours_loader_only_img_s']:.0f} |")
    c = res["cores"]
    if c:
        print(f"\nto feed {c['target_img_s']} img/s (one-process rates): ours {c['ours_cores']:.1f} cores "
              f"({c['ours_img_s_per_core']:.0f} img/s per core; {c['ours_loader_only_cores']:.1f} cores when "
              f"flip/normalise run on a GPU), seeds {c['seeds_cores']:.1f} cores "
              f"({c['seeds_img_s_per_core']:.0f} img/s per core)")


def main(argv=None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000, help="training images in the synthetic pack")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to time, comma separated")
    parser.add_argument("--batch-size", type=int, default=128, help="loader batch size")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per method (best kept)")
    parser.add_argument("--data", default=None, help="an existing pack folder instead of a synthetic one")
    parser.add_argument("--tmp", default=None,
                        help="folder for the pack and the unpacked files (default: the system temp folder; "
                             "/dev/shm takes the disk out of the unpack figures)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "bench_data.json"), help="JSON file")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]

    # One thread per process: per-core figures, and no intra-op thread pool spinning on tiny
    # per-image tensors (with 2 threads on a busy 2-core machine ToTensor ran up to 10x slower).
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    res: Dict[str, object] = {"machine": machine(), "command": " ".join(["python", *sys.argv]),
                              "tmp": args.tmp or tempfile.gettempdir()}
    with tempfile.TemporaryDirectory(prefix="bench_data_", dir=args.tmp) as work:
        pack = args.data or make_pack(os.path.join(work, "pack"), args.images)
        rec = os.path.join(pack, "train.rec")
        folder = os.path.join(work, "folder")
        res["images"] = unpack_raw(rec, folder)
        res["unpack"] = bench_unpack(rec, work, args.rounds)
        res["loader"] = bench_loader(pack, folder, workers, args.batch_size, args.rounds)
    res["cores"] = cores_to_feed(res["loader"])
    res["loadavg_end"] = os.getloadavg()
    print_table(res)
    write_json(args.out, res)
    print(f"\nwrote {args.out}")
    return res


if __name__ == "__main__":
    main()
