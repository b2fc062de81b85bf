"""5-point alignment: the similarity fit against float64 references, the warp, and `prepare_data.py align`."""

import math
import os

import cv2
import numpy as np
import pytest

import prepare_data
from prepare.align import align_face, parse_landmarks, similarity_transform, template
from tests.cli_helpers import one_line_error

# The ArcFace template as published (FORMATS.md), and insightface's 96-wide one (face_preprocess.py)
T112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]])
T96 = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655], [62.7299, 92.2041]])


def _known(deg=20.0, scale=1.7, t=(31.0, -12.5)) -> np.ndarray:
    """3x3 homogeneous matrix of a rotation by `deg` degrees, uniform `scale`, then translation `t`."""
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[scale * c, -scale * s, t[0]], [scale * s, scale * c, t[1]], [0.0, 0.0, 1.0]])


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:2, :2].T + m[:2, 2]


def _lstsq_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Reference: the 4 unknowns a, b, tx, ty of [a -b tx; b a ty], solved by numpy.linalg.lstsq."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1.0, 0.0], [y, x, 0.0, 1.0]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def test_template_maps_onto_itself_with_the_identity():
    np.testing.assert_allclose(similarity_transform(T112, T112), [[1, 0, 0], [0, 1, 0]], atol=1e-9)


def test_known_similarity_is_undone():
    known = _known()
    moved = _apply(known, T112)
    m = similarity_transform(moved, T112)
    assert np.abs(_apply(m, moved) - T112).max() < 0.5
    np.testing.assert_allclose(m, np.linalg.inv(known)[:2], atol=1e-6)


def test_noisy_points_match_the_lstsq_reference():
    rng = np.random.default_rng(3)
    moved = _apply(_known(-35.0, 0.6, (5.0, 40.0)), T112) + rng.normal(0, 2.0, (5, 2))
    np.testing.assert_allclose(similarity_transform(moved, T112), _lstsq_similarity(moved, T112), atol=1e-9)


def test_a_reflection_is_never_produced():
    rng = np.random.default_rng(4)
    mirrored = T112 * [-1.0, 1.0]  # the best similarity-with-reflection would be exact here
    for src in [mirrored] + [rng.normal(0, 50, (5, 2)) for _ in range(20)]:
        m = similarity_transform(src, T112)
        a, b = m[0, 0], m[1, 0]
        np.testing.assert_allclose(m[:, :2], [[a, -b], [b, a]], atol=1e-9)  # rotation x scale, det = a^2 + b^2
        np.testing.assert_allclose(m, _lstsq_similarity(src, T112), atol=1e-7)


def test_warp_puts_a_landmark_dot_on_its_template_point():
    known = _known(15.0, 2.0, (60.0, 20.0))
    lms = _apply(known, T112)
    img = np.zeros((320, 320), np.uint8)
    nose = np.round(lms[2]).astype(int)  # a bright 5x5 block centred on a pixel
    img[nose[1] - 2:nose[1] + 3, nose[0] - 2:nose[0] + 3] = 255
    lms[2] = nose  # the landmark at the block's centre
    out = align_face(img, lms).astype(np.float64)
    assert out.shape == (112, 112)
    ys, xs = np.mgrid[0:112, 0:112]
    centroid = np.array([(out * xs).sum(), (out * ys).sum()]) / out.sum()
    assert np.linalg.norm(centroid - T112[2]) < 1.0


def test_96_wide_template_is_insightfaces():
    np.testing.assert_allclose(template((112, 96)), T96, atol=1e-12)
    assert align_face(np.zeros((200, 200, 3), np.uint8), _apply(_known(), T112), (112, 96)).shape == (112, 96, 3)


def test_landmark_lines_whitespace_comma_and_spaces_in_paths(tmp_path):
    f = tmp_path / "lm.txt"
    f.write_text("# comment\n\na/1.jpg 1 2 3 4 5 6 7 8 9 10\nb/my face.png,1,2,3,4,5,6,7,8,9,10\n"
                 "c/3.jpg 1 2 3 4 5 6 7 8 9\nd/4.jpg 1 2 3 4 5 6 7 8 9 x\n")
    entries, bad = parse_landmarks(str(f))
    assert [(e.line, e.path) for e in entries] == [(3, os.path.join("a", "1.jpg")),
                                                   (4, os.path.join("b", "my face.png"))]
    np.testing.assert_array_equal(entries[1].points, np.arange(1, 11).reshape(5, 2))
    assert [b.line for b in bad] == [5, 6]


@pytest.fixture()
def src(tmp_path):
    """SRC with two class folders, one image each: a face-sized image with its landmarks on the template x 2."""
    root = tmp_path / "src"
    for rel in ("alice/1.jpg", "bob/2.jpg"):
        os.makedirs(root / os.path.dirname(rel), exist_ok=True)
        img = np.full((224, 224, 3), 128, np.uint8)
        cv2.imwrite(str(root / rel), img)
    return root


