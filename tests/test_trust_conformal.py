"""Conformal sets: per-class coverage under label shift (Mondrian) where marginal under-covers, the
"include always" rule for small classes, multi-label and ordinal sets, and clear errors."""

import json

import numpy as np
import pytest

from medxfer.errors import MedxferError
from medxfer.trust.conformal import calibrate, coverage_by_class, min_samples, prediction_sets, set_text


def shifted(n, prior1, rng, cal_prior1=0.1):
    """Two Gaussian classes (means 0 and 1.5, sd 1); probabilities are the true posteriors under the
    calibration prior ``cal_prior1`` (calibrated on validation), labels drawn with prior ``prior1``."""
    y = (rng.random(n) < prior1).astype(int)
    x = rng.normal(1.5 * y, 1.0)
    logit = 1.5 * x - 1.125 + np.log(cal_prior1 / (1 - cal_prior1))
    p1 = 1 / (1 + np.exp(-logit))
    return np.column_stack([1 - p1, p1]), y


def test_mondrian_covers_every_class_under_label_shift_where_marginal_does_not():
    rng = np.random.default_rng(0)
    alpha, mondrian, marginal = 0.1, [], []
    for _ in range(20):  # average over calibration draws: the guarantee is in expectation over them
        pv, yv = shifted(3000, 0.1, rng)           # validation: 10% class 1
        pt, yt = shifted(4000, 0.5, rng)           # new data: 50% class 1 (label shift)
        for method, acc in (("mondrian", mondrian), ("marginal", marginal)):
            rec = calibrate(pv, yv, alpha, method=method)
            rows = coverage_by_class(prediction_sets(pt, rec, nonempty=False), yt)
            acc.append([r["coverage"] for r in rows])
    mondrian, marginal = np.mean(mondrian, axis=0), np.mean(marginal, axis=0)
    assert mondrian[0] >= 0.9 - 0.01 and mondrian[1] >= 0.9 - 0.01     # per class, within sampling tolerance
    assert mondrian[0] <= 0.93 and mondrian[1] <= 0.93                  # and not trivially (all sets full)
    assert marginal[1] < 0.8            # the rare class in validation is under-covered by a pooled threshold
    assert marginal[2] < 0.9 - 0.02     # and so is the whole shifted batch


def test_exact_finite_sample_coverage_over_many_seeds():
    """Small calibration sets: coverage >= 1 - alpha on average over seeds (the finite-sample bound)."""
    rng = np.random.default_rng(1)
    cov = []
    for _ in range(400):
        pv, yv = shifted(60, 0.5, rng, cal_prior1=0.5)
        pt, yt = shifted(200, 0.5, rng, cal_prior1=0.5)
        rec = calibrate(pv, yv, 0.2)
        cov.append([r["coverage"] for r in coverage_by_class(prediction_sets(pt, rec, nonempty=False), yt)[:2]])
    mean = np.mean(cov, axis=0)
    assert (mean >= 0.8 - 0.01).all(), mean


def test_small_class_is_included_always_and_the_record_says_so():
    rng = np.random.default_rng(2)
    p = rng.dirichlet([1, 1, 1], size=100)
    y = np.r_[np.zeros(50, int), np.ones(45, int), np.full(5, 2)]
    rec = calibrate(p, y, alpha=0.1, class_names=["a", "b", "c"])
    assert min_samples(0.1) == 9 and rec["min_n"] == 9
    assert rec["thresholds"][2] is None and rec["include_always"] == ["c"] and rec["n"] == [50, 45, 5]
    sets = prediction_sets(rng.dirichlet([1, 1, 1], size=30), rec)
    assert sets[:, 2].all()
    json.dumps(rec, allow_nan=False)      # serialisable as plain JSON, no Infinity


def test_record_round_trips_through_json():
    rng = np.random.default_rng(3)
    pv, yv = shifted(500, 0.3, rng)
    rec = calibrate(pv, yv, 0.1)
    again = json.loads(json.dumps(rec))
    pt, _ = shifted(100, 0.3, rng)
    assert (prediction_sets(pt, rec) == prediction_sets(pt, again)).all()


