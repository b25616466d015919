"""Defaults of train, said and recorded: --augment auto chooses the preset from the data (xray for grey 2-D images,
light for colour) and records the preset used, so a replay or --resume trains the same; scratch is said as random
init, not as from the source."""

import numpy as np
import yaml

from medxfer.cli import main
from medxfer.config import TrainConfig


def _train(data, out, *extra):
    assert main(["train", "--data", str(data), "--source", "test_resnet", "--weights", "none", "--strategy", "full",
                 "--epochs", "1", "--image-size", "32", "--bootstrap", "0", "--no-report", "--out", str(out),
                 *extra]) == 0
    return yaml.safe_load((out / "config.yaml").read_text())


def test_the_default_is_auto_and_grey_images_get_the_xray_preset(small_npz, tmp_path):
    assert TrainConfig().optim.augment == "auto"
    config = _train(small_npz, tmp_path / "grey")
    assert config["optim"]["augment"] == "xray"
    assert "augmentation xray: grey 2-D images" in (tmp_path / "grey" / "train.log").read_text()


def test_colour_images_get_light_and_a_given_preset_is_kept(tmp_path):
    rng = np.random.default_rng(0)
    n = (60, 20, 20)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        y = np.arange(k) % 2
        x = rng.integers(0, 60, size=(k, 28, 28, 3), dtype=np.uint8)
        x[y == 1, 8:20, 8:20, 0] = 220                       # a red square: something to learn
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y
    np.savez(tmp_path / "rgb.npz", **arrays)
    assert _train(tmp_path / "rgb.npz", tmp_path / "rgb")["optim"]["augment"] == "light"
    assert _train(tmp_path / "rgb.npz", tmp_path / "given", "--augment", "ct")["optim"]["augment"] == "ct"


def test_scratch_is_said_as_random_init_not_as_from_the_source(small_npz, tmp_path, capsys):
    assert main(["train", "--data", str(small_npz), "--source", "test_resnet", "--weights", "none", "--strategy",
                 "scratch", "--epochs", "1", "--image-size", "32", "--bootstrap", "0", "--no-report",
                 "--out", str(tmp_path / "s")]) == 0
    said = capsys.readouterr()
    assert "scratch (test_resnet, random init) (seed 0" in said.out
    log = (tmp_path / "s" / "train.log").read_text()
    assert "scratch (test_resnet, random init): " in log and "scratch from" not in log + said.out + said.err


def test_quiet_quiets_the_screen_not_the_runs_log(small_npz, tmp_path, capsys):
    assert main(["train", "-q", "--data", str(small_npz), "--source", "test_resnet", "--weights", "none",
                 "--epochs", "1", "--image-size", "32", "--bootstrap", "0", "--no-report",
                 "--out", str(tmp_path / "q")]) == 0
    said = capsys.readouterr()
    log = (tmp_path / "q" / "train.log").read_text()
    assert "train / " in log and "memory plan" in log          # the run's record keeps its INFO lines
    assert "train / " not in said.err and "memory plan" not in said.err and "steps/s" not in said.err
