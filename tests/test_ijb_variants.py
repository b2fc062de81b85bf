"""IJB releases as other people's tools write them: folder layouts, meta and CSV variants, loose crops.

Every expected array is written out by hand here; the loose crops are checked against a longhand
reading (cv2.imread, as the reference, or Pillow with EXIF applied) and a longhand float64 Umeyama fit.
"""

import os
import struct

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from data.ijb import IJBFormatError, find_ijb, read_faces, read_pairs, read_template_subjects
from detection.align import ARCFACE_112
from evaluation.ijb import load_ijb
from evaluation.ijb_faces import align_one

PTS = "1.jpg 1 2 3 4 5 6 7 8 9 10 0.9\n2.jpg 1 2 3 4 5 6 7 8 9 10 0.8\n3.jpg 1 2 3 4 5 6 7 8 9 10 0.7\n"
MID = "1.jpg 1 10\n2.jpg 2 20\n3.jpg 3 30\n"
PAIRS = "1 2 1\n1 3 0\n"
CSV = {"G1": "TEMPLATE_ID,SUBJECT_ID,FILENAME\n1,100,a.jpg\n", "G2": "TEMPLATE_ID,SUBJECT_ID,FILENAME\n2,200,b.jpg\n",
       "probe_mixed": "TEMPLATE_ID,SUBJECT_ID,FILENAME\n3,100,c.jpg\n"}


def write_release(root, prefix="ijbc", galleries=("G1", "G2"), files=None):
    """A release folder with the meta files above; ``files`` overrides {meta file name: bytes or str}."""
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    os.makedirs(os.path.join(root, "loose_crop"), exist_ok=True)
    names = {f"{prefix}_name_5pts_score.txt": PTS, f"{prefix}_face_tid_mid.txt": MID,
             f"{prefix}_template_pair_label.txt": PAIRS, f"{prefix}_1N_probe_mixed.csv": CSV["probe_mixed"],
             f"{prefix}_1N_gallery_{galleries[0]}.csv": CSV["G1"], f"{prefix}_1N_gallery_{galleries[1]}.csv": CSV["G2"]}
    names.update(files or {})
    for name, text in names.items():
        with open(os.path.join(root, "meta", name), "wb") as fh:
            fh.write(text if isinstance(text, bytes) else text.encode())
    return root


def summary(path):
    d = load_ijb(path, "1:1,1:N")
    return (d.target, d.faces.names.tolist(), d.faces.templates.tolist(), d.faces.medias.tolist(),
            d.pairs[0].tolist(), d.pairs[1].tolist(), d.pairs[2].tolist(),
            {g: (t.tolist(), s.tolist()) for g, (t, s) in d.galleries.items()},
            (d.probe[0].tolist(), d.probe[1].tolist()))


EXPECTED = ("IJBC", ["1.jpg", "2.jpg", "3.jpg"], [1, 2, 3], [10, 20, 30], [1, 1], [2, 3], [1, 0],
            {"G1": ([1], [100]), "G2": ([2], [200])}, ([3], [100]))


def test_ijb_release_folder_with_one_target_is_that_target(tmp_path):
    write_release(str(tmp_path / "IJB_release" / "IJBC"))
    assert summary(str(tmp_path / "IJB_release")) == EXPECTED
    assert find_ijb(str(tmp_path / "IJB_release")).root == str(tmp_path / "IJB_release" / "IJBC")


def test_ijb_release_folder_with_two_targets_is_one_line(tmp_path):
    write_release(str(tmp_path / "IJB_release" / "IJBC"))
    write_release(str(tmp_path / "IJB_release" / "IJBB"), "ijbb", ("S1", "S2"))
    with pytest.raises(IJBFormatError) as err:
        find_ijb(str(tmp_path / "IJB_release"))
    msg = str(err.value)
    assert "\n" not in msg and "2 IJB releases (IJBB, IJBC)" in msg and "IJB_release/IJBB" in msg, msg


def test_meta_folder_itself_and_real_release_extras(tmp_path):
    """The real package also holds _retina / _box_ variants of the 5pts file: not ours to read."""
    root = write_release(str(tmp_path / "IJBC"), files={"ijbc_name_5pts_score_retina.txt": "junk\n",
                                                       "ijbc_name_box_score_5pts.txt": "junk junk\n"})
    assert summary(os.path.join(root, "meta")) == EXPECTED


def test_meta_names_in_another_case(tmp_path):
    """A copy through a case-insensitive file system may upper-case the names; the reference's are lower."""
    root = str(tmp_path / "IJBC")
    write_release(root)
    for name in os.listdir(os.path.join(root, "meta")):
        os.rename(os.path.join(root, "meta", name), os.path.join(root, "meta", name.replace("ijbc", "IJBC")))
    assert summary(root) == EXPECTED


