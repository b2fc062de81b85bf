"""data/ijb.py on hand-written release folders: exact arrays, and one file:line error per defect."""

import os

import numpy as np
import pytest

from data.ijb import TARGETS, IJBFormatError, check_known, find_ijb, read_faces, read_pairs, read_template_subjects

PTS = ("1.jpg 10 20 30 20.5 20 30 12 40 28 40.25 0.9\n"
       "2.jpg 11 21 31 21 21 31 13 41 29 41 0.75\n"
       "3.jpg 1e1 2 3 4 5 6 7 8 9 10 1\n")
MID = "1.jpg 5 100\n2.jpg 5 101\n3.jpg 7 102\n"


def release(tmp_path, prefix="ijbc", pts=PTS, mid=MID, pairs="5 7 0\n5 5 1\n", galleries=("G1", "G2"),
            crlf=False, root="anything"):
    meta = tmp_path / root / "meta"
    meta.mkdir(parents=True)
    (tmp_path / root / "loose_crop").mkdir()
    files = {f"{prefix}_name_5pts_score.txt": pts, f"{prefix}_face_tid_mid.txt": mid,
             f"{prefix}_template_pair_label.txt": pairs,
             f"{prefix}_1N_probe_mixed.csv": "TEMPLATE_ID,SUBJECT_ID,FILENAME\n7,3,a.jpg\n"}
    for g in galleries:
        files[f"{prefix}_1N_gallery_{g}.csv"] = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n5,1,x.jpg\n"
    for name, text in files.items():
        if text is not None:
            (meta / name).write_bytes((text.replace("\n", "\r\n") if crlf else text).encode())
    return str(tmp_path / root)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_find_ijb_reads_the_target_from_file_names(tmp_path, target):
    spec = TARGETS[target]
    root = release(tmp_path, spec.prefix, galleries=spec.galleries)
    layout = find_ijb(root)
    assert layout.target == target
    assert layout.image_dir == os.path.join(root, "loose_crop")
    assert layout.faces.endswith(f"{spec.prefix}_name_5pts_score.txt")
    assert layout.media.endswith(f"{spec.prefix}_face_tid_mid.txt")
    assert layout.pairs.endswith(f"{spec.prefix}_template_pair_label.txt")
    assert sorted(layout.galleries) == sorted(spec.galleries)
    assert layout.probe.endswith(f"{spec.prefix}_1N_probe_mixed.csv")
    assert find_ijb(os.path.join(root, "meta")).root == root  # the meta folder itself is accepted


def test_find_ijb_optional_files_absent(tmp_path):
    layout = find_ijb(release(tmp_path, pairs=None, galleries=()))
    assert layout.pairs is None and layout.galleries == {} and layout.probe.endswith("probe_mixed.csv")


def test_find_ijb_missing_meta_folder(tmp_path):
    (tmp_path / "x" / "loose_crop").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no meta/ folder"):
        find_ijb(str(tmp_path / "x"))


def test_find_ijb_missing_5pts_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="ijbc_name_5pts_score.txt: missing"):
        find_ijb(release(tmp_path, pts=None))


def test_find_ijb_two_targets_is_ambiguous(tmp_path):
    root = release(tmp_path)
    (tmp_path / "anything" / "meta" / "ijbb_face_tid_mid.txt").write_text(MID)
    with pytest.raises(IJBFormatError, match="IJBB and IJBC"):
        find_ijb(root)


def test_read_faces_exact_with_crlf_and_trailing_blank_line(tmp_path):
    layout = find_ijb(release(tmp_path, pts=PTS + "\n", mid=MID + "\n\n", crlf=True))
    faces = read_faces(layout)
    assert faces.names.tolist() == ["1.jpg", "2.jpg", "3.jpg"]
    assert faces.landmarks.dtype == np.float32 and faces.landmarks.shape == (3, 5, 2)
    expected = np.array([[float(v) for v in line.split()[1:11]] for line in PTS.splitlines()], np.float32)
    np.testing.assert_array_equal(faces.landmarks.reshape(3, 10), expected)
    assert faces.landmarks[0, 1].tolist() == [30.0, 20.5]  # x, y pairs in file order
    np.testing.assert_array_equal(faces.faceness, np.array([0.9, 0.75, 1.0], np.float32))
    assert faces.templates.dtype == np.int64 and faces.templates.tolist() == [5, 5, 7]
    assert faces.medias.tolist() == [100, 101, 102]
    assert len(faces.key) == 64


def test_faces_key_follows_the_bytes(tmp_path):
    a = read_faces(find_ijb(release(tmp_path / "a")))
    b = read_faces(find_ijb(release(tmp_path / "b", root="other")))
    c = read_faces(find_ijb(release(tmp_path / "c", mid=MID.replace("7 102", "7 103"))))
    assert a.key == b.key != c.key


