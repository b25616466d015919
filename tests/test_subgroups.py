"""Subgroup results: per-group metrics as scikit-learn computes them, bootstrap intervals, flags, small groups."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from medxfer.errors import MedxferError
from medxfer.evaluation.metrics import evaluate
from medxfer.evaluation.subgroups import MISSING, run_subgroups, subgroup_metrics, subgroup_section
from tests.conftest import fake_run

LABELS = ["benign", "malignant"]
THRESHOLD = 0.5


def scores(n: int, rng, quality: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels and P(positive = 1): ``quality`` 0 is noise, larger separates the classes."""
    y = rng.integers(0, 2, n)
    logit = quality * (2 * y - 1) + rng.normal(0, 1, n)
    return y, 1 / (1 + np.exp(-logit))


@pytest.fixture(scope="module")
def data():
    """600 images: site C (150) is built to be much worse (noise scores); 'coin' is a random split."""
    rng = np.random.default_rng(0)
    y, p = scores(600, rng, 2.0)
    site = np.array(["A"] * 250 + ["B"] * 200 + ["C"] * 150)
    yc, pc = scores(150, rng, 0.0)
    y[site == "C"], p[site == "C"] = yc, pc
    probs = np.stack([1 - p, p], 1)
    coin = rng.choice(["heads", "tails"], 600)
    return y, probs, {"site": site, "coin": coin}


def by_hand(y, p, thr=THRESHOLD):
    pred = p >= thr
    return (roc_auc_score(y, p), (pred & (y == 1)).sum() / (y == 1).sum(), (~pred & (y == 0)).sum() / (y == 0).sum())


def test_metrics_per_group_match_sklearn_and_intervals_hold_them(data):
    y, probs, cols = data
    overall = evaluate(y, probs, LABELS, positive=1, threshold=THRESHOLD, n_bootstrap=0)
    sg = subgroup_metrics(y, probs, LABELS, cols, positive=1, threshold=THRESHOLD, n_bootstrap=300, seed=1,
                          overall=overall)
    assert list(sg) == ["site", "coin"] and list(sg["site"]) == ["A", "B", "C"]
    for column, values in cols.items():
        for value, g in sg[column].items():
            m = values == value
            auc, sens, spec = by_hand(y[m], probs[m, 1])
            assert g["n"] == m.sum() and g["n_pos"] == (y[m] == 1).sum() and g["n_neg"] == (y[m] == 0).sum()
            assert g["auc"] == pytest.approx(auc, abs=1e-12)
            assert g["sensitivity"] == pytest.approx(sens) and g["specificity"] == pytest.approx(spec)
            for k in ("auc", "sensitivity", "specificity"):
                lo, hi = g[f"{k}_ci"]
                assert lo <= g[k] <= hi
            assert g["too_small"] is False
    json.dumps(sg, allow_nan=False)  # JSON-ready, no NaN


def test_a_much_worse_group_is_flagged_and_a_random_one_is_not(data):
    y, probs, cols = data
    overall = evaluate(y, probs, LABELS, positive=1, threshold=THRESHOLD, n_bootstrap=0)
    sg = subgroup_metrics(y, probs, LABELS, cols, positive=1, threshold=THRESHOLD, n_bootstrap=300, seed=0,
                          overall=overall)
    bad = sg["site"]["C"]
    assert bad["flag"] and bad["flagged"]["auc"] == "below" and bad["auc_ci"][1] < overall["auc"]
    assert sg["site"]["A"]["flagged"].get("auc") != "below"
    assert not any(g["flag"] for g in sg["coin"].values())
    # the overall values default to the whole set's point estimates
    again = subgroup_metrics(y, probs, LABELS, cols, positive=1, threshold=THRESHOLD, n_bootstrap=300, seed=0)
    assert again == sg
    html = subgroup_section(sg)
    assert html.count("<span class='flag'>C</span>") == 1 and "AUC below overall" in html
    assert "<span class='flag'>heads</span>" not in html and "<h3>coin</h3>" in html


