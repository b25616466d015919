"""Tests for medxfer.evaluation.stats: DeLong, paired bootstrap, summaries over runs."""

import json
import math
import statistics

import numpy as np
import pytest
from scipy.stats import norm, rankdata
from sklearn.metrics import roc_auc_score

from medxfer.errors import MedxferError
from medxfer.evaluation import bootstrap_weights, delong_test, paired_bootstrap, summarize
from medxfer.evaluation.stats import _midranks


def correlated_scores(seed, n=300, d_a=1.0, d_b=1.0, rho=0.6):
    """Two binormal predictors of one label, correlated through a shared component."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    shared = rng.normal(size=n)
    a = math.sqrt(rho) * shared + math.sqrt(1 - rho) * rng.normal(size=n) + d_a * y
    b = math.sqrt(rho) * shared + math.sqrt(1 - rho) * rng.normal(size=n) + d_b * y
    return y, a, b


def delong_by_definition(y, a, b):
    """DeLong et al. 1988 written out with the pairwise kernel psi (O(m n)), no ranks."""
    pos, neg = y == 1, y == 0
    comps = []
    for s in (a, b):
        x, z = s[pos][:, None], s[neg][None, :]
        psi = (x > z) + 0.5 * (x == z)
        comps.append((psi.mean(), psi.mean(1), psi.mean(0)))  # AUC, V10 (positives), V01
    m, n = pos.sum(), neg.sum()
    v10 = np.array([c[1] for c in comps])
    v01 = np.array([c[2] for c in comps])
    s10 = (v10 - v10.mean(1, keepdims=True)) @ (v10 - v10.mean(1, keepdims=True)).T / (m - 1)
    s01 = (v01 - v01.mean(1, keepdims=True)) @ (v01 - v01.mean(1, keepdims=True)).T / (n - 1)
    cov = s10 / m + s01 / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = comps[0][0] - comps[1][0]
    z = diff / math.sqrt(var)
    return comps[0][0], comps[1][0], z, 2 * norm.sf(abs(z))


def test_midranks_match_scipy():
    x = np.array([3.0, 1.0, 2.0, 3.0, 3.0, 0.5, 2.0])
    np.testing.assert_allclose(_midranks(x), rankdata(x))


def test_identical_predictors():
    y, a, _ = correlated_scores(0)
    r = delong_test(y, a, a.copy())
    assert r["diff"] == 0.0 and r["z"] == 0.0 and r["p_value"] == 1.0
    assert r["ci_diff"] == [0.0, 0.0]


def test_delong_equals_the_definition_on_a_tiny_case_with_ties():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    a = np.array([0.9, 0.8, 0.5, 0.5, 0.5, 0.3, 0.6, 0.1, 0.2])
    b = np.array([0.7, 0.4, 0.6, 0.9, 0.4, 0.5, 0.2, 0.3, 0.8])
    r = delong_test(y, a, b)
    auc_a, auc_b, z, p = delong_by_definition(y, a, b)
    assert r["auc_a"] == pytest.approx(auc_a) and r["auc_a"] == pytest.approx(roc_auc_score(y, a))
    assert r["auc_b"] == pytest.approx(auc_b) and r["auc_b"] == pytest.approx(roc_auc_score(y, b))
    assert r["z"] == pytest.approx(z) and r["p_value"] == pytest.approx(p)
    lo, hi = r["ci_diff"]
    assert (lo + hi) / 2 == pytest.approx(r["diff"])
    assert (hi - lo) / 2 == pytest.approx(1.959964 * r["se"], rel=1e-5)
    json.dumps(r, allow_nan=False)


def test_delong_equals_the_definition_on_random_data():
    for seed in range(3):
        y, a, b = correlated_scores(seed, n=250, d_b=0.6)
        a, b = np.round(a, 1), np.round(b, 1)  # ties
        r = delong_test(y, a, b)
        auc_a, auc_b, z, p = delong_by_definition(y, a, b)
        assert r["auc_a"] == pytest.approx(roc_auc_score(y, a))
        assert r["auc_b"] == pytest.approx(roc_auc_score(y, b))
        assert r["z"] == pytest.approx(z) and r["p_value"] == pytest.approx(p)
    # class indices with another positive class
    r0 = delong_test(1 - y, a, b, positive=0)
    assert r0["z"] == pytest.approx(r["z"])


def test_delong_agrees_loosely_with_the_paired_bootstrap():
    y, a, b = correlated_scores(11, n=600, d_b=0.7)
    d = delong_test(y, a, b)
    bs = paired_bootstrap(y, a, b, n_bootstrap=2000, seed=0)
    assert bs["diff"] == pytest.approx(d["diff"])
    se_boot = (bs["ci_diff"][1] - bs["ci_diff"][0]) / (2 * 1.96)
    assert se_boot == pytest.approx(d["se"], rel=0.2)
    assert d["p_value"] < 0.05 and bs["p_value"] < 0.05
    assert bs["ci_diff"][0] > 0 and d["ci_diff"][0] > 0


def test_delong_type_one_error_under_the_null():
    rejections = 0
    trials = 300
    for t in range(trials):
        y, a, b = correlated_scores(100 + t, n=150, rho=0.5)
        rejections += delong_test(y, a, b)["p_value"] < 0.05
    assert 0.02 <= rejections / trials <= 0.09, rejections / trials


def test_undefined_cases_do_not_crash():
    r = delong_test(np.ones(5, int), np.linspace(0, 1, 5), np.linspace(1, 0, 5))
    assert r["auc_a"] is None and r["p_value"] is None
    r = delong_test([1, 0, 0], [0.9, 0.1, 0.2], [0.3, 0.5, 0.1])  # one positive: no variance
    assert r["auc_a"] == 1.0 and r["auc_b"] == 0.5 and r["z"] is None
    r = paired_bootstrap(np.zeros(5, int), np.linspace(0, 1, 5), np.linspace(1, 0, 5))
    assert r["diff"] is None and r["ci_diff"] is None
    with pytest.raises(MedxferError, match="1-D"):
        delong_test([0, 1], [0.2, 0.3, 0.4], [0.1, 0.2])
    with pytest.raises(MedxferError, match="finite"):
        delong_test([0, 1], [0.2, np.nan], [0.1, 0.2])


def test_paired_bootstrap_properties():
    y, a, b = correlated_scores(3, n=200, d_b=0.5)
    groups = np.arange(200) // 4
    r = paired_bootstrap(y, a, b, n_bootstrap=500, seed=1, groups=groups)
    assert r == paired_bootstrap(y, a, b, n_bootstrap=500, seed=1, groups=groups)
    s = paired_bootstrap(y, b, a, n_bootstrap=500, seed=1, groups=groups)
    assert s["diff"] == pytest.approx(-r["diff"])
    assert s["ci_diff"] == pytest.approx([-r["ci_diff"][1], -r["ci_diff"][0]])
    assert s["p_value"] == pytest.approx(r["p_value"])
    assert r["auc_a"] == pytest.approx(roc_auc_score(y, a))
    assert r["n_bootstrap_used"] == 500 and 0 <= r["p_value"] <= 1
    same = paired_bootstrap(y, a, a, n_bootstrap=100)
    assert same["p_value"] == 1.0 and same["ci_diff"] == [0.0, 0.0]
    json.dumps(r, allow_nan=False)
    with pytest.raises(MedxferError, match="'groups'"):
        paired_bootstrap(y, a, b, groups=[1, 2])


def test_paired_bootstrap_recomputed_with_sklearn():
    y, a, b = correlated_scores(8, n=120, d_b=0.6)
    n_boot = 200
    r = paired_bootstrap(y, a, b, n_bootstrap=n_boot, seed=9)
    w = bootstrap_weights(len(y), n_boot, seed=9)  # the same resamples
    diffs = []
    for row in w:
        idx = np.repeat(np.arange(len(y)), row.astype(int))
        diffs.append(roc_auc_score(y[idx], a[idx]) - roc_auc_score(y[idx], b[idx]))
    diffs = np.array(diffs)
    assert r["n_bootstrap_used"] == n_boot
    assert r["ci_diff"] == pytest.approx(list(np.percentile(diffs, [2.5, 97.5])))
    other_side = np.mean(diffs <= 0) if r["diff"] > 0 else np.mean(diffs >= 0)
    assert 0 < other_side < 0.5
    assert r["p_value"] == pytest.approx(min(1.0, 2 * other_side))


def test_summarize():
    vals = [0.91, 0.93, 0.92, 0.95]
    r = summarize(vals)
    assert r["mean"] == pytest.approx(statistics.mean(vals))
    assert r["sd"] == pytest.approx(statistics.stdev(vals))
    assert r["n"] == 4 and r["values"] == vals
    assert summarize([0.9]) == {"mean": 0.9, "sd": None, "n": 1, "values": [0.9]}
    assert summarize([]) == {"mean": None, "sd": None, "n": 0, "values": []}
    r = summarize([0.8, None, float("nan"), 0.9])
    assert r["n"] == 2 and r["mean"] == pytest.approx(0.85)
    assert r["values"] == [0.8, None, None, 0.9]
    json.dumps(r, allow_nan=False)
