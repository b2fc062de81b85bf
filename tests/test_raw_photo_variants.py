"""Raw photos written by other encoders, through `infer.py embed --detect` and `prepare_data.py align --detect`.

The contract: a photo that decodes to the upright RGB original (EXIF orientation 2-8 applied, 16-bit,
RGBA, palette, WebP, a PNG named .jpg, spaces and non-ASCII in the name) gives the original's
embedding and crop exactly when the encoding is lossless, and nearly when it is JPEG; anything
else (empty, truncated, a header claiming 10^10 pixels, a text file) is one line naming the file,
counted, never a traceback. The reference is the upright PNG's own result, and each variant's
pixels are first checked against Pillow's decoding with EXIF applied by hand.
"""

import os
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import backbones
import infer
import prepare_data
from backbones.weights import save_backbone
from data.imageformat import encoded_dimensions, oversize
from detection.align import ARCFACE_112
from prepare.synth.dataset import identity_traits
from prepare.synth.render import render_face
from tests.cli_helpers import script_error

INVERSE = {2: Image.FLIP_LEFT_RIGHT, 3: Image.ROTATE_180, 4: Image.FLIP_TOP_BOTTOM, 5: Image.TRANSPOSE,
           6: Image.ROTATE_90, 7: Image.TRANSVERSE, 8: Image.ROTATE_270}
LOSSLESS = ["exif3.png", "exif6.png", "exif7.png", "exif8.png", "png16.png", "rgba.png", "palette_free.webp",
            "png named.jpg", "fäce 名前.png"]
LOSSY = ["exif6.jpg", "progressive.jpg", "cmyk.jpg"]
JUNK = {"empty.jpg": "empty file", "trunc.jpg": "not a decodable image",
        "huge.png": "claims 100000x100000 pixels", "readme.txt": "not an image"}


def scene() -> np.ndarray:
    """A 300x300 RGB photo with one synthetic face MTCNN finds (identity 4, as tests/test_detect.py)."""
    face = render_face(identity_traits(0, 4), np.random.default_rng(4), difficulty=0.0)
    m = np.array([[1.5, 0.0, 60.0], [0.0, 1.5, 50.0]])
    return cv2.warpAffine(face, m, (300, 300), flags=cv2.INTER_LINEAR, borderValue=(90, 110, 130))


