"""DecodeCache: content + parameter keys, hits, misses, corrupt entries, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest

from medxfer.data.cache import DecodeCache, default_cache_dir, file_digest


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "img.png"
    path.write_bytes(b"pretend image bytes " * 100)
    return path


def _entries(cache: DecodeCache):
    return sorted(p for p in cache.directory.rglob("*") if p.is_file())


def test_hit_returns_identical_array(tmp_path, image_file):
    cache = DecodeCache(tmp_path / "cache")
    key = cache.key(image_file, {"size": 64, "window": "auto"})
    assert cache.get(key) is None
    arr = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    cache.put(key, arr)
    got = cache.get(key)
    assert got.dtype == np.uint8 and got.shape == (3, 64, 64)
    np.testing.assert_array_equal(got, arr)
    assert key in cache
    (entry,) = _entries(cache)
    assert entry.parent.name == key[:2] and entry.name == f"{key}.npy"


def test_key_depends_on_params_and_content_not_name(tmp_path, image_file):
    params = {"size": 64, "window": "auto", "slice": "middle"}
    key = DecodeCache.key(image_file, params)
    assert DecodeCache.key(image_file, dict(reversed(params.items()))) == key  # order-free
    assert DecodeCache.key(image_file, {**params, "size": 128}) != key
    assert DecodeCache.key(image_file, {**params, "window": "lung"}) != key
    copy = tmp_path / "renamed.png"
    copy.write_bytes(image_file.read_bytes())
    assert DecodeCache.key(copy, params) == key
    image_file.write_bytes(b"edited bytes, same file name")
    os.utime(image_file, ns=(1, 1))  # a new mtime for the memo, whatever the clock says
    assert DecodeCache.key(image_file, params) != key


def test_changed_content_misses(tmp_path, image_file):
    cache = DecodeCache(tmp_path / "cache")
    params = {"size": 8}
    cache.put(cache.key(image_file, params), np.ones((1, 8, 8), np.uint8))
    image_file.write_bytes(b"other content")
    assert cache.get(cache.key(image_file, params)) is None


def test_file_digest_streams_large_files(tmp_path):
    import hashlib

    big = tmp_path / "big.bin"
    data = os.urandom(3 * (1 << 20) + 17)
    big.write_bytes(data)
    assert file_digest(big) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_entry_is_a_miss_and_deleted(tmp_path, image_file, damage):
    cache = DecodeCache(tmp_path / "cache")
    key = cache.key(image_file, {"size": 32})
    cache.put(key, np.full((1, 32, 32), 7, np.uint8))
    (entry,) = _entries(cache)
    data = entry.read_bytes()
    entry.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(300),
                       "empty": b""}[damage])
    assert cache.get(key) is None
    assert not entry.exists()
    cache.put(key, np.full((1, 32, 32), 9, np.uint8))  # re-filled after the miss
    assert cache.get(key)[0, 0, 0] == 9


def test_put_is_atomic_and_leaves_no_temp_files(tmp_path, image_file, monkeypatch):
    cache = DecodeCache(tmp_path / "cache")
    key = cache.key(image_file, {"size": 16})
    cache.put(key, np.zeros((1, 16, 16), np.uint8))
    cache.put(key, np.ones((1, 16, 16), np.uint8))  # overwrite in place
    assert [p.suffix for p in _entries(cache)] == [".npy"]
    assert cache.get(key).max() == 1

    # an interrupted write: the final entry keeps the old, complete array; no temp file is left
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.put(key, np.full((1, 16, 16), 5, np.uint8))
    monkeypatch.undo()
    assert [p.suffix for p in _entries(cache)] == [".npy"]
    assert cache.get(key).max() == 1


def test_pickled_entry_is_refused(tmp_path, image_file):
    cache = DecodeCache(tmp_path / "cache")
    key = cache.key(image_file, {})
    cache.put(key, np.zeros((1, 2, 2), np.uint8))
    (entry,) = _entries(cache)
    np.save(entry, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    assert cache.get(key) is None


def test_bad_key_and_default_dir(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not a DecodeCache key"):
        DecodeCache(tmp_path).get("../../etc/passwd")
    monkeypatch.setenv("MEDXFER_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MEDXFER_CACHE_DIR")
    assert default_cache_dir().parts[-3:] == (".cache", "medxfer", "decode")


def test_clear(tmp_path, image_file):
    cache = DecodeCache(tmp_path / "cache")
    cache.clear()  # no folder yet: nothing to do
    cache.put(cache.key(image_file, {}), np.zeros((1, 2, 2), np.uint8))
    cache.clear()
    assert _entries(cache) == []


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_a_broken_link_is_a_bad_file_not_a_crash(tmp_path, kind):
    from medxfer.errors import BadFileError

    link = tmp_path / "x.png"
    os.symlink(tmp_path / "gone.png" if kind == "dangling" else link, link)
    with pytest.raises(BadFileError, match="loop" if kind == "loop" else "not found"):
        DecodeCache(tmp_path / "c").key(link, {})


def test_a_series_folder_with_a_name_that_is_not_utf8_digests(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    (series / os.fsdecode(b"slice_\xff.dcm")).write_bytes(b"slice")
    other = tmp_path / "other"
    other.mkdir()
    (other / os.fsdecode(b"slice_\xfe.dcm")).write_bytes(b"slice")
    assert file_digest(series) != file_digest(other)       # names are part of a series' digest


def test_every_cache_lives_under_the_folder_given(tmp_path, monkeypatch):
    from medxfer.engine.features import feature_cache_dir

    monkeypatch.setenv("MEDXFER_CACHE_DIR", str(tmp_path / "x" / "cache"))
    assert feature_cache_dir(None, False).is_relative_to(tmp_path / "x" / "cache")
    assert feature_cache_dir(str(tmp_path / "given"), False).is_relative_to(tmp_path / "given")
    monkeypatch.delenv("MEDXFER_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert feature_cache_dir(None, False).is_relative_to(tmp_path / "home" / ".cache" / "medxfer")
