"""End to end through the CLI: train -> run directory -> predict reproduces the test probabilities."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from medxfer.cli import main

RUN_FILES = ("config.yaml", "metrics.json", "history.csv", "predictions.csv", "model.safetensors", "model.json",
             "split.csv")


def test_run_directory_stands_alone(tiny_run):
    for name in RUN_FILES:
        assert (tiny_run / name).is_file(), name
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for split in ("val", "test"):
        for key in ("auc", "accuracy", "balanced_accuracy", "f1", "confusion_matrix", "sensitivity", "specificity"):
            assert key in metrics[split], (split, key)
    assert metrics["test"]["positive_label"] == "malignant"
    assert metrics["train_seconds"] > 0 and "auc_ci" in metrics["test"]
    cm = np.array(metrics["test"]["confusion_matrix"])
    assert cm.sum() == metrics["test"]["n"] == 40
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert config["optim"]["strategy"] == "full" and config["optim"]["seed"] == 0
    assert config["model"]["image_size"] == 32 and config["resolved"]["image_size"] == 32
    assert config["resolved"]["input"]["grey_mode"] == "sum" and config["resolved"]["input"]["model_channels"] == 1
    preds = pd.read_csv(tiny_run / "predictions.csv")
    assert set(preds["split"]) == {"val", "test"}
    assert list(preds.columns[-2:]) == ["prob_malignant", "prob_benign"]
    np.testing.assert_allclose(preds[["prob_malignant", "prob_benign"]].sum(axis=1), 1, atol=1e-6)
    history = pd.read_csv(tiny_run / "history.csv")
    assert list(history["epoch"]) == [1, 2] and {"train_loss", "val_auc"} <= set(history.columns)


def _max_test_diff(run_dir, npz, tmp_path, *extra) -> float:
    out = tmp_path / "p.csv"
    assert main(["predict", str(run_dir), str(npz), "--out", str(out), *extra]) == 0
    got = pd.read_csv(out).set_index("sample_id")
    want = pd.read_csv(run_dir / "predictions.csv")
    want = want[want["split"] == "test"].set_index("sample_id")
    cols = [c for c in want.columns if c.startswith("prob_")]
    return float(np.abs(got.loc[want.index, cols].to_numpy() - want[cols].to_numpy()).max())


def test_predict_reproduces_test_probabilities(tiny_run, small_npz, tmp_path):
    assert _max_test_diff(tiny_run, small_npz, tmp_path) < 1e-5


def test_linear_probe_on_imagenet_source_and_predict(small_npz, tmp_path):
    """The cached-feature head (standardised, then folded into the model) predicts like the run said."""
    run = tmp_path / "lp"
    args = ["train", "--data", str(small_npz), "--strategy", "linear-probe", "--image-size", "32",
            "--bootstrap", "0", "--cache-dir", str(tmp_path / "cache"), "--out", str(run)]
    assert main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["auc"] > 0.6  # ImageNet features separate the classes even at 32 px
    assert _max_test_diff(run, small_npz, tmp_path) < 1e-5
    assert list((tmp_path / "cache" / "features").glob("*.npy"))  # features cached in --cache-dir


def test_same_seed_same_metrics(small_npz, tmp_path):
    def run(name):
        out = tmp_path / name
        assert main(["train", "--data", str(small_npz), "--source", "test_efficientnet", "--weights", "none",
                     "--strategy", "scratch", "--epochs", "1", "--image-size", "32", "--bootstrap", "0",
                     "--out", str(out)]) == 0
        return json.loads((out / "metrics.json").read_text()), pd.read_csv(out / "predictions.csv")

    (m1, p1), (m2, p2) = run("a"), run("b")
    assert m1["test"]["auc"] == m2["test"]["auc"] and m1["val"]["confusion_matrix"] == m2["val"]["confusion_matrix"]
    pd.testing.assert_frame_equal(p1, p2)


def test_made_split_is_stratified_and_recorded(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (200, 16, 16), dtype=np.uint8)
    y = np.r_[np.zeros(140), np.ones(60)].astype(np.uint8)[:, None]
    npz = tmp_path / "nosplit.npz"
    np.savez(npz, train_images=x, train_labels=y)
    out = tmp_path / "run"
    assert main(["train", "--data", str(npz), "--source", "test_resnet", "--weights", "none", "--epochs", "1",
                 "--image-size", "16", "--bootstrap", "0", "--seed", "3", "--out", str(out)]) == 0
    split = pd.read_csv(out / "split.csv")
    counts = split.groupby("split").size()
    assert counts["train"] == 140 and counts["val"] == 30 and counts["test"] == 30
    assert split.groupby("split")["label"].mean().between(0.25, 0.35).all()


@pytest.mark.parametrize("argv,message", [
    (["train", "--data", "nowhere.npz"], "does not exist"),
    (["train", "--data", "{npz}", "--strategy", "fine-tune"], "'strategy' parameter must be one of"),
    (["train", "--data", "{npz}", "--strategy", "ful"], "Did you mean 'full'"),
    (["train", "--data", "{npz}", "--source", "resnet50x"], "unknown source 'resnet50x'"),
    (["train", "--data", "{npz}", "--threshold", "sens=0.9"], "threshold rule"),
    (["train", "--data", "{npz}", "--positive-label", "cancer", "--source", "test_resnet", "--weights", "none"],
     "not a class"),
    (["predict", "{npz}", "x.png"], "not a finished run directory"),
    (["train", "--data", "{npz}", "--epochs", "0"], "'epochs' parameter must be at least 1"),
])
def test_user_mistakes_get_one_line_and_exit_2(argv, message, small_npz, capsys):
    code = main([a.replace("{npz}", str(small_npz)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()        # log lines said before the fault may precede it (the fault table's rule)
    assert lines[-1].startswith("medxfer: ") and sum(ln.startswith("medxfer: ") for ln in lines) == 1, err
    assert message in lines[-1] and "Traceback" not in err


def test_sources_lists_bundled_imagenet_sources_with_their_contract(capsys):
    assert main(["sources"]) == 0
    text = capsys.readouterr().out
    for i, size in ((0, 224), (1, 240), (2, 260)):
        assert f"efficientnet_lite{i}.in1k  (available: installed)" in text
        assert f"{size} px, 3 channels, mean 0.5, std 0.5" in text


@pytest.mark.slow
def test_a_run_replays_from_its_own_config(tiny_run, small_npz, tmp_path):
    """`medxfer train --config RUN/config.yaml --out RUN2` reproduces the run: same split, same test metrics."""
    again = tmp_path / "again"
    assert main(["train", "--config", str(tiny_run / "config.yaml"), "--out", str(again)]) == 0
    a, b = (json.loads((d / "metrics.json").read_text())["test"] for d in (tiny_run, again))
    for key in ("auc", "auc_ci", "balanced_accuracy", "sensitivity", "specificity", "confusion_matrix"):
        assert a[key] == b[key], key
    # other tests in this process may set another thread count: sums then differ in the last digits
    assert a["brier"] == pytest.approx(b["brier"], abs=1e-5)
    pd.testing.assert_frame_equal(pd.read_csv(tiny_run / "split.csv"), pd.read_csv(again / "split.csv"))
    # options on the command line override the file
    other = tmp_path / "other"
    assert main(["train", "--config", str(tiny_run / "config.yaml"), "--out", str(other), "--seed", "3"]) == 0
    assert yaml.safe_load((other / "config.yaml").read_text())["optim"]["seed"] == 3


def test_config_file_unknown_key_did_you_mean(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("data:\n  path: x.npz\noptim:\n  strategyy: full\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "unknown config key 'optim.strategyy'" in capsys.readouterr().err
    (tmp_path / "d.yaml").write_text("data: x.npz\nepochs_max: 3\nlearning_rate: 0.1\n")  # a flat, older file
    assert main(["train", "--config", str(tmp_path / "d.yaml")]) == 2
    assert "unknown config key 'learning_rate'" in capsys.readouterr().err


def test_help_shows_real_defaults_grouped(capsys):
    from medxfer.cli import main as cli

    assert cli(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for panel in ("Data", "Source model", "Training", "Evaluation", "Run"):
        assert panel in text, panel
    assert "efficientnet_lite0.in1k" in text and "drop-from-train" in text and "youden" in text
    for command in ("cv", "compare"):  # the train options they accept are listed in their own help
        assert cli([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert "--label-names" in text and "--image-size" in text and "--backbone-lr-mult" in text
