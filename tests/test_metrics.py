"""Tests for medxfer.evaluation.metrics: against scikit-learn, by hand, and by simulation."""

import json
import math


import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from medxfer.errors import MedxferError
from medxfer.evaluation import bootstrap_weights, evaluate
from medxfer.evaluation.metrics import RankedScores

LABELS2 = ["benign", "malignant"]


def binary_data(seed, n=300, shift=1.0, rounding=None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = 1 / (1 + np.exp(-(rng.normal(size=n) + shift * (y - 0.5))))
    if rounding is not None:  # ties
        s = np.round(s, rounding)
    return y, np.c_[1 - s, s]


def test_binary_matches_sklearn_on_random_data():
    for seed in range(5):
        y, p = binary_data(seed, rounding=2 if seed % 2 else None)
        for thr in (0.3, 0.5, 0.62):
            r = evaluate(y, p, LABELS2, threshold=thr)
            pred = (p[:, 1] >= thr).astype(int)
            assert r["auc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
            assert r["average_precision"] == pytest.approx(average_precision_score(y, p[:, 1]))
            assert r["accuracy"] == pytest.approx(accuracy_score(y, pred))
            assert r["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
            assert r["f1"] == pytest.approx(f1_score(y, pred))
            assert r["sensitivity"] == pytest.approx(recall_score(y, pred))
            assert r["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
            assert r["ppv"] == pytest.approx(precision_score(y, pred))
            assert r["npv"] == pytest.approx(precision_score(y, pred, pos_label=0))
            assert r["confusion_matrix"] == confusion_matrix(y, pred).tolist()
            assert r["brier"] == pytest.approx(brier_score_loss(y, p[:, 1]))
            assert r["threshold"] == thr
            arg = p.argmax(1)
            assert r["argmax"]["balanced_accuracy"] == pytest.approx(
                balanced_accuracy_score(y, arg))
            assert r["argmax"]["f1"] == pytest.approx(f1_score(y, arg))


def test_multiclass_matches_sklearn_on_random_data():
    rng = np.random.default_rng(1)
    n, k = 400, 4
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.0
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = ["a", "b", "c", "d"]
    r = evaluate(y, p, labels, threshold=0.9)  # threshold ignored
    pred = p.argmax(1)
    assert r["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    for c, lab in enumerate(labels):
        assert r["per_class_auc"][lab] == pytest.approx(roc_auc_score(y == c, p[:, c]))
    assert r["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert r["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert r["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert r["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    assert r["brier"] == pytest.approx(((p - np.eye(k)[y]) ** 2).sum(1).mean())
    assert r["n"] == n and sum(r["n_per_class"].values()) == n
    assert "sensitivity" not in r


def test_hand_computed_ten_samples():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.4, 0.6, 0.7, 0.2, 0.1, 0.3, 0.45, 0.05])
    r = evaluate(y, np.c_[1 - s, s], LABELS2)
    # at 0.5: TP = 3 (0.9, 0.8, 0.6), FN = 1 (0.4), FP = 1 (0.7), TN = 5
    assert r["sensitivity"] == pytest.approx(3 / 4)
    assert r["specificity"] == pytest.approx(5 / 6)
    assert r["ppv"] == pytest.approx(3 / 4)
    assert r["npv"] == pytest.approx(5 / 6)
    assert r["accuracy"] == pytest.approx(8 / 10)
    assert r["balanced_accuracy"] == pytest.approx((3 / 4 + 5 / 6) / 2)
    assert r["f1"] == pytest.approx(6 / 8)
    assert r["confusion_matrix"] == [[5, 1], [1, 3]]
    # negatives below each positive: 6 + 6 + 4 + 5 = 21 of 4 * 6 pairs
    assert r["auc"] == pytest.approx(21 / 24)
    assert r["n_per_class"] == {"benign": 6, "malignant": 4}
    assert r["positive_label"] == "malignant"
    # the same data with class 0 as the positive one
    r0 = evaluate(1 - y, np.c_[s, 1 - s], LABELS2, positive=0)
    assert r0["sensitivity"] == pytest.approx(3 / 4)
    assert r0["specificity"] == pytest.approx(5 / 6)
    assert r0["auc"] == pytest.approx(21 / 24)
    assert r0["positive_label"] == "benign"
    assert r0["confusion_matrix"] == [[3, 1], [1, 5]]


def test_threshold_moves_sensitivity_and_specificity():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.4, 0.6, 0.7, 0.2, 0.1, 0.3, 0.45, 0.05])
    low = evaluate(y, np.c_[1 - s, s], LABELS2, threshold=0.3)
    high = evaluate(y, np.c_[1 - s, s], LABELS2, threshold=0.7)
    assert (low["sensitivity"], low["specificity"]) == pytest.approx((1.0, 3 / 6))
    assert (high["sensitivity"], high["specificity"]) == pytest.approx((2 / 4, 5 / 6))
    y, p = binary_data(3, n=1000)
    a = evaluate(y, p, LABELS2, threshold=0.3)
    b = evaluate(y, p, LABELS2, threshold=0.7)
    assert a["sensitivity"] > b["sensitivity"] and a["specificity"] < b["specificity"]
    assert a["auc"] == b["auc"]


def test_undefined_metrics_are_none_and_json_is_strict():
    y = np.zeros(20, dtype=int)
    s = np.linspace(0.05, 0.95, 20)
    r = evaluate(y, np.c_[1 - s, s], LABELS2, n_bootstrap=50)
    assert r["auc"] is None and r["sensitivity"] is None and r["balanced_accuracy"] is None
    assert r["average_precision"] is None and r["auc_ci"] is None
    assert r["specificity"] == pytest.approx(0.5)
    assert r["n_bootstrap_used"] == 0
    json.dumps(r, allow_nan=False)
    # nothing predicted positive -> PPV undefined
    y = np.array([0, 1, 0, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4])
    r = evaluate(y, np.c_[1 - s, s], LABELS2, threshold=0.9, n_bootstrap=30)
    assert r["ppv"] is None and r["sensitivity"] == 0.0
    json.dumps(r, allow_nan=False)
    # a class missing from a multi-class test set: macro AUC undefined, the others still there
    p = np.full((6, 3), 1 / 3)
    p[:, 0] += [0.1, 0.2, 0.0, -0.1, 0.05, 0.0]
    p[:, 1] = 1 - p[:, 0] - p[:, 2]
    r = evaluate(np.array([0, 0, 0, 1, 1, 1]), p, ["a", "b", "c"], n_bootstrap=20)
    assert r["auc"] is None and r["per_class_auc"]["c"] is None
    assert r["per_class_auc"]["a"] is not None
    json.dumps(r, allow_nan=False)


def test_values_are_plain_python():
    y, p = binary_data(0, n=100)
    r = evaluate(y, p, LABELS2, groups=np.arange(100) // 4, n_bootstrap=40)

    def check(v):
        if isinstance(v, dict):
            for x in v.values():
                check(x)
        elif isinstance(v, list):
            for x in v:
                check(x)
        else:
            assert v is None or type(v) in (int, float, str), (v, type(v))

    check(r)
    assert r["bootstrap_unit"] == "group" and r["n_bootstrap"] == 40


def test_weighted_auc_and_ap_equal_sklearn_on_an_explicit_resample():
    y, p = binary_data(7, n=150, rounding=1)  # many ties
    s = p[:, 1]
    w = bootstrap_weights(len(y), 5, seed=3)
    ranked = RankedScores(s, y == 1)
    auc, ap = ranked.auc(w), ranked.average_precision(w)
    for b in range(5):
        idx = np.repeat(np.arange(len(y)), w[b].astype(int))
        assert auc[b] == pytest.approx(roc_auc_score(y[idx], s[idx]))
        assert ap[b] == pytest.approx(average_precision_score(y[idx], s[idx]))


def test_bootstrap_weights_resample_whole_groups():
    groups = np.repeat(np.array(["p3", "p1", "p7", "p2", "p9"]), [1, 4, 2, 3, 5])
    rng_perm = np.random.default_rng(0).permutation(len(groups))
    groups = groups[rng_perm]
    w = bootstrap_weights(len(groups), 200, seed=1, groups=groups)
    assert w.shape == (200, len(groups))
    for g in np.unique(groups):
        block = w[:, groups == g]
        assert np.all(block == block[:, :1])  # every image of a patient drawn together
    # five patients drawn per resample
    first = np.array([w[:, np.flatnonzero(groups == g)[0]] for g in np.unique(groups)])
    assert np.all(first.sum(0) == 5)
    img = bootstrap_weights(len(groups), 200, seed=1)
    assert np.all(img.sum(1) == len(groups))


def test_group_bootstrap_widens_interval_for_correlated_images():
    rng = np.random.default_rng(5)
    n_pat, per = 60, 8
    y_pat = rng.integers(0, 2, n_pat)
    s_pat = 1 / (1 + np.exp(-(rng.normal(size=n_pat) + 1.2 * (y_pat - 0.5))))
    y, s = np.repeat(y_pat, per), np.repeat(s_pat, per)  # images of a patient are copies
    groups = np.repeat(np.arange(n_pat), per)
    p = np.c_[1 - s, s]
    by_img = evaluate(y, p, LABELS2, n_bootstrap=500, seed=0)
    by_pat = evaluate(y, p, LABELS2, n_bootstrap=500, seed=0, groups=groups)
    for name in ("auc", "accuracy", "sensitivity"):
        wi = by_img[f"{name}_ci"][1] - by_img[f"{name}_ci"][0]
        wp = by_pat[f"{name}_ci"][1] - by_pat[f"{name}_ci"][0]
        assert wp > 2 * wi, (name, wi, wp)  # about sqrt(8) wider


def test_bootstrap_is_seeded():
    y, p = binary_data(2, n=200)
    a = evaluate(y, p, LABELS2, n_bootstrap=100, seed=4)
    b = evaluate(y, p, LABELS2, n_bootstrap=100, seed=4)
    c = evaluate(y, p, LABELS2, n_bootstrap=100, seed=5)
    assert a == b and a["auc_ci"] != c["auc_ci"]
    assert a["auc_ci"][0] < a["auc"] < a["auc_ci"][1]


def test_bootstrap_ci_coverage_binormal():
    d = 1.0
    true_auc = norm.cdf(d / math.sqrt(2))
    rng = np.random.default_rng(2024)
    n_pos = n_neg = 100
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    hits = 0
    trials = 200
    for t in range(trials):
        score = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]
        s = 1 / (1 + np.exp(-score))
        r = evaluate(y, np.c_[1 - s, s], LABELS2, n_bootstrap=300, seed=t)
        lo, hi = r["auc_ci"]
        hits += lo <= true_auc <= hi
    assert 0.88 <= hits / trials <= 0.99, hits / trials


def test_bootstrap_2000_patient_resamples_1000_images():
    """Every resample is used (its speed is measured in bench/bench_bootstrap.py, not here)."""
    y, p = binary_data(0, n=1000)
    r = evaluate(y, p, LABELS2, n_bootstrap=2000, groups=np.arange(1000) // 2)
    assert r["n_bootstrap_used"] == 2000 and r["auc_ci"][0] < r["auc"] < r["auc_ci"][1]


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(probs=[[0.2, 0.2], [0.5, 0.5]]), "must sum to 1"),
    (dict(probs=[0.2, 0.5]), "'probs'"),
    (dict(labels=["a"]), "'labels'"),
    (dict(y_true=[0, 2]), "'y_true'"),
    (dict(y_true=[0.5, 1.0]), "'y_true'"),
    (dict(positive=2), "'positive'"),
    (dict(threshold="high"), "'threshold'"),
    (dict(groups=[1, 2, 3]), "'groups'"),
    (dict(n_bootstrap=-1), "'n_bootstrap'"),
])
def test_bad_input_raises_medxfer_error(kwargs, fragment):
    args = dict(y_true=[0, 1], probs=[[0.7, 0.3], [0.4, 0.6]], labels=["a", "b"])
    args.update(kwargs)
    with pytest.raises(MedxferError, match=fragment):
        evaluate(args.pop("y_true"), args.pop("probs"), args.pop("labels"), **args)


def test_ece_reported_and_small_for_calibrated_probabilities():
    rng = np.random.default_rng(0)
    s = rng.uniform(size=20000)
    y = (rng.uniform(size=20000) < s).astype(int)
    r = evaluate(y, np.c_[1 - s, s], LABELS2)
    assert r["ece"] < 0.03
    sharp = 1 / (1 + np.exp(-4 * np.log(s / (1 - s))))
    assert evaluate(y, np.c_[1 - sharp, sharp], LABELS2)["ece"] > 0.1