@pytest.mark.parametrize("pts, mid, where, what", [
    (PTS + "4.jpg 1 2 3 4 5 6 7 8 9 10 1\n", MID, "ijbc_name_5pts_score.txt:4:", "4 faces"),
    (PTS, MID.replace("2.jpg 5 101", "2.jpg 5"), "ijbc_face_tid_mid.txt:2:", "2 fields"),
    (PTS.replace(" 0.75", ""), MID, "ijbc_name_5pts_score.txt:2:", "11 fields"),
    (PTS.replace("31 21 21", "31 abc 21"), MID, "ijbc_name_5pts_score.txt:2:", "'abc' is not a finite"),
    (PTS.replace("31 21 21", "31 nan 21"), MID, "ijbc_name_5pts_score.txt:2:", "'nan' is not a finite"),
    (PTS.replace(" 1\n", " inf\n"), MID, "ijbc_name_5pts_score.txt:3:", "'inf' is not a finite"),
    (PTS, MID.replace("3.jpg", "9.jpg"), "ijbc_face_tid_mid.txt:3:", "'9.jpg', but"),
    (PTS, MID.replace("7 102", "7.5 102"), "ijbc_face_tid_mid.txt:3:", "template id '7.5' is not an integer"),
    (PTS, MID.replace("5 101", "5 x1"), "ijbc_face_tid_mid.txt:2:", "media id 'x1' is not an integer"),
    (PTS, "\n \n", "ijbc_face_tid_mid.txt:1:", "empty file"),
])
def test_read_faces_errors_name_file_and_line(tmp_path, pts, mid, where, what):
    layout = find_ijb(release(tmp_path, pts=pts, mid=mid))
    with pytest.raises(IJBFormatError) as err:
        read_faces(layout)
    msg = str(err.value)
    assert "\n" not in msg and where in msg and what in msg, msg


def test_read_pairs_exact(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"171707 187569 0\r\n\r\n5 5 1\r\n9\t3 0\r\n\r\n")
    t1, t2, label = read_pairs(str(path))
    assert t1.dtype == np.int64 and t1.tolist() == [171707, 5, 9]
    assert t2.tolist() == [187569, 5, 3]
    assert label.dtype == np.int8 and label.tolist() == [0, 1, 0]


@pytest.mark.parametrize("text, line, what", [
    ("1 2 0\n\n3 4\n", 3, "2 fields"),
    ("1 2 0\n3 4 2\n", 2, "label 2"),
    ("1 2 0\n3 4 1.0\n", 2, "three integers"),
    ("1 2 0 9\n3\n", 2, "1 fields (expected at least 3"),  # extra columns are fine (tests/test_ijb_variants.py)
    ("", 1, "empty file"),
])
def test_read_pairs_errors(tmp_path, text, line, what):
    path = tmp_path / "p.txt"
    path.write_text(text)
    with pytest.raises(IJBFormatError) as err:
        read_pairs(str(path))
    assert f"p.txt:{line}: " in str(err.value) and what in str(err.value), str(err.value)


def test_read_template_subjects_extra_columns_crlf(tmp_path):
    path = tmp_path / "g.csv"
    path.write_bytes(b"TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID\r\n11,1,img/1.jpg,3\r\n"
                     b"11,1,\"a,b.jpg\",4\r\n12,2,x.jpg,5\r\n\r\n")
    tids, sids = read_template_subjects(str(path))
    assert tids.tolist() == [11, 11, 12] and sids.tolist() == [1, 1, 2]


def test_template_with_two_subjects_names_both_lines(tmp_path):
    path = tmp_path / "g.csv"
    path.write_text("TEMPLATE_ID,SUBJECT_ID\n11,1\n12,2\n\n11,1\n12,3\n")
    with pytest.raises(IJBFormatError) as err:
        read_template_subjects(str(path))
    assert "g.csv:6: template 12 has subject 3, but line 3 gives it subject 2" in str(err.value)


def test_bad_csv_row_named(tmp_path):
    path = tmp_path / "g.csv"
    path.write_text("TEMPLATE_ID,SUBJECT_ID\n11,1\n12,x\n")
    with pytest.raises(IJBFormatError, match=r"g.csv:3: 'x' is not an integer"):
        read_template_subjects(str(path))


def test_check_known_names_the_first_unknown_template():
    check_known(np.array([5, 7]), np.array([7, 5, 5]), "p.txt")
    with pytest.raises(IJBFormatError, match=r"^p.txt:4: template 9 has no face in faces.txt$"):
        check_known(np.array([5, 7]), np.array([7, 5, 9, 8]), "p.txt", first_line=2, faces_file="faces.txt")