def test_ordinal_sets_are_contiguous_and_cover():
    rng = np.random.default_rng(4)
    k, n = 5, 4000
    y = rng.integers(0, k, n)
    # a bimodal model: mass on the true grade and on a far grade, so raw sets can have holes
    far = (y + 3) % k
    p = rng.dirichlet(np.ones(k) * 0.3, size=n) * 0.3
    p[np.arange(n), y] += 0.4
    p[np.arange(n), far] += 0.3
    p /= p.sum(axis=1, keepdims=True)
    rec = calibrate(p[:2000], y[:2000], 0.1, task="ordinal")
    raw = prediction_sets(p[2000:], dict(rec, task="multiclass"))
    sets = prediction_sets(p[2000:], rec)
    holes = lambda s: [np.flatnonzero(r) for r in s if r.any() and np.ptp(np.flatnonzero(r)) + 1 != r.sum()]
    assert len(holes(raw)) > 0 and len(holes(sets)) == 0
    assert (sets >= raw).all()                           # a superset of the conformal set
    rows = coverage_by_class(sets, y[2000:])
    assert all(r["coverage"] >= 0.9 - 0.04 for r in rows[:k])


def test_multilabel_sets_per_finding():
    rng = np.random.default_rng(5)
    n, k = 6000, 3
    y = (rng.random((n, k)) < [0.05, 0.3, 0.6]).astype(int)
    x = rng.normal(1.5 * y, 1.0)
    p = 1 / (1 + np.exp(-(1.5 * x - 1.125)))
    rec = calibrate(p[:3000], y[:3000], 0.1, task="multilabel", class_names=["f1", "f2", "f3"])
    assert np.array(rec["thresholds"]).shape == (3, 2)
    sets = prediction_sets(p[3000:], rec, nonempty=False)
    assert sets.shape == (3000, 3, 2)
    rows = coverage_by_class(sets, y[3000:], ["f1", "f2", "f3"])
    assert [r["class"] for r in rows[:2]] == ["f1:absent", "f1:present"]
    assert all(r["coverage"] >= 0.9 - 0.04 for r in rows[:-1]), rows
    text = set_text(sets[:1], ["f1", "f2", "f3"])[0]
    assert text.count(";") == 2 and text.startswith("f1=")


def test_nonempty_adds_the_argmax_only_to_empty_sets():
    rec = {"kind": "split-conformal", "alpha": 0.1, "method": "mondrian", "task": "multiclass",
           "thresholds": [0.1, 0.1, 0.1]}
    p = np.array([[0.5, 0.3, 0.2], [0.95, 0.03, 0.02]])
    assert prediction_sets(p, rec, nonempty=False).tolist() == [[False] * 3, [True, False, False]]
    assert prediction_sets(p, rec).tolist() == [[True, False, False], [True, False, False]]
    assert set_text(prediction_sets(p, rec, nonempty=False), ["a", "b", "c"]) == ["-", "a"]


@pytest.mark.parametrize("call, words", [
    (lambda: calibrate(np.ones((4, 2)) / 2, [0, 1, 0, 1], alpha=1.5), "alpha"),
    (lambda: calibrate(np.ones((4, 2)) / 2, [0, 1, 0, 2]), "class indices"),
    (lambda: calibrate(np.full((4, 2), 3.0), [0, 1, 0, 1]), "logits"),
    (lambda: calibrate(np.ones(4) / 2, [0, 1, 0, 1]), "2-D"),
    (lambda: calibrate(np.ones((4, 2)) / 2, [0, 1, 0, 1], method="pooled"), "mondrian"),
    (lambda: prediction_sets(np.ones((2, 3)) / 3, calibrate(np.ones((4, 2)) / 2, [0, 1, 0, 1])), "3 columns"),
    (lambda: prediction_sets(np.ones((2, 2)) / 2, {"thresholds": [1]}), "not a conformal record"),
])
def test_bad_input_is_one_clear_error(call, words):
    with pytest.raises(MedxferError, match=words):
        call()
