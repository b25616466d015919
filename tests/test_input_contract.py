"""What a run learns about its input when it trains: the type of the training pixels (recorded for the
predict-time contract, also when the images come from the decode cache), and the channels it chose."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medxfer.config import TrainConfig
from medxfer.data.cache import DecodeCache
from medxfer.data.loading import load_images
from medxfer.data.prepare import prepare_data
from medxfer.data.sources import load_manifest


def _folder(root: Path, odd: dict | None = None) -> Path:
    rng = np.random.default_rng(0)
    for s, k in (("train", 6), ("val", 3), ("test", 3)):
        for c in "ab":
            for i in range(k):
                (root / s / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(root / s / c / f"{i}.png")
    for rel, img in (odd or {}).items():
        img.save(root / rel)
    return root


def _opts(path: Path, tmp_path: Path):
    return TrainConfig.create(data=str(path), cache_dir=str(tmp_path / "cache")).data


def test_the_pixel_types_are_counted_also_from_the_cache(tmp_path):
    deep = Image.fromarray(np.arange(0, 57600, 400, dtype=np.uint16).reshape(12, 12))
    m = load_manifest(_folder(tmp_path / "d", {"train/a/deep.png": deep}))
    cache = DecodeCache(tmp_path / "cache")
    first = load_images(m, 8, cache=cache)
    again = load_images(m, 8, cache=cache)
    assert again.cache_hits == len(m.table) == 25
    assert first.dtypes == again.dtypes == {"uint8": 24, "uint16": 1}
    assert torch.equal(first.images, again.images)


def test_mixed_types_are_said_and_scaled_by_one_rule(tmp_path, caplog):
    """8-bit files among 16-bit ones are scaled per image like them, in training as in predict (model.json
    records the widest type), and the log says so."""
    deep = Image.fromarray(np.arange(0, 57600, 400, dtype=np.uint16).reshape(12, 12))
    narrow = Image.fromarray(np.tile(np.arange(100, 112, dtype=np.uint8), (12, 1)))   # values 100-111
    data = _folder(tmp_path / "d", {"train/a/deep.png": deep, "train/b/narrow.png": narrow})
    with caplog.at_level(logging.INFO, logger="medxfer"):
        prep = prepare_data(_opts(data, tmp_path), 12, 0)
    assert prep.input_dtype == "uint16"
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "uint8 (25)" in said and "uint16 (1)" in said and "per image" in said and "one type" in said
    assert any("uint16 (1)" in n for n in prep.manifest.notes)          # config.yaml keeps it too
    row = int(np.flatnonzero(prep.table["path"].str.endswith("narrow.png"))[0])
    assert prep.images[row].min() == 0 and prep.images[row].max() == 255   # stretched, not 100/255..111/255


def test_an_npz_run_records_its_array_type(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for s, k in (("train", 8), ("val", 4), ("test", 4)):
        arrays[f"{s}_images"] = rng.random((k, 8, 8)).astype(np.float32)
        arrays[f"{s}_labels"] = np.arange(k) % 2
    np.savez(tmp_path / "f.npz", **arrays)
    assert prepare_data(_opts(tmp_path / "f.npz", tmp_path), 8, 0).input_dtype == "float32"


def test_one_rgb_file_among_grey_is_said(tmp_path, caplog):
    colour = Image.fromarray(np.random.default_rng(1).integers(0, 255, (12, 12, 3), dtype=np.uint8))
    data = _folder(tmp_path / "d", {"train/b/colour.png": colour})
    with caplog.at_level(logging.INFO, logger="medxfer"):
        prep = prepare_data(_opts(data, tmp_path), 8, 0)
    assert prep.images.shape[1] == 3
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "1 of 25 images are RGB" in said and "3-channel" in said and "greyscale" in said
