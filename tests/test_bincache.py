"""The on-disk cache of decoded .bin sets: keyed by content, equal to a fresh decode, never trusted blindly."""

import os
import shutil

import numpy as np

from data.bincache import default_cache_dir, load_decoded
from data.bins import decode_bin
from utils.checkpoint import sha256_file


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