@pytest.mark.parametrize("csv", [
    "\ufeffTEMPLATE_ID,SUBJECT_ID,FILENAME\n1,100,a.jpg\n",  # BOM (Excel's "CSV UTF-8")
    "template_id,subject_id\r\n1,100\r\n",  # lower case, CRLF
    "TEMPLATE_ID,SUBJECT_ID\r1,100\r",  # classic Mac line ends
    "TEMPLATE_ID , SUBJECT_ID , FILENAME\n 1 , 100 , a.jpg\n",  # spaces around the commas
    '"TEMPLATE_ID","SUBJECT_ID","FILENAME"\n"1","100","a b.jpg"\n',  # every cell quoted
    ",TEMPLATE_ID,SUBJECT_ID\n0,1,100\n",  # pandas' to_csv index column in front
    "SUBJECT_ID,FILENAME,TEMPLATE_ID,SIGHTING_ID\n100,\"x,y.jpg\",1,7\n",  # columns in another order
    "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FRAME,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT\n1,100,a.jpg,5,,1,2,3,4\n",
    "TEMPLATE_ID,SUBJECT_ID\n1,100",  # no final newline
])
def test_gallery_csv_variants(tmp_path, csv):
    root = write_release(str(tmp_path / "IJBC"), files={"ijbc_1N_gallery_G1.csv": csv})
    assert summary(root) == EXPECTED


def test_headerless_csv_columns_are_0_and_1_as_the_reference(tmp_path):
    path = tmp_path / "g.csv"
    path.write_text("TID,SID\n1,100\n2,200\n")  # names we do not know: columns 0 and 1, as ijb_1n.py
    assert [a.tolist() for a in read_template_subjects(str(path))] == [[1, 2], [100, 200]]


@pytest.mark.parametrize("mid, pairs", [
    ("1.jpg 1 10 x\n2.jpg 2 20 y\n3.jpg 3 30 z\n", "1 2 1 a\n1 3 0 b\n"),  # extra columns: ignored
    ("\ufeff1.jpg 1 10\n2.jpg 2 20\n3.jpg 3 30\n", "\ufeff1 2 1\n1 3 0\n"),  # UTF-8 BOM
    ("1.jpg 1 10\r2.jpg 2 20\r3.jpg 3 30\r", "1 2 1\r1 3 0\r"),  # lone CR line ends
    ("1.jpg\t1\t10\r\n 2.jpg  2  20 \r\n\r\n3.jpg 3 30", "1\t2\t1\r\n\r\n1 3 0"),  # tabs, runs of spaces, CRLF
])
def test_whitespace_meta_variants(tmp_path, mid, pairs):
    root = write_release(str(tmp_path / "IJBC"), files={"ijbc_face_tid_mid.txt": mid,
                                                       "ijbc_template_pair_label.txt": pairs})
    assert summary(root) == EXPECTED


def test_lone_cr_and_bom_in_the_5pts_file(tmp_path):
    root = write_release(str(tmp_path / "IJBC"), files={"ijbc_name_5pts_score.txt": "\ufeff" + PTS.replace("\n", "\r")})
    faces = read_faces(find_ijb(root))
    assert faces.names.tolist() == ["1.jpg", "2.jpg", "3.jpg"]
    assert faces.faceness.tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert faces.landmarks[2].ravel().tolist() == list(range(1, 11))


def test_line_numbers_count_lone_cr_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"1 2 1\r\r3 4 x\r")
    with pytest.raises(IJBFormatError, match=r"p.txt:3: '3 4 x'"):
        read_pairs(str(path))


def test_utf16_meta_file_is_one_line(tmp_path):
    root = write_release(str(tmp_path / "IJBC"), files={"ijbc_1N_gallery_G1.csv": CSV["G1"].encode("utf-16")})
    with pytest.raises(IJBFormatError, match=r"ijbc_1N_gallery_G1.csv:1: UTF-16 text"):
        load_ijb(root, "1:N")


# ---- loose crops written by other encoders --------------------------------------------------------------

def photo(h=150, w=130):
    """An asymmetric smooth RGB image (any flip or rotation of it is visibly different)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + 2 * y) * 255 // (w + 2 * h - 3)], -1)
    return img.astype(np.uint8)


POINTS = (ARCFACE_112 * 0.9 + [12.0, 20.0]).astype(np.float32)  # a face inside the photo


def umeyama(src, dst):
    """2x3 similarity taking src to dst (least squares, Umeyama 1991), float64, written out."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    s0, d0 = src - ms, dst - md
    cov = d0.T @ s0 / len(src)
    u, d, vt = np.linalg.svd(cov)
    sign = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt))])
    r = u @ sign @ vt
    scale = np.trace(np.diag(d) @ sign) / (s0 ** 2).sum(1).mean()
    return np.hstack([scale * r, (md - scale * r @ ms)[:, None]])