def test_small_groups_missing_values_and_one_class_groups():
    rng = np.random.default_rng(3)
    y, p = scores(60, rng, 1.5)
    probs = np.stack([1 - p, p], 1)
    sex = np.array(["F"] * 30 + ["M"] * 25 + [None, np.nan, "", "X", "X"], dtype=object)
    y[-2:] = 1                                            # group X: two positives, no negative
    scanner = pd.Series([1.0] * 40 + [2.0] * 20)          # floats named without '.0'
    sg = subgroup_metrics(y, probs, LABELS, {"sex": sex, "scanner": scanner}, positive=1, threshold=0.5,
                          n_bootstrap=100, min_n=10)
    assert list(sg["sex"]) == ["F", "M", "X", MISSING] and list(sg["scanner"]) == ["1", "2"]
    missing = sg["sex"][MISSING]
    assert missing["n"] == 3 and missing["too_small"] and missing["auc"] is None and missing["auc_ci"] is None
    assert sg["sex"]["X"]["too_small"] and sg["sex"]["X"]["n_neg"] == 0 and not sg["sex"]["X"]["flag"]
    assert not sg["sex"]["F"]["too_small"] and sg["sex"]["F"]["auc"] is not None
    assert "too small" in subgroup_section(sg)
    json.dumps(sg, allow_nan=False)


def test_patients_are_resampled_as_in_evaluate():
    rng = np.random.default_rng(5)
    y, p = scores(80, rng, 1.0)
    probs = np.stack([1 - p, p], 1)
    patients = np.repeat([f"p-{i:03d}" for i in range(40)], 2)
    col = np.array(["a"] * 40 + ["b"] * 40)
    sg = subgroup_metrics(y, probs, LABELS, {"col": col}, positive=1, threshold=0.4, groups=patients,
                          n_bootstrap=200, seed=7)
    m = col == "a"
    ref = evaluate(y[m], probs[m], LABELS, positive=1, threshold=0.4, groups=patients[m], n_bootstrap=200, seed=7)
    assert ref["bootstrap_unit"] == "group"
    for k in ("auc", "sensitivity", "specificity"):
        assert sg["col"]["a"][f"{k}_ci"] == ref[f"{k}_ci"]
    assert sg["col"]["a"]["patients"] == 20


def test_refuses_multiclass_and_mismatched_columns():
    probs = np.full((4, 3), 1 / 3)
    with pytest.raises(MedxferError, match="two-class"):
        subgroup_metrics([0, 1, 2, 0], probs, ["a", "b", "c"], {"s": list("aabb")}, positive=1, threshold=0.5)
    with pytest.raises(MedxferError, match="one per image"):
        subgroup_metrics([0, 1], [[0.5, 0.5]] * 2, LABELS, {"s": ["a"]}, positive=1, threshold=0.5)


def test_run_subgroups_on_a_runs_test_predictions(data, tmp_path):
    y, probs, cols = data
    ids = [f"test/{i:06d}" for i in range(len(y))]
    preds = pd.DataFrame({"split": "test", "sample_id": ids, "label": [LABELS[v] for v in y],
                          "prob_benign": probs[:, 0], "prob_malignant": probs[:, 1]})
    overall = evaluate(y, probs, LABELS, positive=1, threshold=0.5, n_bootstrap=0)
    run = fake_run(tmp_path, {"test": overall, "threshold": 0.5, "seed": 0}, predictions=preds)
    table = pd.DataFrame({"sample_id": ids[:-50], "site": cols["site"][:-50]})   # 50 samples not listed
    sg = run_subgroups(run, table, n_bootstrap=100)
    assert list(sg) == ["site"] and sg["site"][MISSING]["n"] == 50
    assert sg["site"]["A"] == subgroup_metrics(y[:250], probs[:250], LABELS, {"site": cols["site"][:250]},
                                               positive=1, threshold=0.5, n_bootstrap=100, seed=0,
                                               overall=overall)["site"]["A"]
    assert sg["site"]["C"]["flag"]
    # columns of predictions.csv itself, when the run kept them
    run.predictions = preds.assign(coin=cols["coin"])
    assert list(run_subgroups(run, n_bootstrap=0)) == ["coin"]
