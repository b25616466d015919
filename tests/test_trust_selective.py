"""Risk-coverage: the curve's shape (coverage up to 1, accuracy at full coverage is plain accuracy, ties kept
together), abstaining on the least certain helps a calibrated model, and the area orders rankings."""

import numpy as np
import pytest

from medxfer.errors import MedxferError
from medxfer.trust.selective import at_coverage, confidence_and_decision, risk_coverage


def calibrated(n, rng):
    y = rng.integers(0, 2, n)
    x = rng.normal(1.5 * y, 1.0)
    p1 = 1 / (1 + np.exp(-(1.5 * x - 1.125)))
    return np.column_stack([1 - p1, p1]), y


def test_curve_shape_and_full_coverage():
    rng = np.random.default_rng(0)
    p, y = calibrated(5000, rng)
    c = risk_coverage(p, y)
    cov, acc = np.array(c["coverage"]), np.array(c["accuracy"])
    assert (np.diff(cov) > 0).all() and cov[-1] == 1.0
    assert acc[-1] == pytest.approx(((p[:, 1] >= 0.5) == y).mean())
    assert np.all(np.diff(c["confidence"]) < 0)
    rows = at_coverage(c, [1.0, 0.8, 0.5, 0.2])
    accs = [r["accuracy"] for r in rows]
    assert accs == sorted(accs) and accs[-1] > accs[0] + 0.1      # abstaining on the least certain helps
    assert all(r["coverage"] <= r["target"] + 1e-12 for r in rows)
    assert c["aurc"] < c["aurc_random"]
    sens = np.array([s for s in c["sensitivity"] if s is not None])
    assert sens[-1] == pytest.approx(((p[:, 1] >= 0.5) & (y == 1)).sum() / (y == 1).sum())


def with_confidence(decision, conf):
    """Two-class probabilities deciding ``decision`` with probability ``conf`` (>= 0.5)."""
    p1 = np.where(decision == 1, conf, 1 - conf)
    return np.column_stack([1 - p1, p1])


def test_area_orders_oracle_model_and_reversed_rankings():
    rng = np.random.default_rng(1)
    p, y = calibrated(3000, rng)
    decision, conf = p.argmax(1), p.max(1)
    correct = decision == y
    oracle = risk_coverage(with_confidence(decision, np.where(correct, 0.99, 0.51)), y)
    model = risk_coverage(p, y)
    reverse = risk_coverage(with_confidence(decision, 1.5 - conf), y)     # least certain kept first
    assert oracle["accuracy_all"] == model["accuracy_all"] == reverse["accuracy_all"]   # same decisions
    assert oracle["risk"][0] == 0.0 and np.all(np.diff(oracle["accuracy"]) <= 1e-12)
    assert oracle["aurc"] < model["aurc"] < model["aurc_random"] < reverse["aurc"]


def test_ties_are_kept_together_and_threshold_decisions():
    p = np.array([[0.3, 0.7], [0.3, 0.7], [0.1, 0.9], [0.6, 0.4]])
    y = np.array([1, 0, 1, 0])
    c = risk_coverage(p, y)
    assert c["n_kept"] == [1, 3, 4]           # the two 0.7s come in together, whatever their order
    assert c["accuracy"] == pytest.approx([1.0, 2 / 3, 3 / 4])
    conf, dec = confidence_and_decision(p, threshold=0.8)
    assert dec.tolist() == [0, 0, 1, 0]
    assert conf == pytest.approx([0.1 / 0.8, 0.1 / 0.8, 0.1 / 0.2, 0.4 / 0.8])
    with pytest.raises(MedxferError, match="binary"):
        risk_coverage(np.ones((2, 3)) / 3, [0, 1], threshold=0.5)
    with pytest.raises(MedxferError, match="coverage levels"):
        at_coverage(c, [0])