def huge_png() -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def exif(k):
    e = Image.Exif()
    e[0x0112] = k
    return e


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rgb = scene()
    im = Image.fromarray(rgb)
    im.save(folder / "upright.png")
    for k in (3, 6, 7, 8):
        im.transpose(INVERSE[k]).save(folder / f"exif{k}.png", exif=exif(k))
    im.transpose(INVERSE[6]).save(folder / "exif6.jpg", quality=95, exif=exif(6))
    im.save(folder / "progressive.jpg", quality=95, progressive=True)
    im.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    assert cv2.imwrite(str(folder / "png16.png"), (rgb.astype(np.uint16) * 257)[..., ::-1])
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), "RGBA").save(folder / "rgba.png")
    im.save(folder / "palette_free.webp", lossless=True)
    im.save(folder / "png named.jpg", format="PNG")
    im.save(folder / "fäce 名前.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "trunc.jpg").write_bytes((folder / "progressive.jpg").read_bytes()[:400])
    (folder / "huge.png").write_bytes(huge_png())
    (folder / "readme.txt").write_text("not a photo\n")
    return folder, rgb


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    net = backbones.build("mobilefacenet", embedding_size=32)
    path = str(tmp_path_factory.mktemp("m") / "m.pt")
    save_backbone(path, net.state_dict(), "mobilefacenet", 32, "rgb")
    return path


def test_variants_decode_to_the_upright_original(photos):
    """Pillow (EXIF applied by ImageOps) is the independent decoder; lossless files are the original exactly."""
    folder, rgb = photos
    for name in LOSSLESS + LOSSY:
        path = folder / name
        if name == "png16.png":
            got = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[..., ::-1] // 257  # Pillow reads 16-bit RGB as 8
        else:
            with Image.open(path) as im:
                got = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        assert got.shape == rgb.shape, name
        err = np.abs(got.astype(int) - rgb).mean()
        assert err == 0 if name in LOSSLESS else err < 3, (name, err)


def test_infer_embed_detect_gives_the_originals_embedding(photos, model, tmp_path, capsys):
    folder, _ = photos
    out = str(tmp_path / "e.npy")
    assert infer.main(["embed", model, str(folder), "--detect", "--out", out, "--no-progress"]) == 1
    err = capsys.readouterr().err
    rows = np.load(out).astype(np.float64)
    paths = [os.path.basename(p) for p in open(out.replace(".npy", ".txt"), encoding="utf-8").read().splitlines()]
    assert sorted(paths) == sorted(["upright.png", *LOSSLESS, *LOSSY])
    ref = rows[paths.index("upright.png")]
    for name in LOSSLESS:
        np.testing.assert_allclose(rows[paths.index(name)], ref, atol=1e-6, err_msg=name)
    for name in LOSSY:
        assert rows[paths.index(name)] @ ref > 0.97, name
    lines = err.splitlines()
    for name, why in JUNK.items():
        if name == "readme.txt":
            assert any(line.startswith("note: 1 file(s)") and name in line for line in lines), err
        else:
            hit = [line for line in lines if f"bad image: {folder / name}: " in line]
            assert len(hit) == 1 and why in hit[0] and hit[0].count(str(folder / name)) == 1, (name, err)
    assert "3 image(s) could not be used" in err and "Traceback" not in err


def test_align_detect_writes_the_originals_crop(photos, tmp_path, capsys):
    folder, _ = photos
    out = tmp_path / "aligned"
    assert prepare_data.main(["align", str(folder), str(out), "--detect", "--no-progress"]) == 1
    io = capsys.readouterr()
    ref = cv2.imread(str(out / "upright.png"))
    for name in [n for n in LOSSLESS if n.endswith(".png")]:  # PNG crops: lossless, comparable exactly
        assert np.array_equal(cv2.imread(str(out / name)), ref), name
    assert "4 skipped" in io.out, io.out
    for name, why in JUNK.items():
        assert any(str(folder / name) in line and why in line for line in io.err.splitlines()), (name, io.err)


@pytest.mark.parametrize("kind, size", [("lossless", (37, 5001)), ("lossy", (333, 16383)), ("extended", (1, 16384))])
def test_webp_header_dimensions(tmp_path, kind, size):
    """WebP's three headers read without decoding (height, width); a 16384^2 claim is over the limit."""
    h, w = size
    if kind == "lossless":  # VP8L: signature 0x2f, then 14-bit width-1 and height-1
        body = b"VP8L" + struct.pack("<I", 5) + b"\x2f" + struct.pack("<I", (w - 1) | ((h - 1) << 14))
    elif kind == "lossy":  # VP8: frame tag, start code 9d 01 2a, 14-bit width and height
        body = b"VP8 " + struct.pack("<I", 10) + b"\0\0\0\x9d\x01\x2a" + struct.pack("<HH", w, h)
    else:  # VP8X: flags, 3 reserved bytes, 24-bit canvas width-1 and height-1
        body = (b"VP8X" + struct.pack("<I", 10) + b"\0" * 4 + (w - 1).to_bytes(3, "little")
                + (h - 1).to_bytes(3, "little"))
    data = b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body
    assert encoded_dimensions(data) == (h, w)
    assert (oversize(data) is not None) == (h * w > 1 << 26)


def test_facebank_notes_non_images_and_video_refuses_a_folder(tmp_path, model, capsys):
    ann = tmp_path / "bank" / "ann"
    ann.mkdir(parents=True)
    Image.fromarray(scene()[94:206, 94:206]).save(ann / "a face.png")
    (ann / "notes.txt").write_text("who is this\n")
    bank = str(tmp_path / "bank.npz")
    assert infer.main(["facebank", "build", model, str(tmp_path / "bank"), "--out", bank, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "note: 1 file(s)" in err and str(ann / "notes.txt") in err, err
    script_error(capsys, infer.main, ["video", model, bank, str(tmp_path / "bank"), str(tmp_path / "o.mp4")],
                 "infer.py: error:", "a folder, not a video file")


def test_landmarks_file_from_a_windows_editor(photos, tmp_path, capsys):
    """BOM, CRLF, a lone CR, commas, a path with spaces and non-ASCII: every line is used."""
    folder, _ = photos
    pts = " ".join(str(v) for v in (ARCFACE_112 * 1.5 + [94, 94]).ravel().round(2))
    text = (f"\ufeffupright.png {pts}\r\npng named.jpg,{pts.replace(' ', ',')}\r\nfäce 名前.png {pts}\r"
            f"exif6.png {pts}\n")
    lm = tmp_path / "lm.txt"
    lm.write_bytes(text.encode("utf-8"))
    out = tmp_path / "aligned"
    prepare_data.main(["align", str(folder), str(out), "--landmarks", str(lm), "--no-progress", "--workers", "0"])
    io = capsys.readouterr()
    assert "4 images aligned" in io.out, (io.out, io.err)
    ref = cv2.imread(str(out / "upright.png"))
    for name in ("fäce 名前.png", "exif6.png"):  # same pixels after EXIF: the same crop
        assert np.array_equal(cv2.imread(str(out / name)), ref), name


def test_make_bin_and_unpack_refuse_a_huge_header_in_one_line(tmp_path):
    from prepare.pairs import PairsError, image_payload
    from prepare.unpack import reencode_image

    (tmp_path / "huge.png").write_bytes(huge_png())
    with pytest.raises(PairsError, match=r"huge.png: its header claims 100000x100000 pixels.*refused undecoded$"):
        image_payload(str(tmp_path / "huge.png"))
    assert reencode_image(huge_png(), "jpg") is None  # unpack --format: counted as undecodable, no cv2.error