def expected_crop(rgb):
    m = umeyama(POINTS, ARCFACE_112)
    return cv2.warpAffine(rgb, m, (112, 112), flags=cv2.INTER_LINEAR, borderValue=0)


ORIENT_INVERSE = {2: Image.FLIP_LEFT_RIGHT, 3: Image.ROTATE_180, 4: Image.FLIP_TOP_BOTTOM, 5: Image.TRANSPOSE,
                  6: Image.ROTATE_90, 7: Image.TRANSVERSE, 8: Image.ROTATE_270}


def write_variant(path, kind):
    """Encode photo() as `kind`; returns the RGB the file should decode to (None: read it with cv2.imread)."""
    rgb = photo()
    im = Image.fromarray(rgb)
    if kind.startswith("exif"):  # pixels stored turned, the EXIF tag says how to turn them back
        k = int(kind[4:])
        exif = Image.Exif()
        exif[0x0112] = k
        (im if k == 1 else im.transpose(ORIENT_INVERSE[k])).save(path, "JPEG", quality=95, exif=exif)
    elif kind == "progressive":
        im.save(path, "JPEG", quality=95, progressive=True)
    elif kind == "png_named_jpg":
        im.save(path, "PNG")
        return rgb
    elif kind == "png16":
        assert cv2.imwrite(path.replace(".jpg", ".png"), (rgb.astype(np.uint16) * 257)[..., ::-1])
        os.rename(path.replace(".jpg", ".png"), path)
        return rgb  # 16-bit x 257 -> 8-bit is exact
    elif kind == "rgba":
        Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), "RGBA").save(path, "PNG")
        return rgb
    elif kind == "grey":
        im.convert("L").save(path, "PNG")
        g = np.asarray(im.convert("L"))
        return np.dstack([g, g, g])
    elif kind == "cmyk":
        im.convert("CMYK").save(path, "JPEG", quality=95)
    elif kind == "webp":
        im.save(path, "WEBP", lossless=True)
        return rgb
    return None


@pytest.mark.parametrize("kind", [f"exif{k}" for k in range(1, 9)] + [
    "progressive", "png_named_jpg", "png16", "rgba", "grey", "cmyk", "webp"])
def test_loose_crop_variants_align_as_the_reference(tmp_path, kind):
    path = str(tmp_path / "1.jpg")
    exact = write_variant(path, kind)
    got = align_one(path, POINTS)
    assert got is not None and got.shape == (112, 112, 3) and got.dtype == np.uint8
    # the reference: cv2.imread (BGR, EXIF applied), then the warp, then BGR -> RGB
    ref = cv2.imread(path)
    assert np.abs(got.astype(int) - expected_crop(ref[..., ::-1].copy())).max() <= 1, kind
    if exact is not None:  # lossless: the same crop as the upright RGB original's
        assert np.abs(got.astype(int) - expected_crop(exact)).max() <= 1, kind
    else:  # lossy JPEG: Pillow (EXIF applied by hand) agrees with the decoder the reference uses
        with Image.open(path) as im:
            upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        assert upright.shape == photo().shape
        assert np.abs(got.astype(int) - expected_crop(upright)).mean() < 2.0, kind


def test_oversized_or_truncated_loose_crop_is_not_ok(tmp_path):
    ok = str(tmp_path / "ok.jpg")
    Image.fromarray(photo()).save(ok, "JPEG")
    data = bytearray(open(ok, "rb").read())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)  # header claims 3.6 Gpx
    (tmp_path / "huge.jpg").write_bytes(bytes(data))
    (tmp_path / "trunc.jpg").write_bytes(open(ok, "rb").read()[:200])
    assert align_one(ok, POINTS) is not None
    assert align_one(str(tmp_path / "huge.jpg"), POINTS) is None
    assert align_one(str(tmp_path / "trunc.jpg"), POINTS) is None


@pytest.mark.parametrize("text, what", [
    ("SUBJECT_ID,TEMPLATE_ID\n100,1\n100,x\n", "g.csv:3: 'x' is not an integer"),
    ("a,SUBJECT_ID,TEMPLATE_ID\n0,100,1\n0,100\n", "g.csv:3: 2 field(s) (expected at least 3: template id in column 2"),
])
def test_bad_row_named_when_columns_come_from_the_header(tmp_path, text, what):
    path = tmp_path / "g.csv"
    path.write_text(text)
    with pytest.raises(IJBFormatError) as err:
        read_template_subjects(str(path))
    assert what in str(err.value), str(err.value)
