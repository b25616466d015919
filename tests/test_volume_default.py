"""Volumes by default: --source auto is the ImageNet Lite0 for images; for volumes the small ResNet from scratch,
or the small ResNet shipped with medxfer where a strategy keeps source weights; the shipped weights load
offline, checked by SHA-256."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import shutil
import tomllib
from pathlib import Path

import pytest
import torch

from medxfer.config import TrainConfig
from medxfer.errors import MedxferError
from medxfer.models import build_model, resolve_source
from medxfer.models.catalog import (BUNDLED, DEFAULT_3D, SCRATCH_3D, SHIPPED_DIR, default_source, list_sources,
                                    volume_defaults)

ROOT = Path(__file__).resolve().parents[1]


def test_auto_is_lite0_for_images_and_the_shipped_resnet_for_volumes(caplog):
    """Where a source is resolved (a transfer): Lite0 for images, the shipped small ResNet for volumes, logged."""
    assert TrainConfig().model.source == "auto"
    with caplog.at_level(logging.INFO, logger="medxfer.models.catalog"):
        images = resolve_source("auto")
        vols = resolve_source("auto", spatial_dims=3)
    assert images.name == "efficientnet_lite0.in1k" and vols.name == DEFAULT_3D == "test_resnet.pneumoniamnist"
    assert vols.arch == "test_resnet" and vols.weights.startswith("dir:") and vols.sha256
    assert "source test_resnet.pneumoniamnist (--source auto, --spatial-dims 3)" in caplog.text  # what and why
    assert default_source(3)[1] in caplog.text
    # a named source is never replaced, for volumes either
    assert resolve_source("efficientnet_lite0.in1k", spatial_dims=3).arch == "tf_efficientnet_lite0"


@pytest.mark.parametrize("strategy, weights, want", [
    ("full", None, {"source": "test_resnet", "weights": "none", "strategy": "scratch"}),     # the default run
    ("scratch", None, {"source": "test_resnet", "weights": "none", "strategy": "scratch"}),
    ("full", "none", {"source": "test_resnet", "weights": "none", "strategy": "scratch"}),
    ("linear-probe", None, {"source": "test_resnet.pneumoniamnist"}),   # keeps source weights: the shipped source
    ("lp-ft", None, {"source": "test_resnet.pneumoniamnist"}),
    ("partial", "w.pth", {"source": "test_resnet"}),
])
def test_what_auto_stands_for_in_a_volume_run(strategy, weights, want, caplog):
    with caplog.at_level(logging.INFO, logger="medxfer.models.catalog"):
        options, why = volume_defaults(strategy, weights)
    assert options == want and why in caplog.text and "--source auto for volumes: --source " in caplog.text
    cfg = TrainConfig.create(data="v.npz", spatial_dims=3, strategy=strategy).replace(**options)  # valid options
    assert cfg.model.source == want["source"] and cfg.optim.strategy == want.get("strategy", strategy)


def test_the_chosen_recipe_is_the_one_validated():
    """The default volume run is exactly the arm validation chose (README: --source test_resnet --weights none
    --strategy scratch), and its network is the small ResNet, random."""
    assert SCRATCH_3D == {"source": "test_resnet", "weights": "none", "strategy": "scratch"}
    spec = resolve_source(SCRATCH_3D["source"], SCRATCH_3D["weights"], spatial_dims=3)
    model, info = build_model(spec, 2, 1, spatial_dims=3, pretrained=False)
    assert info["arch"] == "test_resnet" and info["weights_sha256"] is None
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(1.03e6, rel=0.01)


def test_the_help_says_what_auto_means(capsys):
    from medxfer.cli import main

    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "auto: efficientnet_lite0.in1k for images; for volumes (--spatial-dims 3) a small ResNet (timm " \
           "test_resnet) from scratch" in text


def test_the_shipped_source_is_listed_and_agrees_with_its_source_json():
    spec = BUNDLED[DEFAULT_3D]
    assert spec in list_sources() and spec.available() == (True, "shipped with medxfer")
    folder = SHIPPED_DIR / DEFAULT_3D
    meta = json.loads((folder / "source.json").read_text())
    assert (meta["name"], meta["arch"], meta["input_size"], meta["in_chans"]) == (spec.name, spec.arch, 28, 1)
    assert tuple(meta["mean"]) == spec.mean and tuple(meta["std"]) == spec.std
    assert meta["weights_sha256"] == spec.sha256 and "CC BY 4.0" in meta["licence"]
    assert (folder / "model.safetensors").stat().st_size < 4e6         # a few MB in the package


def test_the_package_data_ships_the_source_files():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["medxfer"]
    for name in ("source.json", "model.safetensors"):
        rel = f"sources/{DEFAULT_3D}/{name}"
        assert any(fnmatch.fnmatch(rel, g) for g in globs), rel


def test_the_shipped_weights_load_inflated_and_keep_the_2d_response(monkeypatch):
    """Offline (no hub), every backbone key loaded, digest recorded; inflated by i3d, a depth-constant volume gives the
    2-D network's features with the shipped weights."""
    import timm

    monkeypatch.setattr(timm, "create_model", _no_hub(timm.create_model))
    spec = resolve_source("auto", spatial_dims=3)
    vol, info = build_model(spec, 2, 1, spatial_dims=3)
    flat, _ = build_model(spec, 2, 1)
    assert info["weights_sha256"] == spec.sha256 and info["unexpected_keys"] == [] and info["loaded_keys"] >= 80
    torch.testing.assert_close(vol.net.conv1[0].weight.sum(2), flat.net.conv1[0].weight)   # i3d: repeated / depth
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(vol.eval().features(x[:, :, None].expand(-1, -1, 28, -1, -1)),
                                   flat.eval().features(x), atol=1e-4, rtol=1e-4)


def _no_hub(create):
    def create_offline(*args, pretrained=False, **kwargs):
        assert not pretrained, "nothing downloads at run time"
        return create(*args, pretrained=False, **kwargs)
    return create_offline


def test_damaged_or_missing_shipped_weights_are_refused_before_loading(tmp_path):
    folder = tmp_path / DEFAULT_3D
    shutil.copytree(SHIPPED_DIR / DEFAULT_3D, folder)
    spec = dataclasses.replace(BUNDLED[DEFAULT_3D], weights=f"dir:{folder}")
    build_model(spec, 2, 1, spatial_dims=3)                               # the intact copy loads
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 1                                                        # one bit of one weight
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(MedxferError, match="have SHA-256 .* not the .* medxfer shipped: the file is damaged or replaced"):
        build_model(spec, 2, 1, spatial_dims=3)
    (folder / "model.safetensors").unlink()
    with pytest.raises(MedxferError, match="weights file .* is missing: reinstall medxfer"):
        build_model(spec, 2, 1, spatial_dims=3)
