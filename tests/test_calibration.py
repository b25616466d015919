"""Tests for medxfer.evaluation.calibration: temperature scaling, thresholds, reliability."""

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.metrics import log_loss

from medxfer.errors import MedxferError
from medxfer.evaluation import (
    apply_temperature,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    parse_threshold_rule,
    reliability_curve,
)

RULE_MESSAGE = ("The threshold rule must be youden, sensitivity=S, specificity=S or a number in "
                "(0, 1). Got '{}' instead.")


@st.composite
def logits_and_t(draw):
    k = draw(st.integers(2, 10))
    n = draw(st.integers(1, 8))
    z = draw(arrays(np.float64, (n, k), elements=st.floats(-1e3, 1e3, allow_nan=False)))
    t = draw(st.floats(0.05, 20))
    return z, t


@settings(max_examples=200, deadline=None)
@given(logits_and_t())
def test_temperature_keeps_the_argmax(case):
    z, t = case
    p = apply_temperature(z, t)
    assert p.shape == z.shape and np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-12)
    top = z.argmax(1)
    # the logit argmax always keeps the highest probability (ties may appear after underflow) ...
    assert np.all(p[np.arange(len(z)), top] == p.max(1))
    # ... and is the argmax whenever the top two logits are clearly apart
    srt = np.sort(z, axis=1)
    gap = srt[:, -1] - srt[:, -2]
    apart = gap > 1e-9 * np.maximum(1, np.abs(srt[:, -1]))
    assume(apart.any())
    # the gap must also survive exp(): above underflow of the scaled difference
    clear = apart & (gap / t < 700)
    assert np.all(p[clear].argmax(1) == top[clear])


def test_apply_temperature_is_stable_and_validates():
    z = np.array([[1e4, 0.0, -1e4], [5.0, 5.0, 5.0]])
    p = apply_temperature(z, 0.05)
    np.testing.assert_allclose(p, [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(apply_temperature([[0.0, math.log(3)]], 1.0), [[0.25, 0.75]])
    with pytest.raises(MedxferError, match="temperature"):
        apply_temperature(z, 0)
    with pytest.raises(MedxferError, match="'logits'"):
        apply_temperature([1.0, 2.0], 1.0)


def calibrated_logits(seed, n=4000, k=4):
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=1.5, size=(n, k))
    p = apply_temperature(z, 1.0)
    y = (rng.uniform(size=(n, 1)) > np.cumsum(p, axis=1)).sum(1)  # y ~ Categorical(p)
    return z, np.minimum(y, k - 1)


def test_fit_temperature_undoes_overconfidence():
    z, y = calibrated_logits(0)
    t = fit_temperature(5 * z, y)
    assert t > 1 and 3.5 < t < 7
    nll_before = log_loss(y, apply_temperature(5 * z, 1.0), labels=range(4))
    nll_after = log_loss(y, apply_temperature(5 * z, t), labels=range(4))
    assert nll_after < nll_before - 0.1
    assert 0.85 < fit_temperature(z, y) < 1.15  # already calibrated -> about 1


def test_fit_temperature_is_the_grid_minimum():
    z, y = calibrated_logits(1, n=500, k=3)
    z = 2.3 * z
    t = fit_temperature(z, y)
    grid = np.exp(np.linspace(math.log(0.05), math.log(20), 4001))
    nll = [log_loss(y, apply_temperature(z, g), labels=range(3)) for g in grid[::10]]
    best = grid[::10][int(np.argmin(nll))]
    assert t == pytest.approx(best, rel=0.03)


def test_fit_temperature_degenerate_and_bounds():
    assert fit_temperature(np.zeros((10, 3)), np.arange(10) % 3) == 1.0
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, int)) == 1.0
    # separable data: the NLL falls towards 0 as T -> 0, so T ends near the lower bound
    z = np.array([[2.0, -2.0], [-1.0, 1.0], [3.0, 0.0]])
    t = fit_temperature(z, [0, 1, 0])
    assert 0.05 <= t < 0.1
    assert log_loss([0, 1, 0], apply_temperature(z, t), labels=[0, 1]) < 1e-10
    with pytest.raises(MedxferError, match="'y_true'"):
        fit_temperature(z, [0, 2, 0])


