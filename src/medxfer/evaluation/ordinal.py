"""Ordinal metrics for ordered grades 0..K-1 (diabetic retinopathy, Kellgren-Lawrence, BI-RADS).

Usage::

    from medxfer.evaluation.ordinal import evaluate_ordinal, predict_grade
    from medxfer.models.ordinal import corn_probabilities

    probs = corn_probabilities(test_logits)                   # (N, K), or a softmax head's
    report = evaluate_ordinal(test_y, probs, ["none", "mild", "moderate", "severe", "PDR"],
                              groups=patient_ids, n_bootstrap=2000, seed=0)
    report["qwk"], report["qwk_ci"], report["mae"], report["cuts"][0]["auc"]

Every value in the returned dict is a plain Python int, float, list, dict or ``None`` (undefined),
never NaN.

The predicted grade
-------------------
:func:`predict_grade` returns the **median** of the predictive distribution: the smallest k with
P(grade <= k) >= 0.5. The median minimises the expected absolute error E|grade - k|, so it is the
prediction that MAE rewards; it depends on the cumulative probabilities only, which CORN and other
cumulative (CORAL, proportional-odds) models estimate directly, so it equals their usual rule
"count the k with P(grade > k) > 0.5". The argmax (the mode) instead ignores how far apart wrong
grades are.

Definitions
-----------
* ``qwk``: quadratic weighted Cohen's kappa of the predicted grades, scikit-learn's
  ``cohen_kappa_score(weights="quadratic", labels=range(K))`` (the weights are (i - j)^2 over all K
  grades, present or not); ``None`` when undefined (one grade only in truth and prediction).
* ``mae``: mean |grade - predicted grade| in grades; ``accuracy``: exact-grade agreement.
* ``confusion_matrix``: K x K counts, rows the true grade, columns the predicted one.
* ``cuts``: for k = 1..K-1 the AUC of "grade >= k" scored by P(grade >= k) = sum of probs[:, k:];
  ``cut_auc_macro`` is their mean over the cuts with both classes present (``cut_auc_n_cuts``).

Bootstrap
---------
With ``n_bootstrap > 0``: 95% percentile intervals for ``qwk``, ``mae``, ``accuracy``,
``cut_auc_macro`` and each cut's ``auc``. A resample is used when it holds the lowest and the
highest grade present in the data (then every defined cut has both classes); ``n_bootstrap_used``
counts those. With ``groups`` (patient ids) whole patients are drawn, otherwise images; resamples
are per-image weights evaluated all at once, as in :mod:`medxfer.evaluation.metrics`.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import cohen_kappa_score, confusion_matrix, roc_auc_score

from medxfer.errors import MedxferError
from medxfer.evaluation.metrics import (RankedScores, _div, _iter_weights, _py, check_indices, percentile_ci,
                                        to_numpy)

CI_METRICS = ("qwk", "mae", "accuracy", "cut_auc_macro")


def _check_probs(probs, who: str) -> np.ndarray:
    p = to_numpy(probs, float)
    if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < 2:
        raise MedxferError(f"The 'probs' parameter of {who} must be an (N, K) array of grade "
                           f"probabilities with N >= 1 and K >= 2. Got shape {p.shape} instead.")
    if not np.all(np.isfinite(p)) or p.min() < -1e-6 or p.max() > 1 + 1e-6:
        raise MedxferError(f"The 'probs' parameter of {who} must hold finite probabilities in "
                           "[0, 1] (use corn_probabilities or a softmax on logits first).")
    worst = float(np.abs(p.sum(1) - 1).max())
    if worst > 1e-3:
        raise MedxferError(f"The rows of the 'probs' parameter of {who} must sum to 1. Got a row "
                           f"off by {worst:.3g} instead.")
    return p


def predict_grade(probs) -> np.ndarray:
    """The median grade of each row of (N, K) probabilities: the smallest k with
    P(grade <= k) >= 0.5 (up to 1e-9 of rounding). Returns (N,) integers."""
    p = _check_probs(probs, "predict_grade")
    cum = np.cumsum(p, axis=1)
    cum[:, -1] = np.inf  # the last grade takes whatever rounding leaves
    return np.argmax(cum >= 0.5 - 1e-9, axis=1).astype(int)


def _validate(y_true, probs, labels, groups, n_bootstrap):
    who = "evaluate_ordinal"
    p = _check_probs(probs, who)
    n, k = p.shape
    y = check_indices(y_true, n, k, who, "grades")
    labels = [str(lab) for lab in labels]
    if len(labels) != k or len(set(labels)) != k:
        raise MedxferError(f"The 'labels' parameter of {who} must be {k} distinct grade names, "
                           f"lowest first. Got {labels!r} instead.")
    if groups is not None and to_numpy(groups).shape != (n,):
        raise MedxferError(f"The 'groups' parameter of {who} must have one entry per image ({n}). "
                           f"Got shape {to_numpy(groups).shape} instead.")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) \
            or n_bootstrap < 0:
        raise MedxferError(f"The 'n_bootstrap' parameter of {who} must be an integer >= 0. Got "
                           f"{n_bootstrap!r} instead.")
    return y, p, labels


def _kappa_scores(y, pred, k):
    """Quadratic weighted kappa, MAE and accuracy as functions of per-image weights (B, N)."""
    cell = np.eye(k * k)[y * k + pred]  # (N, K*K): the (true, predicted) cell of each image
    weights = ((np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2).ravel().astype(float)
    err = np.abs(y - pred).astype(float)
    right = (y == pred).astype(float)

    def scores(w):
        obs = (w @ cell).reshape(-1, k, k)
        total = obs.sum((1, 2))
        expected = np.einsum("bi,bj->bij", obs.sum(2), obs.sum(1)).reshape(len(w), -1)
        expected = _div(expected, total[:, None])
        qwk = 1 - _div(obs.reshape(len(w), -1) @ weights, expected @ weights)
        return {"qwk": qwk, "mae": _div(w @ err, total), "accuracy": _div(w @ right, total)}

    return scores


def evaluate_ordinal(y_true, probs, labels: list[str], *, groups=None, n_bootstrap: int = 0,
                     seed: int = 0) -> dict:
    """Evaluate grade probabilities against true grades 0..K-1; see the module docstring.

    ``y_true``: (N,) grades; ``probs``: (N, K) probabilities, rows summing to 1; ``labels``: the K
    grade names, lowest first; ``groups``: patient ids for the bootstrap. Returns a JSON-ready dict.
    """
    y, p, labels = _validate(y_true, probs, labels, groups, n_bootstrap)
    n, k = p.shape
    pred = predict_grade(p)
    kappa = _kappa_scores(y, pred, k)
    point = kappa(np.ones((1, n)))
    qwk = (cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(k)))
           if np.isfinite(point["qwk"][0]) else None)  # undefined: one grade in truth and prediction
    out = {"qwk": _py(qwk), "mae": _py(point["mae"][0]), "accuracy": _py(point["accuracy"][0]),
           "confusion_matrix": confusion_matrix(y, pred, labels=list(range(k))).tolist()}
    tail = np.cumsum(p[:, ::-1], axis=1)[:, ::-1]  # tail[:, j] = P(grade >= j)
    cuts, ranked = [], []
    for j in range(1, k):
        is_pos = y >= j
        both = 0 < is_pos.sum() < n
        cuts.append({"cut": j, "name": f">= {labels[j]}",
                     "auc": _py(roc_auc_score(is_pos, tail[:, j])) if both else None,
                     "n_pos": int(is_pos.sum()), "n_neg": int(n - is_pos.sum())})
        ranked.append(RankedScores(tail[:, j], is_pos))
    defined = [c["auc"] for c in cuts if c["auc"] is not None]
    counts = np.bincount(y, minlength=k)
    out.update({"cuts": cuts, "cut_auc_macro": float(np.mean(defined)) if defined else None,
                "cut_auc_n_cuts": len(defined), "predicted_grade": "median", "n": int(n),
                "n_per_grade": {labels[j]: int(counts[j]) for j in range(k)}})
    if n_bootstrap > 0:
        entered = np.array([c["auc"] is not None for c in cuts])
        lo, hi = int(y.min()), int(y.max())
        rng = np.random.default_rng(seed)
        collected = {m: [] for m in CI_METRICS}
        cut_vals, used = [], 0
        for w in _iter_weights(n, int(n_bootstrap), rng, groups):
            res = kappa(w)
            aucs = np.stack([r.auc(w) for r in ranked], axis=1)  # (B, K-1)
            res["cut_auc_macro"] = (aucs[:, entered].mean(1) if entered.any()
                                    else np.full(len(w), np.nan))
            ok = (w[:, y == lo].sum(1) > 0) & (w[:, y == hi].sum(1) > 0)
            used += int(ok.sum())
            for m in CI_METRICS:
                collected[m].append(res[m][ok])
            cut_vals.append(aucs[ok])
        for m in CI_METRICS:
            out[f"{m}_ci"] = percentile_ci(np.concatenate(collected[m])) if out[m] is not None \
                else None
        cut_vals = np.concatenate(cut_vals) if cut_vals else np.zeros((0, k - 1))
        for j, c in enumerate(cuts):
            c["auc_ci"] = percentile_ci(cut_vals[:, j]) if c["auc"] is not None else None
        out.update({"n_bootstrap": int(n_bootstrap), "n_bootstrap_used": used,
                    "bootstrap_unit": "group" if groups is not None else "image"})
    return out