def _lm_line(rel: str, pts: np.ndarray) -> str:
    return rel + " " + " ".join(f"{v:.4f}" for v in pts.ravel()) + "\n"


def test_cli_writes_good_images_and_exits_1_on_a_bad_line(src, tmp_path, capsys):
    lm = tmp_path / "lm.txt"
    lm.write_text(_lm_line("alice/1.jpg", T112 * 2) + "bob/2.jpg 1 2 3 4 5 6 7 8 9\n")
    out = tmp_path / "out"
    assert prepare_data.main(["align", str(src), str(out), "--landmarks", str(lm), "--no-progress"]) == 1
    written = cv2.imread(str(out / "alice" / "1.jpg"))
    assert written.shape == (112, 112, 3)
    assert not (out / "bob" / "2.jpg").exists()
    err = capsys.readouterr()
    assert f"{lm}:2:" in err.err and "1 skipped" in err.out


def test_cli_reports_missing_undecodable_and_unlisted_images(src, tmp_path, capsys):
    (src / "bob" / "3.jpg").write_bytes(b"not a jpeg")
    (src / "carol").mkdir()
    cv2.imwrite(str(src / "carol" / "4.png"), np.zeros((8, 8, 3), np.uint8))
    lm = tmp_path / "lm.txt"
    lm.write_text(_lm_line("alice/1.jpg", T112 * 2) + _lm_line("bob/2.jpg", T112 * 2)
                  + _lm_line("bob/3.jpg", T112) + _lm_line("dave/5.jpg", T112))
    out = tmp_path / "out"
    assert prepare_data.main(["align", str(src), str(out), "--landmarks", str(lm), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{lm}:3:" in err and "not a decodable image" in err
    assert f"{lm}:4:" in err and "no such file" in err
    assert os.path.join("carol", "4.png") in err and "no landmarks line" in err
    assert sorted(os.listdir(out)) == ["alice", "bob"] and os.listdir(out / "bob") == ["2.jpg"]


def test_cli_112x96(src, tmp_path):
    lm = tmp_path / "lm.txt"
    lm.write_text(_lm_line("alice/1.jpg", T112 * 2) + _lm_line("bob/2.jpg", T112 * 2))
    out = tmp_path / "out"
    assert prepare_data.main(["align", str(src), str(out), "--landmarks", str(lm), "--size", "112x96",
                              "--no-progress"]) == 0
    assert cv2.imread(str(out / "bob" / "2.jpg")).shape == (112, 96, 3)


def test_cli_missing_landmarks_file_is_one_line(src, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["align", str(src), str(tmp_path / "out"), "--landmarks", str(tmp_path / "nope.txt")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.txt" in err


def _landmarks(tmp_path, src, lines=None) -> str:
    lm = tmp_path / "lm.txt"
    pts = template() * 2.0
    lm.write_text(lines if lines is not None else _lm_line("alice/1.jpg", pts) + _lm_line("bob/2.jpg", pts))
    return str(lm)


@pytest.mark.parametrize("where", ["link_to_src", "inside_src", "src_inside_out"])
def test_out_resolving_onto_or_around_src_is_refused(src, tmp_path, capsys, where):
    before = {p: (src / p).read_bytes() for p in ("alice/1.jpg", "bob/2.jpg")}
    if where == "link_to_src":
        out = tmp_path / "link"
        os.symlink(src, out)
        needle = "OUT is SRC"
    elif where == "inside_src":
        out = src / "aligned"
        needle = "inside SRC"
    else:
        out = tmp_path
        needle = "inside OUT"
    one_line_error(capsys, ["align", str(src), str(out), "--landmarks", _landmarks(tmp_path, src),
                            "--no-progress"], str(out), needle)
    assert {p: (src / p).read_bytes() for p in before} == before


def test_huge_landmarks_are_a_bad_line_not_a_traceback(src, tmp_path, capsys):
    pts = template() * 2.0
    huge = "alice/1.jpg " + " ".join(["1e300"] * 10) + "\n"
    lm = _landmarks(tmp_path, src, huge + _lm_line("bob/2.jpg", pts))
    code = prepare_data.main(["align", str(src), str(tmp_path / "out"), "--landmarks", lm, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "lm.txt:1: landmark coordinate 1e+300 is beyond" in err
    assert os.path.isfile(tmp_path / "out" / "bob" / "2.jpg")


def test_fifo_where_an_image_is_listed_is_skipped_unread(src, tmp_path, capsys):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.remove(src / "alice" / "1.jpg")
    os.mkfifo(src / "alice" / "1.jpg")  # open() would block forever
    code = prepare_data.main(["align", str(src), str(tmp_path / "out"), "--landmarks", _landmarks(tmp_path, src),
                              "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "1.jpg: is a FIFO" in err
    assert os.path.isfile(tmp_path / "out" / "bob" / "2.jpg")