def test_youden_on_a_constructed_case():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.7, 0.8, 0.9])
    # perfect separation: everything >= 0.4 positive; the threshold sits halfway to the next score
    assert choose_threshold(y, p, "youden") == pytest.approx((0.4 + 0.35) / 2)
    # J = 0.75 at both 0.7 (3 TP, 0 FP) and 0.4 (4 TP, 1 FP): the tie goes to the one nearer 0.5
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    assert choose_threshold(y, p, "youden") == pytest.approx((0.4 + 0.3) / 2)
    # J = 0.75 at 0.7 (3 TP, 0 FP) and 0.2 (4 TP, 1 FP): 0.7 is nearer 0.5
    p = np.array([0.6, 0.1, 0.05, 0.03, 0.9, 0.8, 0.7, 0.2])
    assert choose_threshold(y, p, "youden") == pytest.approx((0.7 + 0.6) / 2)
    # positives given as another class index
    assert choose_threshold(np.where(y == 1, 0, 1), p, "youden", positive=0) == pytest.approx((0.7 + 0.6) / 2)


def test_thresholds_never_sit_on_a_score_so_engine_noise_cannot_flip_a_prediction():
    """A threshold equal to a validation score flipped 5 of 1000 CXR14 images between ONNX and PyTorch."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    p = np.round(1 / (1 + np.exp(-(rng.normal(size=400) + 2 * (y - 0.5)))), 4)  # ties included
    for rule in ("youden", "sensitivity=0.9", "specificity=0.8", "sensitivity=1", "specificity=1"):
        t = choose_threshold(y, p, rule)
        gap = np.abs(p - t).min()
        assert gap > 1e-6, (rule, t)
        for noise in (1e-7, -1e-7):  # a last-digits difference between two engines
            assert np.array_equal(p + noise >= t, p >= t), rule
        chosen = p[p >= t]
        if len(chosen) and (p < t).any():  # halfway between the lowest positive and the next score down
            assert t == pytest.approx((chosen.min() + p[p < t].max()) / 2)
    # the lowest score is a positive, so sensitivity=1 calls everything positive: halfway down to 0
    y, p = np.array([1, 0, 1, 0]), np.array([0.2, 0.4, 0.9, 0.3])
    assert choose_threshold(y, p, "sensitivity=1") == pytest.approx(0.1)


def rates(y, p, t):
    pred = p >= t
    return (pred & (y == 1)).sum() / (y == 1).sum(), (~pred & (y == 0)).sum() / (y == 0).sum()


def test_sensitivity_and_specificity_rules_on_their_own_data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = 1 / (1 + np.exp(-(rng.normal(size=500) + 1.5 * (y - 0.5))))
    t = choose_threshold(y, p, "sensitivity=0.95")
    sens, _ = rates(y, p, t)
    assert sens >= 0.95
    above = p[p > p[p >= t].min()].min()  # the next operating point up no longer reaches it
    assert rates(y, p, above)[0] < 0.95
    t = choose_threshold(y, p, "specificity=0.9")
    _, spec = rates(y, p, t)
    assert spec >= 0.9
    below = p[p < t].max()
    assert rates(y, p, below)[1] < 0.9
    for rule in ("youden", "sensitivity=1", "specificity=1", "sensitivity=0.01"):
        assert math.isfinite(choose_threshold(y, p, rule))


def test_specificity_one_with_a_negative_on_top_is_finite():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.6, 1.0, 0.5, 0.2])
    t = choose_threshold(y, p, "specificity=1")
    assert math.isfinite(t) and t > 1.0 and not np.any(p >= t)


def test_fixed_rules_and_parsing():
    assert choose_threshold([0, 1], [0.2, 0.8], "argmax") == 0.5
    assert choose_threshold([0, 1], [0.2, 0.8], 0.3) == 0.3
    assert choose_threshold([0, 1], [0.2, 0.8], "0.25") == 0.25
    assert parse_threshold_rule(" Youden ") == "youden"
    assert parse_threshold_rule("sensitivity=0.95") == "sensitivity=0.95"
    assert parse_threshold_rule("specificity=.9") == "specificity=0.9"
    assert parse_threshold_rule("0.3") == 0.3
    assert parse_threshold_rule(0.7) == 0.7


@pytest.mark.parametrize("bad", ["youdn", "sensitivity=1.5", "sensitivity=0", "specificity=",
                                 "sensitivity=x", "0", "1", "1.5", "nan", "", "spec=0.9"])
def test_bad_rules_raise_with_the_message(bad):
    with pytest.raises(MedxferError) as info:
        parse_threshold_rule(bad)
    assert str(info.value) == RULE_MESSAGE.format(bad)
    with pytest.raises(MedxferError) as info:
        choose_threshold([0, 1], [0.2, 0.8], bad)
    assert str(info.value) == RULE_MESSAGE.format(bad)


def test_bad_numeric_rule_message():
    with pytest.raises(MedxferError) as info:
        parse_threshold_rule(1.5)
    assert str(info.value) == RULE_MESSAGE.format("1.5")


def test_choose_threshold_needs_both_classes():
    with pytest.raises(MedxferError, match="both classes"):
        choose_threshold([1, 1, 1], [0.2, 0.5, 0.9], "youden")


def test_ece_near_zero_when_calibrated_and_large_when_overconfident():
    rng = np.random.default_rng(0)
    n = 20000
    z, y = calibrated_logits(3, n=n, k=3)
    assert expected_calibration_error(y, apply_temperature(z, 1.0)) < 0.03
    assert expected_calibration_error(y, apply_temperature(z, 0.3)) > 0.1
    s = rng.uniform(size=n)
    yb = (rng.uniform(size=n) < s).astype(int)
    assert expected_calibration_error(yb, s) < 0.03  # 1-D P(class 1) accepted


def test_ece_and_reliability_curve_by_hand():
    # confidences 0.9 (correct), 0.9 (wrong), 0.6 (correct), 0.55 (correct)
    y = np.array([0, 1, 1, 0])
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.55, 0.45]])
    # bins of width 0.2: (0.8, 1.0] has conf 0.9, acc 0.5; (0.4, 0.6] has conf 0.575, acc 1
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1 - 0.575)
    assert expected_calibration_error(y, p, n_bins=5) == pytest.approx(expected)
    curve = reliability_curve(y, p, n_bins=5)
    assert curve["bin_edges"] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert curve["counts"] == [0, 0, 2, 0, 2]
    assert curve["confidence"][2] == pytest.approx(0.575) and curve["confidence"][0] is None
    assert curve["accuracy"][4] == pytest.approx(0.5)
    assert curve["ece"] == pytest.approx(expected)
    assert len(reliability_curve(y, p)["counts"]) == 15


def test_a_temperature_at_its_bound_is_a_warning(caplog):
    """8 validation images whose tiny logits separate perfectly: the NLL falls as T shrinks, the search stops
    at its lower bound, and the run must say so rather than pass it on as a calibration."""
    import logging

    from medxfer.evaluation.calibration import T_MIN
    from medxfer.evaluation.tasks import fit_calibration

    y = np.array([0, 1] * 4)
    z = np.stack([np.where(y == 0, 0.01, -0.01), np.where(y == 1, 0.01, -0.01)], axis=1)
    with caplog.at_level(logging.WARNING, logger="medxfer"):
        t = fit_calibration("binary", z, y)
    assert t == pytest.approx(T_MIN, rel=0.02)
    assert "reached its bound" in caplog.text and "8 validation samples" in caplog.text
    caplog.clear()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    z = np.stack([-(y - 0.5) * 2 + rng.normal(0, 1.5, 200), (y - 0.5) * 2 + rng.normal(0, 1.5, 200)], axis=1)
    with caplog.at_level(logging.WARNING, logger="medxfer"):
        fit_calibration("binary", z, y)
    assert "bound" not in caplog.text
