"""``medxfer features``: embeddings for every sample (npz / Parquet), from a run or a source; logistic head."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from medxfer.cli import main

pytestmark = pytest.mark.slow  # end to end: a few seconds to a minute each


def test_features_from_run_npz(tiny_run, tmp_path, capsys):
    out = tmp_path / "feats.npz"
    assert main(["features", str(tiny_run), "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    z = np.load(out, allow_pickle=False)
    n, d = z["features"].shape
    assert n == 200 and d > 0 and z["features"].dtype == np.float32
    assert z["sample_id"].shape == z["split"].shape == z["label"].shape == (n,)
    assert sorted(set(z["split"])) == ["test", "train", "val"]
    assert set(z["label"]) == {"malignant", "benign"} and list(z["labels"]) == ["malignant", "benign"]
    assert f"{n} x {d} features" in capsys.readouterr().out.replace("\n", " ")


def test_features_parquet_and_logistic_head(tiny_run, tmp_path, capsys):
    out = tmp_path / "feats.parquet"
    assert main(["features", str(tiny_run), "--out", str(out), "--head", "logistic",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    df = pd.read_parquet(out)
    fcols = [c for c in df.columns if c.startswith("f")]
    assert list(df.columns[:3]) == ["sample_id", "split", "label"] and fcols == [f"f{j}" for j in range(len(fcols))]
    assert len(df) == 200 and (df["split"] == "test").sum() == 40
    text = capsys.readouterr().out
    assert "test AUC" in text
    head = json.loads((tmp_path / "feats_logistic.json").read_text())
    assert 0 <= head["test_auc"] <= 1 and head["C"] in head["C_grid"] and head["scoring"] == "roc_auc"
    assert np.array(head["coef"]).shape == (1, len(fcols)) and len(head["mean"]) == len(fcols)
    # the stored head reproduces its own test AUC from the exported features
    from sklearn.metrics import roc_auc_score

    test = df[df["split"] == "test"]
    z = (test[fcols].to_numpy() - np.array(head["mean"])) / np.array(head["std"])
    logit = z @ np.array(head["coef"]).T + np.array(head["intercept"])
    y = (test["label"] == head["classes"][1]).to_numpy()
    assert abs(roc_auc_score(y, logit[:, 0]) - head["test_auc"]) < 1e-9


def test_features_from_source_uses_cache(small_npz, tmp_path, capsys):
    out = tmp_path / "src.npz"
    args = ["features", "--source", "test_resnet", "--weights", "none", "--data", str(small_npz),
            "--image-size", "32", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    first = np.load(out)["features"]
    assert "cache miss" in capsys.readouterr().out
    assert main(args) == 0
    assert "cache hit" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(out)["features"], first)
    assert first.shape[0] == 200


def test_features_needs_data_and_one_model(tiny_run, small_npz, tmp_path, capsys):
    assert main(["features", "--source", "test_resnet", "--weights", "none", "--out", str(tmp_path / "f.npz")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["features", str(tiny_run), "--source", "test_resnet", "--out", str(tmp_path / "f.npz")]) == 2
    assert "the run's own model" in capsys.readouterr().err
