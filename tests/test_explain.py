"""Grad-CAM: map shape and range, the target layer, localisation on a synthetic task, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_report import cli_main, squares_npz, squares_run  # noqa: F401  (shared session fixtures)

from medxfer.errors import MedxferError

pytestmark = pytest.mark.slow  # end to end: a few seconds to a minute each


@pytest.fixture(scope="module")
def squares_model(squares_run):
    from medxfer.runs import Run

    run = Run.load(squares_run)
    return run.load_model(), run.model


@pytest.fixture(scope="module")
def squares_test(squares_npz):
    from medxfer.data.loading import arrays_to_uint8

    d = np.load(squares_npz)
    return arrays_to_uint8(d["test_images"], 32), d["test_labels"][:, 0]


def test_maps_have_the_image_shape_and_range(squares_model, squares_test):
    from medxfer.evaluation.gradcam import explain_images

    model, meta = squares_model
    x, _ = squares_test
    maps = explain_images(model, meta, x[:12])
    assert maps.shape == (12, 32, 32) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert (maps.reshape(12, -1).std(1) > 0).all()  # a trained model gives no flat maps
    one = explain_images(model, meta, x[:2].float() / 255, target_class="top_left")
    assert one.shape == (2, 32, 32)


def test_gradcam_finds_the_square(squares_model, squares_test):
    """The class is decided by a bright square's quadrant; the map's mass must concentrate there."""
    from medxfer.evaluation.gradcam import explain_images

    model, meta = squares_model
    x, y = squares_test
    maps = explain_images(model, meta, x, layer="layer3")
    mass = maps.sum((1, 2)).clip(1e-9)
    top_left = maps[:, :16, :16].sum((1, 2)) / mass
    bottom_right = maps[:, 16:, 16:].sum((1, 2)) / mass
    assert top_left[y == 1].mean() > 0.5, top_left[y == 1].mean()  # a quarter would be chance
    assert bottom_right[y == 2].mean() > 0.5, bottom_right[y == 2].mean()


def test_default_layer_is_the_last_stage_unless_too_coarse():
    import timm

    from medxfer.evaluation.gradcam import default_layer

    resnet = timm.create_model("test_resnet", pretrained=False)
    assert default_layer(resnet) == "layer4" == default_layer(resnet, 224)
    assert default_layer(resnet, 32) == "layer2"  # layer4 would be 1x1, layer3 2x2
    lite = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2, in_chans=1)
    assert default_layer(lite, 224) == "bn2"
    assert default_layer(lite, 64) == "blocks.4"  # bn2 is 2x2 at 64 px


def test_unknown_layer_and_class(squares_model, squares_test):
    from medxfer.evaluation.gradcam import explain_images, resolve_layer

    model, meta = squares_model
    assert resolve_layer(model, "net.layer3")[0] == "layer3"
    with pytest.raises(MedxferError, match=r"unknown layer 'layer5'.*Did you mean 'layer4'.*layer2"):
        resolve_layer(model, "layer5")
    with pytest.raises(MedxferError, match="'bogus' is not a class.*none, top_left, bottom_right"):
        explain_images(model, meta, squares_test[0][:1], target_class="bogus")


def test_overlay_is_rgb_in_unit_range():
    from medxfer.evaluation.gradcam import overlay

    img = np.full((1, 16, 16), 128, np.uint8)
    out = overlay(img, np.linspace(0, 1, 256).reshape(16, 16))
    assert out.shape == (16, 16, 3) and 0 <= out.min() and out.max() <= 1


def test_explain_cli_writes_one_png_per_input(squares_run, squares_test, tmp_path, capsys):
    x, _ = squares_test
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(x[i, 0].numpy()).save(folder / f"case{i}.png")
    single = tmp_path / "single.png"
    Image.fromarray(x[4, 0].numpy()).save(single)
    npz = tmp_path / "more.npz"
    np.savez(npz, test_images=x[5:7, 0].numpy())
    out = tmp_path / "cams"
    assert cli_main(["explain", str(squares_run), str(folder), str(single), str(npz), "--out", str(out)]) == 0
    from medxfer.privacy import sample_id

    pngs = sorted(p.name for p in out.glob("*.png"))  # named by pseudonymous id: file names can hold patient names
    files = [str(folder / f"case{i}.png") for i in range(3)] + [str(single)]
    assert pngs == sorted([f"{sample_id(f)}_gradcam.png" for f in files] +
                          ["test_000000_gradcam.png", "test_000001_gradcam.png"])
    assert Image.open(out / f"{sample_id(files[0])}_gradcam.png").size[0] >= 400
    assert "6 Grad-CAM overlays" in capsys.readouterr().out
    assert cli_main(["explain", str(squares_run), str(single), "--out", str(tmp_path / "c2"),
                     "--layer", "layer4", "--class", "top_left"]) == 0


def test_explain_cli_errors(squares_run, tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(img)
    assert cli_main(["explain", str(squares_run), str(img), "--out", str(tmp_path), "--layer", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown layer 'bogus'" in err and "Valid names include" in err
    assert cli_main(["explain", str(squares_run), str(img), "--out", str(tmp_path), "--class", "cat"]) == 2
    assert "'cat' is not a class" in capsys.readouterr().err
    assert cli_main(["explain", str(squares_run), str(tmp_path / "missing.png"), "--out", str(tmp_path)]) == 2


def test_maps_from_float_and_grey_2d():
    from medxfer.evaluation.gradcam import _as_float

    assert _as_float(torch.zeros(2, 8, 8, dtype=torch.uint8)).shape == (2, 1, 8, 8)
    with pytest.raises(MedxferError, match="shape"):
        _as_float(np.zeros((8, 8)))


def test_explain_keep_paths_writes_the_mapping(tiny_run, tmp_path, capsys):
    """--keep-paths as predict has it: OUT/paths.csv maps each overlay's sample id to its file."""
    import pandas as pd

    from medxfer.cli import main
    from medxfer.privacy import sample_id

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((28, 28), 60 + 50 * i, np.uint8)).save(folder / f"Doe_Jane_{i}.png")
    out = tmp_path / "cams"
    assert main(["explain", str(tiny_run), str(folder), "--out", str(out), "--keep-paths"]) == 0
    mapping = pd.read_csv(out / "paths.csv")
    files = [str(folder / f"Doe_Jane_{i}.png") for i in range(2)]
    assert mapping.to_dict("list") == {"sample_id": [sample_id(f) for f in files], "path": files}
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{sample_id(f)}_gradcam.png" for f in files)
    assert "Doe_Jane" not in capsys.readouterr().out.replace(str(out / "paths.csv"), "")
    assert main(["explain", str(tiny_run), str(folder), "--out", str(out), "--keep-paths"]) == 0  # its own: replaced
