"""The on-disk cache of decoded .bin sets: keyed by content, equal to a fresh decode, never trusted blindly."""

import os
import shutil

import numpy as np

from data.bins import decode_bin
from evaluation.cache import default_cache_dir, load_decoded
from utils.torchfile import sha256_file


def test_cache_hit_equals_fresh_decode_and_is_keyed_by_content(tiny_pack, tmp_path):
    src = os.path.join(tiny_pack, "lfw.bin")
    cache = str(tmp_path / "cache")
    first = load_decoded(src, cache_dir=cache)
    assert not first.cached and first.sha256 == sha256_file(src)
    renamed = str(tmp_path / "renamed.bin")  # same bytes under another name: still a hit
    shutil.copyfile(src, renamed)
    second = load_decoded(renamed, cache_dir=cache)
    assert second.cached
    images, issame = decode_bin(src)
    np.testing.assert_array_equal(np.asarray(second.images), images)
    np.testing.assert_array_equal(second.issame, issame)


def test_damaged_cache_entry_is_ignored_and_rewritten(tiny_pack, tmp_path):
    src = os.path.join(tiny_pack, "cfp_fp.bin")
    cache = str(tmp_path / "cache")
    load_decoded(src, cache_dir=cache)
    entry = next(p for p in (tmp_path / "cache" / "decoded").iterdir() if p.name.endswith(".images.npy"))
    entry.write_bytes(entry.read_bytes()[:200])  # truncated
    again = load_decoded(src, cache_dir=cache)
    assert not again.cached
    np.testing.assert_array_equal(again.images, decode_bin(src)[0])
    assert load_decoded(src, cache_dir=cache).cached  # rewritten whole


def test_cache_off_writes_nothing(tiny_pack, tmp_path, monkeypatch):
    monkeypatch.setenv("FACETRAIN_CACHE", "off")
    assert default_cache_dir() is None
    monkeypatch.setenv("HOME", str(tmp_path))
    out = load_decoded(os.path.join(tiny_pack, "lfw.bin"), cache_dir="default")
    assert not out.cached and not any(tmp_path.iterdir())


def test_tampered_entry_is_noted_ignored_and_rewritten(tiny_pack, tmp_path):
    """A flipped pixel byte keeps the .npy well-formed: only the recorded sha256 can tell."""
    src = os.path.join(tiny_pack, "lfw.bin")
    cache = str(tmp_path / "cache")
    load_decoded(src, cache_dir=cache)
    entry = next(p for p in (tmp_path / "cache" / "decoded").iterdir() if p.name.endswith(".images.npy"))
    raw = bytearray(entry.read_bytes())
    raw[-1000] ^= 0xFF
    entry.write_bytes(bytes(raw))
    notes = []
    again = load_decoded(src, cache_dir=cache, log=notes.append)
    assert not again.cached and len(notes) == 1
    assert notes[0].startswith("note: decode cache entry ") and "does not match the checksum" in notes[0]
    np.testing.assert_array_equal(again.images, decode_bin(src)[0])
    hit = load_decoded(src, cache_dir=cache, log=notes.append)
    assert hit.cached and len(notes) == 1  # rewritten whole, trusted again
    np.testing.assert_array_equal(np.asarray(hit.images), decode_bin(src)[0])


def test_entry_checksum_is_sha256_of_the_array_bytes(tiny_pack, tmp_path):
    import hashlib
    import json

    src = os.path.join(tiny_pack, "cfp_fp.bin")
    load_decoded(src, cache_dir=str(tmp_path))
    meta_path = next(p for p in (tmp_path / "decoded").iterdir() if p.name.endswith(".json"))
    meta = json.loads(meta_path.read_text())
    images, issame = decode_bin(src)
    assert meta["images_sha256"] == hashlib.sha256(images.tobytes()).hexdigest()
    assert meta["issame_sha256"] == hashlib.sha256(issame.tobytes()).hexdigest()
    assert meta["bin_sha256"] == sha256_file(src)


def test_entry_without_checksums_is_not_trusted(tiny_pack, tmp_path):
    src = os.path.join(tiny_pack, "lfw.bin")
    load_decoded(src, cache_dir=str(tmp_path))
    next(p for p in (tmp_path / "decoded").iterdir() if p.name.endswith(".json")).unlink()
    assert not load_decoded(src, cache_dir=str(tmp_path)).cached  # an older or half-written entry


def test_hashing_refuses_a_fifo_even_without_cache(tmp_path):
    import pytest

    from utils.files import UnreadableFileError

    os.mkfifo(tmp_path / "lfw.bin")
    with pytest.raises(UnreadableFileError, match=r"lfw\.bin: is a FIFO"):
        load_decoded(str(tmp_path / "lfw.bin"), cache_dir=None)


def test_pair_count_checked_on_a_cache_hit_too(tiny_pack, tmp_path):
    import pytest

    from data.bins import BinFormatError

    src = os.path.join(tiny_pack, "lfw.bin")  # 20 pairs
    load_decoded(src, cache_dir=str(tmp_path))
    with pytest.raises(BinFormatError, match=r"lfw\.bin: 20 pairs; needs at least 30 pairs"):
        load_decoded(src, cache_dir=str(tmp_path), min_pairs=30)
