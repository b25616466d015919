"""Comparing strategies on the same test images: DeLong and paired bootstrap tests, seed summaries.

Usage::

    from medxfer.evaluation.stats import delong_test, paired_bootstrap, summarize

    delong_test(y_test, p_full_finetune, p_scratch)    # {"auc_a", "auc_b", "diff", "p_value", ...}
    paired_bootstrap(y_test, p_a, p_b, groups=patient_ids)
    summarize([0.91, 0.93, 0.92])                      # over seeds: {"mean", "sd", "n", "values"}

``y_true`` holds 0/1 (or class indices, with ``positive`` naming the positive class); ``p_a`` and
``p_b`` are the two models' scores for the positive class on the same images. ``diff`` is
auc_a - auc_b. A quantity that is undefined on the data is None.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm

from medxfer.errors import MedxferError
from medxfer.evaluation.metrics import RankedScores, _iter_weights, percentile_ci, to_numpy

_Z95 = float(norm.ppf(0.975))


def _inputs(y_true, p_a, p_b, positive, who):
    y, a, b = to_numpy(y_true), to_numpy(p_a, float), to_numpy(p_b, float)
    if y.ndim != 1 or a.shape != y.shape or b.shape != y.shape:
        raise MedxferError(f"{who} needs y_true, p_a and p_b as 1-D arrays of one length. Got "
                           f"shapes {y.shape}, {a.shape} and {b.shape} instead.")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise MedxferError(f"{who} needs finite scores in p_a and p_b (a NaN or inf was given).")
    is_pos = y.astype(bool) if y.dtype == bool else (y == positive)
    return is_pos, a, b


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(x)]  # exclusive
    mid = (starts + ends + 1) / 2.0
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(mid, ends - starts)
    return ranks


def _delong_components(pos: np.ndarray, neg: np.ndarray):
    """AUC and the structural components V10 (per positive) and V01 (per negative), from
    midranks as in Sun & Xu (2014), "Fast implementation of DeLong's algorithm"."""
    m, n = len(pos), len(neg)
    tx, ty = _midranks(pos), _midranks(neg)
    tz = _midranks(np.concatenate([pos, neg]))
    auc = (tz[:m].sum() / m - (m + 1) / 2) / n
    v10 = (tz[:m] - tx) / n          # fraction of negatives below each positive (ties 1/2)
    v01 = 1 - (tz[m:] - ty) / m      # fraction of positives above each negative (ties 1/2)
    return auc, v10, v01


def delong_test(y_true, p_a, p_b, *, positive: int = 1) -> dict:
    """Paired DeLong test of H0: AUC(p_a) == AUC(p_b) on the same images (two-sided).

    Returns {"auc_a", "auc_b", "diff", "se", "z", "p_value", "ci_diff": [lo, hi]} where ci_diff is
    the 95% normal interval of auc_a - auc_b. Identical predictors give diff 0, z 0, p 1. AUCs are
    None without both classes; z, p and the interval are None when the variance cannot be
    estimated (fewer than 2 positives or negatives, or zero variance with a non-zero difference).
    """
    is_pos, a, b = _inputs(y_true, p_a, p_b, positive, "delong_test")
    m, n = int(is_pos.sum()), int((~is_pos).sum())
    out = {"auc_a": None, "auc_b": None, "diff": None, "se": None, "z": None, "p_value": None,
           "ci_diff": None}
    if m == 0 or n == 0:
        return out
    auc_a, v10a, v01a = _delong_components(a[is_pos], a[~is_pos])
    auc_b, v10b, v01b = _delong_components(b[is_pos], b[~is_pos])
    diff = auc_a - auc_b
    out.update(auc_a=float(auc_a), auc_b=float(auc_b), diff=float(diff))
    if m < 2 or n < 2:
        return out
    s10 = np.cov(np.stack([v10a, v10b]))
    s01 = np.cov(np.stack([v01a, v01b]))
    cov = s10 / m + s01 / n
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if var <= 1e-15:
        if abs(diff) <= 1e-12:
            out.update(diff=0.0, se=0.0, z=0.0, p_value=1.0, ci_diff=[0.0, 0.0])
        return out
    se = math.sqrt(var)
    z = diff / se
    out.update(se=se, z=float(z), p_value=float(min(1.0, 2 * norm.sf(abs(z)))),
               ci_diff=[float(diff - _Z95 * se), float(diff + _Z95 * se)])
    return out


def paired_bootstrap(y_true, p_a, p_b, n_bootstrap: int = 2000, seed: int = 0, groups=None, *,
                     positive: int = 1) -> dict:
    """Paired bootstrap of auc_a - auc_b: both models scored on the same resamples.

    With ``groups`` whole patients are resampled. Returns {"auc_a", "auc_b", "diff",
    "ci_diff": [lo, hi] (95% percentile), "p_value", "n_bootstrap", "n_bootstrap_used"}; the
    two-sided p is twice the fraction of resamples whose difference lies on the other side of 0
    from the observed one (0 included), capped at 1. Resamples missing a class are skipped.
    """
    is_pos, a, b = _inputs(y_true, p_a, p_b, positive, "paired_bootstrap")
    if not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 1:
        raise MedxferError("The 'n_bootstrap' parameter of paired_bootstrap must be an integer "
                           f">= 1. Got {n_bootstrap!r} instead.")
    if groups is not None and to_numpy(groups).shape != is_pos.shape:
        raise MedxferError(f"The 'groups' parameter of paired_bootstrap must have one entry per "
                           f"image ({len(is_pos)}). Got shape {to_numpy(groups).shape} instead.")
    out = {"auc_a": None, "auc_b": None, "diff": None, "ci_diff": None, "p_value": None,
           "n_bootstrap": int(n_bootstrap), "n_bootstrap_used": 0}
    if is_pos.all() or not is_pos.any():
        return out
    ra, rb = RankedScores(a, is_pos), RankedScores(b, is_pos)
    ones = np.ones((1, len(a)))
    auc_a, auc_b = float(ra.auc(ones)[0]), float(rb.auc(ones)[0])
    diff = auc_a - auc_b
    diffs = []
    rng = np.random.default_rng(seed)
    for w in _iter_weights(len(a), int(n_bootstrap), rng, groups):
        valid = (w @ is_pos > 0) & (w @ ~is_pos > 0)
        w = w[valid]
        diffs.append(ra.auc(w) - rb.auc(w))
    d = np.concatenate(diffs)
    if d.size == 0:
        p = None
    elif diff > 0:
        p = min(1.0, 2 * float(np.mean(d <= 0)))
    elif diff < 0:
        p = min(1.0, 2 * float(np.mean(d >= 0)))
    else:
        p = 1.0
    out.update(auc_a=auc_a, auc_b=auc_b, diff=float(diff), ci_diff=percentile_ci(d), p_value=p,
               n_bootstrap_used=int(d.size))
    return out


def summarize(values) -> dict:
    """Mean and sample standard deviation (ddof=1) over runs, e.g. seeds of one strategy.

    None / NaN / inf entries (a metric undefined in one run) are left out of mean, sd and n, and
    shown as None in "values". sd is None when fewer than 2 values remain; mean is None when
    none remain.
    """
    raw = [None if v is None or not math.isfinite(float(v)) else float(v) for v in values]
    kept = np.array([v for v in raw if v is not None], dtype=float)
    return {
        "mean": float(kept.mean()) if kept.size else None,
        "sd": float(kept.std(ddof=1)) if kept.size >= 2 else None,
        "n": int(kept.size),
        "values": raw,
    }


def mean_sd(summ: dict, digits: int = 3) -> str:
    """``'0.912 ± 0.014'`` from a :func:`summarize` dict ('-' without values, the mean alone with one)."""
    if summ["mean"] is None:
        return "-"
    if summ["sd"] is None or not math.isfinite(summ["sd"]):
        return f"{summ['mean']:.{digits}f}"
    return f"{summ['mean']:.{digits}f} ± {summ['sd']:.{digits}f}"


def paired_bootstrap_metric(metric, y, p_a, p_b, n_bootstrap: int = 2000, seed: int = 0, groups=None) -> dict:
    """A paired bootstrap of ``metric(y, p_a) - metric(y, p_b)`` for any metric (multi-label macro AUC, ordinal
    kappa...): images (or, with ``groups``, whole patients) resampled together for both; resamples where the
    metric is undefined (None/NaN) are left out. Returns the difference, its 95% percentile CI and a two-sided
    p-value (twice the smaller share of resampled differences on either side of 0)."""
    y, p_a, p_b = np.asarray(y), np.asarray(p_a), np.asarray(p_b)
    diff = _metric_diff(metric, y, p_a, p_b)
    rng = np.random.default_rng(seed)
    units = np.arange(len(y)) if groups is None else np.unique(np.asarray(groups).astype(str), return_inverse=True)[1]
    members = [np.flatnonzero(units == u) for u in range(units.max() + 1)] if groups is not None else None
    diffs = []
    for _ in range(int(n_bootstrap)):
        if members is None:
            idx = rng.integers(0, len(y), len(y))
        else:
            idx = np.concatenate([members[u] for u in rng.integers(0, len(members), len(members))])
        d = _metric_diff(metric, y[idx], p_a[idx], p_b[idx])
        if d is not None:
            diffs.append(d)
    diffs = np.asarray(diffs)
    if diff is None or len(diffs) < 10:
        return {"diff": diff, "ci_diff": None, "p_value": None, "n_bootstrap_used": int(len(diffs))}
    p = min(1.0, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean()))
    return {"diff": float(diff), "ci_diff": percentile_ci(diffs), "p_value": float(max(p, 1 / len(diffs))),
            "n_bootstrap_used": int(len(diffs)), "unit": "patient" if groups is not None else "image"}


def _metric_diff(metric, y, p_a, p_b) -> float | None:
    a, b = metric(y, p_a), metric(y, p_b)
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return float(a - b)
