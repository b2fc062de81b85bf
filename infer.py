#!/usr/bin/env python3
"""Use a trained model: embed images, keep a facebank, identify and verify faces, export to ONNX/TorchScript.

MODEL is a backbone.pt / checkpoint.pt written by train.py, foreign weights with --backbone, or an .onnx
written by `infer.py export` (run with onnxruntime). Images are aligned 112x112 faces (other sizes are
resized as training does). Embeddings use flip TTA as evaluate.py does (--tta sum by default).

  infer.py embed MODEL faces/ --out emb.npy            emb.npy (float32 L2-normalised rows) + emb.txt (paths)
  infer.py facebank build MODEL bank_dir/ --out bank.npz    bank_dir/<name>/*.jpg, one mean embedding per name
  infer.py facebank add MODEL bank.npz new_dir/carol        add (or replace) identities
  infer.py facebank remove bank.npz carol                   remove identities
  infer.py identify MODEL bank.npz q1.jpg q2.jpg --top-k 3 --out results.csv
  infer.py verify MODEL a.jpg b.jpg
  infer.py export MODEL --onnx model.onnx --torchscript model.ts.pt
  infer.py video MODEL bank.npz in.mp4 out.mp4           every face of every frame boxed and named
  infer.py camera MODEL bank.npz --camera 0 --out live.avi --max-frames 300

--detect (embed, facebank build/add, identify, verify): the images are raw photos; the chosen face
(--face largest|central, --min-face, --min-score as in prepare_data.py align --detect) is found with
MTCNN and aligned to the ArcFace template first. video and camera always detect (every face).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from typing import List, Sequence, Tuple

import numpy as np

from config import ConfigError
from inference import facebank as fb
from inference.embed import TTA_MODES, embed_files, embed_images, list_images, output_size, read_image
from inference.export import EXPORTERS, write_onnx, write_torchscript
from inference.model import EmbeddingModel, load_model
from inference.threshold import resolve
from prepare.align import non_images
from utils.atomic import write_bytes, write_text
from utils.errors import fail, user_errors

PROG = "infer.py"
NO_FACE = "no face"  # identify --detect: the answer for a photo without one


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="", help="architecture of foreign weights (e.g. ir_se50)")
    p.add_argument("--embedding-size", type=int, default=512, help="embedding size of foreign weights")
    p.add_argument("--input-order", default="", choices=("", "rgb", "bgr"),
                   help="channel order the weights were trained on (default: from the checkpoint, else rgb)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:N); .onnx runs on the CPU")


def _embed_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta", default="sum", choices=sorted(TTA_MODES),
                   help="flip TTA as in evaluation: sum = normalise(e(x)+e(flip x)), concat, none")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _detect_flags(p, detect_switch=True)


def _detect_flags(p: argparse.ArgumentParser, detect_switch: bool) -> None:
    """--detect (raw photos: find the face with MTCNN and align it first) and the rules prepare_data.py
    align --detect has; video/camera always detect, so they take the rules only."""
    w = "with --detect: " if detect_switch else ""
    if detect_switch:
        p.add_argument("--detect", action="store_true",
                       help="raw photos: find each image's face (MTCNN) and align it to the ArcFace 112x112 "
                            "template before embedding (weights: pip install --no-deps facenet-pytorch==2.6.0)")
        p.add_argument("--face", choices=("largest", "central"), default="largest",
                       help=w + "which face of a photo")
    p.add_argument("--min-face", type=float, default=20.0, metavar="PIXELS",
                   help=w + "smallest face side kept (default 20)")
    p.add_argument("--min-score", type=float, default=0.8,
                   help=w + "smallest detector probability kept, 0-1 (default 0.8)")


def _threshold_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threshold", type=float, default=None,
                   help="cosine threshold (default: the model's eval.json beside it, else 0.25)")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("embed", help="embeddings of images -> .npy (+ .txt of the paths in row order)")
    e.add_argument("model", metavar="MODEL")
    e.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    e.add_argument("--out", required=True, help="the .npy to write (its paths go to the same name with .txt)")
    bank = sub.add_parser("facebank", help="build or update a facebank (bank.npz)")
    bsub = bank.add_subparsers(dest="action", required=True)
    b = bsub.add_parser("build", help="FACEBANK_DIR/<name>/* -> one embedding per name")
    b.add_argument("model", metavar="MODEL")
    b.add_argument("folder", metavar="FACEBANK_DIR")
    b.add_argument("--out", required=True, help="bank .npz to write")
    a = bsub.add_parser("add", help="add (or replace) identities: DIR/<name> folders")
    a.add_argument("model", metavar="MODEL")
    a.add_argument("bank", metavar="BANK")
    a.add_argument("folders", nargs="+", metavar="DIR/NAME")
    r = bsub.add_parser("remove", help="remove identities by name")
    r.add_argument("bank", metavar="BANK")
    r.add_argument("names", nargs="+", metavar="NAME")
    i = sub.add_parser("identify", help="best facebank match of each image, or 'unknown' below the threshold")
    i.add_argument("model", metavar="MODEL")
    i.add_argument("bank", metavar="BANK")
    i.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    i.add_argument("--top-k", type=int, default=1, help="also list the K best identities")
    i.add_argument("--out", default="", help="results.csv or results.json")
    _threshold_flag(i)
    v = sub.add_parser("verify", help="cosine score of two images and same/different")
    v.add_argument("model", metavar="MODEL")
    v.add_argument("image_a", metavar="IMG_A")
    v.add_argument("image_b", metavar="IMG_B")
    _threshold_flag(v)
    x = sub.add_parser("export", help="ONNX / TorchScript, parity-checked against the torch model")
    x.add_argument("model", metavar="MODEL")
    x.add_argument("--onnx", default="", help="the .onnx to write (dynamic batch, metadata)")
    x.add_argument("--torchscript", default="", help="the TorchScript .pt to write")
    x.add_argument("--exporter", default="dynamo", choices=sorted(EXPORTERS),
                   help="torch.onnx exporter: dynamo (opset 18, needs onnxscript) or torchscript (legacy, opset 17)")
    x.add_argument("--check-images", nargs="*", default=[], metavar="IMAGE_OR_DIR",
                   help="real images run through both models besides the random batches (first 16)")
    for sp in (e, b, a, i, v, x):
        _model_flags(sp)
    for sp in (e, b, a, i, v):
        _embed_flags(sp)
    r.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    for name, what in (("video", "label every face of a video file: IN -> OUT (.mp4 mp4v or .avi MJPG)"),
                       ("camera", "label faces live from a camera (or --source FILE); headless: --out and/or "
                                  "per-frame lines")):
        c = sub.add_parser(name, help=what)
        c.add_argument("model", metavar="MODEL")
        c.add_argument("bank", metavar="BANK")
        if name == "video":
            c.add_argument("input", metavar="IN", help="video file read with OpenCV")
            c.add_argument("output", metavar="OUT", help="labelled video: same frame count, size and fps")
            c.add_argument("--max-frames", type=int, default=0, help="stop after N frames (default: all)")
        else:
            c.add_argument("--camera", type=int, default=0, metavar="INDEX",
                           help="camera index for cv2.VideoCapture (default 0; --device is the torch device)")
            c.add_argument("--source", default="", metavar="FILE", help="read this video file instead of a camera")
            c.add_argument("--out", default="", help="write the labelled frames to this .mp4 / .avi")
            c.add_argument("--max-frames", type=int, default=0,
                           help="stop after N frames (default: at the end of the stream or on Ctrl-C)")
            c.add_argument("--quiet", action="store_true", help="no per-frame lines")
        _model_flags(c)
        _threshold_flag(c)
        _detect_flags(c, detect_switch=False)
        c.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _rules(args: argparse.Namespace, face: str | None = None):
    """The DetectRules of --face/--min-face/--min-score, or None without --detect (video/camera: face='all')."""
    from inference.faces import DetectRules, check_rules

    if face is None and not args.detect:
        return None
    return check_rules(DetectRules(face=face or args.face, min_face=args.min_face, min_score=args.min_score))


def _load(args: argparse.Namespace) -> EmbeddingModel:
    model = load_model(args.model, args.backbone, args.embedding_size, args.input_order, args.device)
    print(f"model: {model.describe()}")
    return model


def _listed(inputs: Sequence[str]) -> List[str]:
    """list_images(inputs), with one note naming the files its folders hold that are not images by extension."""
    others = [os.path.join(d, rel) for d in inputs if os.path.isdir(d) for rel in non_images(d)]
    if others:
        print(f"note: {len(others)} file(s) in the folders are not images by their extension, left out: "
              f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''}", file=sys.stderr)
    return list_images(inputs)


def _report_failed(failed: Sequence[Tuple[str, str]]) -> int:
    """Print the images that could not be used; the exit status (1 if any)."""
    for path, why in failed:  # the reasons mostly name the file already: say it once
        print(f"  bad image: {why if why.startswith(path + ': ') else f'{path}: {why}'}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} image(s) could not be used (listed above)", file=sys.stderr)
    return 1 if failed else 0


def cmd_embed(args: argparse.Namespace) -> int:
    model = _load(args)
    result = embed_files(model, _listed(args.inputs), args.tta, args.batch_size, not args.no_progress,
                         detect=_rules(args))
    emb = result.embeddings.astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, emb)
    write_bytes(args.out, buf.getvalue(), fsync=True)
    txt = os.path.splitext(args.out)[0] + ".txt"
    write_text(txt, "".join(p + "\n" for p in result.paths))
    print(f"{len(result.paths)} embeddings ({emb.shape[1]}-d, tta={args.tta}) -> {args.out}; paths -> {txt}")
    return _report_failed(result.failed)


def _bank_summary(bank: fb.Facebank, path: str) -> None:
    print(f"{path}: {len(bank.names)} identities, {int(bank.counts.sum())} images, {bank.embedding_size}-d, "
          f"tta={bank.tta} (each: mean of the L2-normalised image embeddings, normalised again)")


def cmd_facebank(args: argparse.Namespace) -> int:
    if args.action == "remove":
        bank = fb.load(args.bank)
        bank = fb.without(bank, args.names, args.bank)
        bank.save(args.bank)
        print(f"removed {', '.join(args.names)}")
        _bank_summary(bank, args.bank)
        return 0
    rules = _rules(args)
    model = _load(args)
    if args.action == "build":
        folders = fb.identity_folders(args.folder)
    else:
        bank = fb.load(args.bank)
        bank.check_model(model, args.bank, args.tta)
        folders = []
        for f in args.folders:
            if not os.path.isdir(f):
                raise FileNotFoundError(f"{f}: no such identity folder (expected DIR/<name>)")
            folders.append((os.path.basename(os.path.normpath(f)), f))
    _listed([f for _, f in folders])  # the note on files that are not images; embed_identities lists its own
    means, counts, failed = fb.embed_identities(model, folders, args.tta, args.batch_size, not args.no_progress,
                                                   detect=rules)
    for name in sorted(means):
        print(f"  {name}: {counts[name]} images")
    if args.action == "build":
        bank = fb.build(model, means, counts, args.tta, output_size(model, args.tta))
        out = args.out
    else:
        replaced = [n for n in means if n in bank.names]
        if replaced:
            print(f"replaced: {', '.join(sorted(replaced))}")
        bank = fb.merged(bank, means, counts)
        out = args.bank
    bank.save(out)
    _bank_summary(bank, out)
    return _report_failed(failed)


def _write_results(path: str, rows: List[dict]) -> None:
    if path.lower().endswith(".json"):
        write_text(path, json.dumps(rows, indent=2) + "\n")
    elif path.lower().endswith(".csv"):
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "identity", "score", "top_k"])
        for r in rows:
            w.writerow([r["path"], r["identity"], f"{r['score']:.6f}",
                        ";".join(f"{n}:{s:.6f}" for n, s in r["top_k"])])
        write_text(path, buf.getvalue())
    else:
        raise ConfigError(f"--out {path}: write results.csv or results.json")


def cmd_identify(args: argparse.Namespace) -> int:
    if args.out and not args.out.lower().endswith((".csv", ".json")):
        raise ConfigError(f"--out {args.out}: write results.csv or results.json")
    if args.top_k < 1:
        raise ConfigError(f"--top-k {args.top_k}: must be >= 1")
    rules = _rules(args)
    model = _load(args)
    bank = fb.load(args.bank)
    bank.check_model(model, args.bank, args.tta)
    threshold = resolve(args.model, model.kind, model.metadata, args.threshold)
    print(threshold.text())
    result = embed_files(model, _listed(args.inputs), bank.tta, args.batch_size, not args.no_progress,
                         detect=rules)
    matches = fb.match(bank, result.embeddings, threshold.cosine, args.top_k)
    rows = [{"path": p, "identity": m.name, "score": m.score, "top_k": m.top} for p, m in zip(result.paths, matches)]
    # with --detect, a photo without a face is an answer ("no face"), not a bad image
    rows += [{"path": p, "identity": NO_FACE, "score": float("nan"), "top_k": []} for p in result.no_face]
    width = max([len(r["path"]) for r in rows] + [5])
    print(f"{'image':<{width}}  {'identity':<20} {'cosine':>7}" + ("  top-k" if args.top_k > 1 else ""))
    for r in rows:
        top = "  " + ", ".join(f"{n} {s:.3f}" for n, s in r["top_k"]) if args.top_k > 1 else ""
        score = f"{r['score']:>7.4f}" if r["top_k"] else f"{'-':>7}"
        print(f"{r['path']:<{width}}  {r['identity']:<20} {score}{top}")
    if args.out:
        _write_results(args.out, rows)
        print(f"results -> {args.out}")
    return _report_failed([f for f in result.failed if f[0] not in set(result.no_face)])


def _verify_image(path: str, rules) -> np.ndarray:
    if rules is None:
        return read_image(path)
    from inference.faces import NoFaceError, read_face

    try:
        return read_face(path, rules)
    except NoFaceError as exc:
        raise ConfigError(str(exc)) from None


def cmd_verify(args: argparse.Namespace) -> int:
    rules = _rules(args)
    model = _load(args)
    threshold = resolve(args.model, model.kind, model.metadata, args.threshold)
    emb = embed_images(model, np.stack([_verify_image(args.image_a, rules), _verify_image(args.image_b, rules)]),
                       args.tta)
    cos = float(emb[0] @ emb[1])
    same = cos >= threshold.cosine
    print(threshold.text())
    print(f"cosine {cos:.4f} (squared L2 distance {2 - 2 * cos:.4f}): {'same person' if same else 'different people'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if not args.onnx and not args.torchscript:
        raise ConfigError("export: say what to write: --onnx FILE and/or --torchscript FILE")
    model = _load(args)
    real = None
    if args.check_images:
        paths = list_images(args.check_images)[:16]
        real = np.stack([read_image(p) for p in paths]) if paths else None
    if args.onnx:
        parity = write_onnx(model, args.onnx, args.exporter, real)
        print(f"wrote {args.onnx} ({args.exporter} exporter, opset {EXPORTERS[args.exporter]}, dynamic batch); "
              f"parity {parity.text()}")
    if args.torchscript:
        parity = write_torchscript(model, args.torchscript, real)
        print(f"wrote {args.torchscript} (TorchScript trace); parity {parity.text()}")
    return 0


def _stream_setup(args: argparse.Namespace):
    """Model, bank (checked against it), threshold and the labeller of video/camera."""
    from inference.video import Labeller

    if args.max_frames < 0:
        raise ConfigError(f"--max-frames {args.max_frames}: expected >= 0 (0: no limit)")
    rules = _rules(args, face="all")
    model = _load(args)
    bank = fb.load(args.bank)
    bank.check_model(model, args.bank, bank.tta)
    if not bank.names:
        raise fb.FacebankError(f"{args.bank}: the facebank holds no identities")
    threshold = resolve(args.model, model.kind, model.metadata, args.threshold)
    print(threshold.text())
    return Labeller(model, bank, threshold.cosine, rules)


def cmd_video(args: argparse.Namespace) -> int:
    from inference import video

    video.codec_for(args.output)
    labeller = _stream_setup(args)
    cap = video.open_capture(args.input, args.input)
    try:
        fps, size = video.stream_fps(cap), video.stream_size(cap)
        writer = video.open_writer(args.output, fps, size)
        try:
            summary = video.run_stream(cap, labeller, writer, args.max_frames, not args.no_progress)
        finally:
            writer.release()
    finally:
        cap.release()
    print(f"{args.input}: {summary.text()} -> {args.output} ({size[0]}x{size[1]}, {fps:g} fps, "
          f"{video.codec_for(args.output)})")
    return 0


def cmd_camera(args: argparse.Namespace) -> int:
    from inference import video

    if args.out:
        video.codec_for(args.out)
    labeller = _stream_setup(args)
    what = args.source or f"camera {args.camera}"
    cap = video.open_capture(args.source or args.camera, what)
    writer = None
    try:
        fps, size = video.stream_fps(cap), video.stream_size(cap)
        if args.out:
            writer = video.open_writer(args.out, fps, size)
        show = None if args.quiet else (lambda i, faces: print(video.frame_line(i, faces), flush=True))
        summary = video.run_stream(cap, labeller, writer, args.max_frames, not args.no_progress and args.quiet,
                                   per_frame=show)
    finally:
        if writer is not None:
            writer.release()
        cap.release()
    print(f"{what}: {summary.text()}" + (f" -> {args.out} ({size[0]}x{size[1]}, {fps:g} fps)" if args.out else ""))
    return 0


COMMANDS = {"embed": cmd_embed, "facebank": cmd_facebank, "identify": cmd_identify, "verify": cmd_verify,
            "export": cmd_export, "video": cmd_video, "camera": cmd_camera}


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except user_errors() as exc:
        fail(PROG, exc)


if __name__ == "__main__":
    sys.exit(main())
