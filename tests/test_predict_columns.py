"""predict's table shows the threshold beside the probability it applies to, so 'prob 0.34 -> malignant'
reads as the rule it is (the validation threshold, not 0.5)."""

from __future__ import annotations

import json

import pandas as pd

import medxfer
from tests.faults.conftest import cli


def test_the_threshold_is_a_column_and_explains_every_decision(tiny_run, small_npz):
    p = medxfer.Predictor(tiny_run)
    meta = json.loads((tiny_run / "model.json").read_text())
    df = p.predict([small_npz])
    t = df["threshold_malignant"]
    assert (t == meta["threshold"]).all()
    assert ((df["prob_malignant"] >= t) == (df["predicted"] == "malignant")).all()
    assert list(df.columns)[-1] == "predicted"


def test_the_cli_table_has_it_too(tiny_run, small_npz, tmp_path):
    code, text = cli("predict", tiny_run, small_npz, "--out", tmp_path / "p.csv")
    assert code == 0, text
    assert "threshold_malignant" in pd.read_csv(tmp_path / "p.csv").columns
