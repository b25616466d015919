"""npz archives are checked from each member's .npy header (shape, type, size) before any pixel is
decompressed: bombs, empty or 0-wide images, empty splits and splits of other sizes or types are refused in
one line; what passes loads exactly as numpy.load would."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npformat

from medxfer.data.sources import load_manifest
from medxfer.errors import MedxferError


def _splits(size=(8, 8), n=(6, 4, 4), dtype=np.uint8, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for s, k in zip(("train", "val", "test"), n):
        out[f"{s}_images"] = rng.integers(0, 255, (k, *size)).astype(dtype)
        out[f"{s}_labels"] = (np.arange(k) % 2).reshape(-1, 1)
    return out


def zeros_member(zf: zipfile.ZipFile, name: str, shape: tuple, dtype=np.uint8, chunk=1 << 22) -> None:
    """A deflated .npy member of zeros, streamed (a decompression bomb costs the test no memory)."""
    dtype = np.dtype(dtype)
    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        npformat.write_array_header_1_0(f, {"descr": npformat.dtype_to_descr(dtype), "fortran_order": False,
                                            "shape": shape})
        left = int(np.prod(shape)) * dtype.itemsize
        block = bytes(min(chunk, left))
        while left:
            f.write(block[:min(left, len(block))])
            left -= min(left, len(block))


def bomb_npz(path: Path, shape=(1, 8200, 8200)) -> Path:
    """A small npz whose train_images unpack to ``shape`` uint8 zeros (8200^2 is above MEDXFER_MAX_PIXELS)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zeros_member(zf, "train_images", shape)
        for s in ("train", "val", "test"):
            if s != "train":
                zeros_member(zf, f"{s}_images", (2, 8, 8))
            with zf.open(f"{s}_labels.npy", "w") as f:
                npformat.write_array(f, (np.arange(shape[0] if s == "train" else 2) % 2).reshape(-1, 1))
    return path


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any array data is read (the refusal must come from the headers alone)."""
    from medxfer.data import npzfile

    def refuse(*a, **k):
        raise AssertionError("array data was read")

    monkeypatch.setattr(npzfile.NpzArchive, "_fill", refuse)
    monkeypatch.setattr(np, "load", refuse)


def test_a_pixel_bomb_is_refused_from_its_header(tmp_path, no_decoding):
    path = bomb_npz(tmp_path / "bomb.npz")
    assert path.stat().st_size < 200_000                       # 67 MB of pixels in a small file
    with pytest.raises(MedxferError, match="8200x8200 pixels.*above the limit.*MEDXFER_MAX_PIXELS"):
        load_manifest(path)


def test_a_volume_bomb_is_refused_from_its_header(tmp_path, no_decoding, monkeypatch):
    path = tmp_path / "v.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zeros_member(zf, "images", (2, 700, 700, 600))           # 294 M voxels per volume, above 2^28
        with zf.open("labels.npy", "w") as f:
            npformat.write_array(f, np.array([0, 1]))
    with pytest.raises(MedxferError, match="700x700x600 voxels.*MEDXFER_MAX_VOXELS"):
        load_manifest(path)


def test_the_total_size_is_bounded_by_memory(tmp_path, monkeypatch, no_decoding):
    from medxfer.data import npzfile

    path = tmp_path / "big.npz"
    np.savez_compressed(path, **_splits(size=(64, 64), n=(200, 40, 40)))    # 1.1 MB of arrays
    monkeypatch.setattr(npzfile, "memory_bytes", lambda: 2_000_000)        # a machine with 2 MB
    with pytest.raises(MedxferError) as info:
        load_manifest(path)
    msg = str(info.value)
    assert "1.1 MB" in msg and "500.0 kB" in msg and "MEDXFER_MAX_NPZ_BYTES" in msg and "\n" not in msg
    monkeypatch.setattr(npzfile, "memory_bytes", lambda: 2**40)
    monkeypatch.setenv("MEDXFER_MAX_NPZ_BYTES", "1000")                   # the user's own bound wins
    with pytest.raises(MedxferError, match="above the 1.0 kB"):
        load_manifest(path)


def test_what_passes_loads_as_numpy_would(tmp_path):
    from medxfer.data.npzfile import NpzArchive

    rng = np.random.default_rng(1)
    arrays = {"c": rng.random((3, 5, 4)), "f": np.asfortranarray(rng.random((3, 5, 4))),
              "big_endian": rng.integers(0, 4000, (2, 6, 6)).astype(">u2"), "names": np.array(["a", "bb"])}
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "a.npz", **arrays)
        with NpzArchive(tmp_path / "a.npz") as npz:
            for k, v in arrays.items():
                got = npz.load(k)
                assert got.dtype == v.dtype and np.array_equal(got, v), k
            stacked = npz.load_stacked(["c", "f"])
            assert np.array_equal(stacked, np.concatenate([arrays["c"], arrays["f"]]))
    splits = _splits()
    np.savez_compressed(tmp_path / "d.npz", **splits)                  # the splits, read into one array
    want = np.concatenate([splits[f"{s}_images"] for s in ("train", "val", "test")])
    assert np.array_equal(load_manifest(tmp_path / "d.npz").arrays, want)


def test_a_member_that_holds_less_than_its_header_claims_is_damaged(tmp_path):
    path = tmp_path / "t.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("images.npy", "w") as f:
            npformat.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (1000, 64, 64)})
            f.write(bytes(1000))
        with zf.open("labels.npy", "w") as f:
            npformat.write_array(f, np.zeros(1000))
    with pytest.raises(MedxferError, match="damaged"):
        load_manifest(path)


def test_object_arrays_are_refused_from_the_header(tmp_path, no_decoding):
    arrays = {f"{s}_images": np.empty(4, dtype=object) for s in ("train", "val", "test")}
    arrays.update({f"{s}_labels": np.zeros((4, 1)) for s in ("train", "val", "test")})
    np.savez(tmp_path / "o.npz", **arrays)
    with pytest.raises(MedxferError, match="object \\(pickled\\) array"):
        load_manifest(tmp_path / "o.npz")


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(val_images=a["val_images"][:0], val_labels=a["val_labels"][:0]),
     "val_images holds no images"),
    (lambda a: a.update({k: v[:, :, :0] for k, v in a.items() if k.endswith("images")}), "side of 0 pixels"),
    (lambda a: a.update(val_images=np.zeros((4, 9, 8), np.uint8)), "val_images are 9x8"),
    (lambda a: a.update(test_images=a["test_images"].astype(np.float32)), "test_images are float32"),
])
def test_npz_shapes_and_splits_are_checked(tmp_path, change, message):
    arrays = _splits()
    change(arrays)
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(MedxferError) as info:
        load_manifest(tmp_path / "d.npz")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_pretraining_checks_an_npz_as_training_does(tmp_path, no_decoding):
    """``medxfer pretrain`` reads npz images its own way (splits, or unlabelled ``images``): the same header
    checks refuse a bomb before any data is read."""
    from medxfer.pretrain.common import _npz_images

    with pytest.raises(MedxferError, match="8200x8200 pixels.*above the limit"):
        _npz_images(bomb_npz(tmp_path / "bomb.npz"), ("train", "val"))
    with zipfile.ZipFile(tmp_path / "unlabelled.npz", "w") as zf:
        zeros_member(zf, "images", (1, 8200, 8200))
    with pytest.raises(MedxferError, match="above the limit"):
        _npz_images(tmp_path / "unlabelled.npz", ("train", "val"))
