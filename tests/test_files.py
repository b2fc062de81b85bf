"""utils/files.py: only regular files are read, never more than the cap, never blocking."""

import os
import threading

import pytest

from utils.files import UnreadableFileError, check_regular, max_image_bytes, read_regular


def test_reads_a_regular_file(tmp_path):
    p = tmp_path / "a.jpg"
    p.write_bytes(b"\xff\xd8abc")
    assert read_regular(str(p), "image", 10) == b"\xff\xd8abc"
    assert check_regular(str(p)) == 5


def test_over_the_cap_is_refused_unread(tmp_path):
    p = tmp_path / "big.jpg"
    p.write_bytes(b"x" * 11)
    with pytest.raises(UnreadableFileError, match="big.jpg.*limit"):
        read_regular(str(p), "image", 10)


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    out = []
    t = threading.Thread(target=lambda: out.append(pytest.raises(UnreadableFileError, read_regular, str(fifo))))
    t.start()
    t.join(timeout=5)
    assert not t.is_alive(), "read_regular blocked on a FIFO"
    assert "FIFO" in str(out[0].value)


def test_device_and_directory_are_refused(tmp_path):
    with pytest.raises(UnreadableFileError, match="device"):
        check_regular("/dev/zero", "image")
    with pytest.raises(UnreadableFileError, match="directory"):
        check_regular(str(tmp_path), ".bin file")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        check_regular(str(tmp_path / "nope.bin"), ".bin file")


@pytest.mark.parametrize("raw", ["abc", "0", "-3", "inf", "nan"])
def test_bad_cap_in_the_environment_is_one_line(monkeypatch, raw):
    monkeypatch.setenv("FACETRAIN_MAX_IMAGE_MB", raw)
    with pytest.raises(UnreadableFileError, match="FACETRAIN_MAX_IMAGE_MB"):
        max_image_bytes()


def test_cap_from_the_environment(monkeypatch):
    monkeypatch.setenv("FACETRAIN_MAX_IMAGE_MB", "0.5")
    assert max_image_bytes() == 512 * 1024
    monkeypatch.delenv("FACETRAIN_MAX_IMAGE_MB")
    assert max_image_bytes() == 64 << 20
