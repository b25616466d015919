"""The data-aware input size: the rule, and native sizes read from headers without decoding pixels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medxfer.data.manifest import Manifest
from medxfer.data.sizing import MAX_3D, MIN_2D, choose_size, header_side, native_size


@pytest.mark.parametrize("native, source, dims, want", [
    (28, 224, 2, 64),        # about twice the native side, a multiple of 32
    (20, 224, 2, 64),        # ... at least 64
    (64, 224, 2, 128),
    (100, 224, 2, 224),      # 200 -> 224, the source's size
    (512, 224, 2, 224),      # never past the source's own size
    (90, 256, 2, 192),
    (28, 224, 3, 28),        # volumes keep their grid
    (30, 224, 3, 32),
    (256, 224, 3, MAX_3D),   # ... up to the 3-D cap
])
def test_rule(native, source, dims, want):
    size, why = choose_size(native, source, dims)
    assert size == want and why


def test_unknown_native_falls_back_to_the_source():
    assert choose_size(None, 224)[0] == 224
    assert MIN_2D == 64


def _manifest(paths):
    return Manifest(pd.DataFrame({"sample_id": [f"s{i}" for i in range(len(paths))], "label": 0,
                                  "path": [str(p) for p in paths]}), ["a"], "test")


def test_native_size_from_file_headers(tmp_path, monkeypatch):
    paths = []
    for i, (w, h) in enumerate([(300, 200), (310, 240), (500, 400)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("L", (w, h)).save(paths[-1])
    np.save(tmp_path / "v.npy", np.zeros((40, 30), np.uint8))
    assert header_side(tmp_path / "v.npy") == 40
    # no pixel is decoded: PIL's loader would fail if it were called
    monkeypatch.setattr(Image.Image, "load", lambda self: (_ for _ in ()).throw(AssertionError("decoded")))
    assert native_size(_manifest(paths)) == 310          # the median of the larger sides


def test_native_size_of_arrays():
    m = _manifest([])
    assert native_size(Manifest(m.table, ["a"], "t", arrays=np.zeros((5, 28, 28), np.uint8))) == 28
    assert native_size(Manifest(m.table, ["a"], "t", arrays=np.zeros((5, 28, 32, 3), np.uint8))) == 32
    assert native_size(Manifest(m.table, ["a"], "t", arrays=np.zeros((5, 20, 28, 28), np.uint8))) == 28


def test_unreadable_headers_give_none(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    assert native_size(_manifest([bad])) is None


def test_prepare_data_chooses_the_size_from_the_data(small_npz, caplog):
    import logging

    from medxfer.config import TrainConfig
    from medxfer.data.prepare import prepare_data

    cfg = TrainConfig.create(data=str(small_npz))
    with caplog.at_level(logging.INFO, logger="medxfer"):
        prep = prepare_data(cfg.data, None, 0, source_size=224)
    assert prep.size == 64 and prep.images.shape[-1] == 64          # 28 px BreastMNIST -> 64, not 224
    assert "image size 64 px: about twice the native 28 px" in caplog.text
    assert prepare_data(cfg.data, 32, 0).size == 32                  # a given size is kept


def test_auto_searches_around_the_size_train_chooses():
    from medxfer.data.sizing import sizes_around

    assert sizes_around(64, 224) == [64, 96]            # 28 px images: train's 64 first, then 1.5x
    assert sizes_around(128, 224) == [128, 192]
    assert sizes_around(224, 224) == [224, 160]         # already the source's size: one step down
    assert sizes_around(32, 32) == [32]
    assert sizes_around(28, 224, spatial_dims=3) == [28]


def test_auto_without_image_sizes_takes_trains_choice_from_the_data(small_npz, tmp_path):
    from medxfer.auto import AutoConfig, default_trial

    cfg = AutoConfig.create(data=str(small_npz), source="test_resnet", weights="none", out=str(tmp_path / "a"))
    assert cfg.auto.image_sizes is None
    assert cfg.space()["image_size"] == [64, 96]            # 28 px BreastMNIST -> 64 px, as medxfer train
    assert default_trial(cfg)["image_size"] == 64
    given = AutoConfig.create(data=str(small_npz), source="test_resnet", weights="none", image_size=48)
    assert given.space()["image_size"] == [48]
