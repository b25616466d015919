"""Calibration and operating points: temperature scaling, threshold rules, reliability curves.

Usage::

    T = fit_temperature(val_logits, val_y)              # on the validation split
    test_probs = apply_temperature(test_logits, T)
    thr = choose_threshold(val_y, apply_temperature(val_logits, T)[:, 1], "sensitivity=0.95")
    curve = reliability_curve(test_y, test_probs)        # for the reliability diagram

Threshold rules (``--threshold`` on the CLI; validate early with :func:`parse_threshold_rule`):

* ``youden``: maximise sensitivity + specificity - 1 over the ROC thresholds; among ties, the
  threshold closest to 0.5.
* ``sensitivity=S``: the highest threshold whose sensitivity is at least S.
* ``specificity=S``: the lowest threshold whose specificity is at least S.
* ``argmax``: 0.5 (the argmax of two classes).
* a number in (0, 1): that threshold.

A threshold t means "P(positive) >= t -> positive", as in :func:`medxfer.evaluation.evaluate`.
A rule picks an operating point on the scores it is given (which of them are positive); the
threshold returned lies halfway between the lowest score called positive and the next lower one,
never on a score.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp
from sklearn.metrics import roc_curve

from medxfer.config import parse_threshold_rule
from medxfer.errors import MedxferError

T_MIN, T_MAX = 0.05, 20.0


def _np(x, dtype=float) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _check_logits(logits, y_true, who: str):
    z = _np(logits)
    if z.ndim != 2 or z.shape[1] < 2:
        raise MedxferError(f"The 'logits' parameter of {who} must be an (N, K) array with K >= 2. "
                           f"Got shape {z.shape} instead.")
    if y_true is None:
        return z, None
    y = _np(y_true, None)
    if y.shape != (z.shape[0],) or (y.size and (y.min() < 0 or y.max() >= z.shape[1])):
        raise MedxferError(f"The 'y_true' parameter of {who} must be {z.shape[0]} class indices in "
                           f"0..{z.shape[1] - 1}. Got shape {y.shape} instead.")
    return z, y.astype(int)


def _nll(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    s = z / temperature
    return float(np.mean(logsumexp(s, axis=1) - s[np.arange(len(y)), y]))


def fit_temperature(logits, y_true) -> float:
    """The temperature T in [0.05, 20] that minimises the NLL of softmax(logits / T).

    A 1-D bounded search on log T (the NLL is convex in 1/T, so the minimum is unique). Returns 1.0
    when the problem is degenerate: no samples, non-finite logits, or logits that are equal within
    every row (the NLL does not depend on T).
    """
    z, y = _check_logits(logits, y_true, "fit_temperature")
    if len(y) == 0 or not np.all(np.isfinite(z)) or np.all(np.ptp(z, axis=1) == 0):
        return 1.0
    res = minimize_scalar(lambda log_t: _nll(z, y, math.exp(log_t)),
                          bounds=(math.log(T_MIN), math.log(T_MAX)), method="bounded",
                          options={"xatol": 1e-5})
    t = float(min(max(math.exp(res.x), T_MIN), T_MAX))
    if not math.isfinite(t) or _nll(z, y, t) > _nll(z, y, 1.0):
        return 1.0
    return t


def apply_temperature(logits, T) -> np.ndarray:
    """softmax(logits / T) as float64 probabilities, computed stably (max subtracted per row)."""
    z, _ = _check_logits(logits, None, "apply_temperature")
    if not (isinstance(T, (int, float, np.floating, np.integer)) and math.isfinite(T) and T > 0):
        raise MedxferError(f"The temperature must be a finite number > 0. Got {T!r} instead.")
    s = z / float(T)
    s = s - s.max(axis=1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=1, keepdims=True)


def choose_threshold(y_true, p_pos, rule, *, positive: int = 1) -> float:
    """A threshold on P(positive) chosen on (validation) data by ``rule``; always finite.

    ``y_true`` holds class indices (``y_true == positive`` marks positives) or booleans.
    """
    rule = parse_threshold_rule(rule)
    if isinstance(rule, float):
        return rule
    if rule == "argmax":
        return 0.5
    y = _np(y_true, None)
    p = _np(p_pos)
    if y.ndim != 1 or p.shape != y.shape:
        raise MedxferError("The 'y_true' and 'p_pos' parameters of choose_threshold must be 1-D "
                           f"of the same length. Got shapes {y.shape} and {p.shape} instead.")
    is_pos = y.astype(bool) if y.dtype == bool else (y == positive)
    n_pos = int(is_pos.sum())
    if n_pos == 0 or n_pos == len(y) or not np.all(np.isfinite(p)):
        raise MedxferError(f"The threshold rule '{rule}' needs finite scores and both classes in "
                           f"the data it is chosen on. Got {n_pos} positives of {len(y)} instead.")
    fpr, tpr, thr = roc_curve(is_pos, p, drop_intermediate=False)
    # thr[0] is +inf (nothing positive); its finite stand-in is the next float above the top score.
    thr = thr.copy()
    thr[0] = np.nextafter(p.max(), np.inf)
    eps = 1e-12
    if rule == "youden":
        j = tpr - fpr
        best = np.flatnonzero(j >= j.max() - eps)
        return _between_scores(thr, best[np.argmin(np.abs(thr[best] - 0.5))])
    name, target = rule.split("=")
    target = float(target)
    if name == "sensitivity":  # tpr rises as the threshold falls: first index reaching the target
        return _between_scores(thr, np.flatnonzero(tpr >= target - eps)[0])
    ok = np.flatnonzero(1 - fpr >= target - eps)  # specificity falls as the threshold falls
    return _between_scores(thr, ok[-1])


def _between_scores(thr: np.ndarray, i: int) -> float:
    """The operating point ``p >= thr[i]`` as a threshold halfway to the next lower score.

    ``thr`` is roc_curve's (decreasing, one per distinct score). Every value in (thr[i+1], thr[i]]
    classifies the scores it was chosen on alike; the midpoint keeps a margin from all of them, so
    that a last-digit difference between engines (ONNX vs PyTorch) cannot flip an image that sits
    exactly on the threshold. At the ends: halfway to 0 below the lowest score, halfway to 1 above
    the highest (or the next float up when that is 1).
    """
    hi = float(thr[i])
    if i == 0:  # nothing positive: thr[0] is already the next float above the top score
        top = float(np.nextafter(hi, -np.inf))
        return (top + 1.0) / 2 if top < 1.0 else hi
    if i + 1 < len(thr):
        return (hi + float(thr[i + 1])) / 2
    # everything positive: no lower score to go halfway to; probabilities go halfway to 0, and a score
    # below 0 (not a probability: no floor is known) stays the threshold itself
    return hi / 2 if hi > 0 else hi


def _confidence_bins(y_true, probs, n_bins: int):
    probs = _np(probs)
    if probs.ndim == 1:  # P(class 1) of a binary problem
        probs = np.stack([1 - probs, probs], axis=1)
    y = _np(y_true, None).astype(int)
    if probs.ndim != 2 or y.shape != (probs.shape[0],):
        raise MedxferError("reliability_curve needs probs of shape (N, K) or (N,) and N labels. "
                           f"Got shapes {probs.shape} and {y.shape} instead.")
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise MedxferError(f"The 'n_bins' parameter must be an integer >= 1. Got {n_bins!r} "
                           "instead.")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    # right-closed bins (0, 1/n], (1/n, 2/n], ...; a confidence of 0 goes to the first bin
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    return counts, conf_sum, acc_sum


def expected_calibration_error(y_true, probs, n_bins: int = 15) -> float:
    """ECE = sum_b (n_b / N) |accuracy_b - confidence_b| over equal-width confidence bins, where
    confidence = max_k p_k and accuracy is that of the argmax class. NaN for no samples."""
    counts, conf_sum, acc_sum = _confidence_bins(y_true, probs, n_bins)
    n = counts.sum()
    return float(np.abs(acc_sum - conf_sum).sum() / n) if n else math.nan


def reliability_curve(y_true, probs, n_bins: int = 15) -> dict:
    """Per-bin mean confidence, accuracy and count for a reliability diagram, plus the ECE.

    Returns {"bin_edges": [n_bins + 1], "confidence": [...], "accuracy": [...], "counts": [...],
    "ece": float}; the confidence and accuracy of an empty bin are None.
    """
    counts, conf_sum, acc_sum = _confidence_bins(y_true, probs, n_bins)
    n = int(counts.sum())
    def mean(total):
        return [float(t / c) if c else None for t, c in zip(total, counts)]
    return {
        "bin_edges": np.linspace(0, 1, n_bins + 1).tolist(),
        "confidence": mean(conf_sum),
        "accuracy": mean(acc_sum),
        "counts": counts.astype(int).tolist(),
        "ece": float(np.abs(acc_sum - conf_sum).sum() / n) if n else None,
    }
