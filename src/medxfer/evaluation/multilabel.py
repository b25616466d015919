"""Multi-label metrics (several findings per image), per-label thresholds and temperatures.

Usage::

    from medxfer.evaluation.multilabel import (apply_label_temperatures, choose_thresholds,
                                               evaluate_multilabel, fit_label_temperatures)

    temps = fit_label_temperatures(val_logits, val_y)            # (N, K) logits, (N, K) 0/1
    val_p, test_p = (apply_label_temperatures(z, temps) for z in (val_logits, test_logits))
    thresholds, why = choose_thresholds(val_y, val_p, "youden")  # one per label
    report = evaluate_multilabel(test_y, test_p, label_names, thresholds=thresholds,
                                 groups=patient_ids, n_bootstrap=2000, seed=0)
    report["macro_auc"], report["macro_auc_ci"], report["per_label"]["Effusion"]["auc"]

``probs`` are per-label sigmoid probabilities, each in [0, 1]; rows need not sum to 1. Every value in
the returned dict is a plain Python int, float, list, dict or ``None`` (an undefined metric), never
NaN.

Definitions
-----------
* **Per label** ``k``: ``probs[:, k] >= thresholds[k]`` (default 0.5) means "predicted positive";
  sensitivity, specificity, PPV, NPV, F1 and accuracy are as in :func:`medxfer.evaluation.evaluate`.
  ``brier`` = mean (p - y)^2. ``ece`` bins P(label) itself (15 equal-width right-closed bins) and
  compares each bin's mean P(label) with its fraction of positives: sum_b (n_b / N) |pos_b - p_b|.
  (:func:`~medxfer.evaluation.calibration.expected_calibration_error` bins the top-class confidence
  instead; for one label the calibration of P(label) is what a reliability diagram shows.)
* A label with fewer than ``min_positives`` positive or negative images gets ``"evaluable": False``
  and a ``note``; its AUC (and interval) is still reported when defined, so that one sees how wide
  it is. ``n_pos_patients``/``n_neg_patients`` are added when ``groups`` are given.
* **Aggregates**: ``macro_auc`` is the mean AUC over the labels whose AUC is defined (both classes
  present); ``macro_auc_n_labels`` says how many entered. ``macro_average_precision`` is the mean
  over labels with a positive, ``macro_f1`` the mean over labels whose F1 is defined (as
  scikit-learn's ``zero_division=np.nan``). ``micro_auc``/``micro_average_precision`` score the
  flattened (N*K,) arrays, ``micro_f1`` = 2 sum TP / (2 sum TP + sum FP + sum FN).
  ``subset_accuracy`` is the fraction of images with every label right, ``hamming_loss`` the
  fraction of wrong (image, label) entries.

Bootstrap
---------
With ``n_bootstrap > 0``, 95% percentile intervals are given per label (``auc_ci``,
``average_precision_ci``, ``sensitivity_ci``, ``specificity_ci``, from the resamples in which that
label has both classes: its ``n_bootstrap_used``) and for every scalar aggregate (from the resamples
in which each label that entered ``macro_auc`` has both classes: ``n_bootstrap_used``). With
``groups`` (patient ids) whole patients are drawn, otherwise images; resamples are per-image weights
evaluated all at once, as in :mod:`medxfer.evaluation.metrics`.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit
from sklearn.metrics import average_precision_score, roc_auc_score

from medxfer.errors import MedxferError
from medxfer.evaluation.calibration import T_MAX, T_MIN, choose_threshold, parse_threshold_rule
from medxfer.evaluation.metrics import (
    _CHUNK_ELEMENTS,
    RankedScores,
    _div,
    _iter_weights,
    _py,
    _rates,
    percentile_ci,
    to_numpy,
)

LABEL_CI_METRICS = ("auc", "average_precision", "sensitivity", "specificity")
AGGREGATE_METRICS = ("macro_auc", "micro_auc", "macro_average_precision", "micro_average_precision",
                     "macro_f1", "micro_f1", "subset_accuracy", "hamming_loss")
ECE_BINS = 15


def _binary_matrix(y, name: str, who: str, shape=None) -> np.ndarray:
    """(N, K) 0/1 (bool, int or float) -> bool array, else MedxferError."""
    y = to_numpy(y)
    if y.ndim != 2 or (shape is not None and y.shape != shape):
        want = f"shape {shape}" if shape is not None else "an (N, K) array"
        raise MedxferError(f"The '{name}' parameter of {who} must be {want} of 0/1 labels. "
                           f"Got shape {y.shape} instead.")
    if y.dtype != bool:
        if y.dtype.kind not in "iuf" or not np.all((y == 0) | (y == 1)):
            bad = y.ravel()[~((y.ravel() == 0) | (y.ravel() == 1))] if y.dtype.kind in "iuf" else y
            raise MedxferError(f"The '{name}' parameter of {who} must hold 0/1 labels only. "
                               f"Got {bad.ravel()[:3].tolist()} among them instead.")
    return y.astype(bool)


def _validate(y_true, probs, labels, thresholds, groups, n_bootstrap, min_positives):
    who = "evaluate_multilabel"
    p = to_numpy(probs, float)
    if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < 1:
        raise MedxferError(f"The 'probs' parameter of {who} must be an (N, K) array of per-label "
                           f"probabilities with N, K >= 1. Got shape {p.shape} instead.")
    if not np.all(np.isfinite(p)) or p.min() < -1e-6 or p.max() > 1 + 1e-6:
        raise MedxferError(f"The 'probs' parameter of {who} must hold finite probabilities in "
                           "[0, 1] (apply the sigmoid to logits first).")
    n, k = p.shape
    y = _binary_matrix(y_true, "y_true", who, (n, k))
    labels = [str(lab) for lab in labels]
    if len(labels) != k or len(set(labels)) != k:
        raise MedxferError(f"The 'labels' parameter of {who} must be {k} distinct label names (one "
                           f"per column of probs). Got {labels!r} instead.")
    try:
        t = np.full(k, 0.5) if thresholds is None else to_numpy(thresholds, float)
    except (TypeError, ValueError):
        t = np.zeros(0)
    if t.ndim == 0:
        t = np.full(k, float(t))
    if t.shape != (k,) or not np.all(np.isfinite(t)):
        raise MedxferError(f"The 'thresholds' parameter of {who} must be one finite number or {k} "
                           f"(one per label). Got {thresholds!r} instead.")
    if groups is not None and to_numpy(groups).shape != (n,):
        raise MedxferError(f"The 'groups' parameter of {who} must have one entry per image ({n}). "
                           f"Got shape {to_numpy(groups).shape} instead.")
    for name, value in (("n_bootstrap", n_bootstrap), ("min_positives", min_positives)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise MedxferError(f"The '{name}' parameter of {who} must be an integer >= 0. "
                               f"Got {value!r} instead.")
    return y, p, labels, t


def _binary_ece(y: np.ndarray, p: np.ndarray, n_bins: int = ECE_BINS) -> float:
    idx = np.clip(np.ceil(p * n_bins).astype(int) - 1, 0, n_bins - 1)
    pos = np.bincount(idx, weights=y.astype(float), minlength=n_bins)
    conf = np.bincount(idx, weights=p, minlength=n_bins)
    return float(np.abs(pos - conf).sum() / len(y))


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():  # all-NaN rows -> NaN, silently
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


class _Scorer:
    """Every metric of the report as a function of per-image weights (B, N); ones = the data."""

    def __init__(self, y: np.ndarray, p: np.ndarray, t: np.ndarray):
        self.y, self.k = y, y.shape[1]
        pred = p >= t
        self.tp_hot, self.fp_hot = (y & pred).astype(float), (~y & pred).astype(float)
        self.exact = (pred == y).all(1).astype(float)
        self.wrong = (pred != y).sum(1).astype(float)
        self.ranked = [RankedScores(p[:, j], y[:, j]) for j in range(self.k)]
        self.flat = RankedScores(p.ravel(), y.ravel())

    def _micro(self, w):
        """Micro AUC and AP: each image's weight repeated over its K (image, label) entries."""
        rows = max(1, _CHUNK_ELEMENTS // (w.shape[1] * self.k))
        auc, ap = [], []
        for i in range(0, len(w), rows):
            wf = np.repeat(w[i:i + rows], self.k, axis=1)
            auc.append(self.flat.auc(wf))
            ap.append(self.flat.average_precision(wf))
        return np.concatenate(auc), np.concatenate(ap)

    def __call__(self, w: np.ndarray):
        total = w.sum(1)
        npos = w @ self.y.astype(float)
        tp, fp = w @ self.tp_hot, w @ self.fp_hot
        label = _rates(tp, fp, npos - tp, total[:, None] - npos - fp)  # each (B, K)
        label["auc"] = np.stack([r.auc(w) for r in self.ranked], axis=1)
        label["average_precision"] = np.stack([r.average_precision(w) for r in self.ranked], axis=1)
        stp, sfp, sfn = tp.sum(1), fp.sum(1), (npos - tp).sum(1)
        micro_auc, micro_ap = self._micro(w)
        agg = {"micro_auc": micro_auc, "micro_average_precision": micro_ap,
               "macro_f1": _nanmean(label["f1"], 1), "micro_f1": _div(2 * stp, 2 * stp + sfp + sfn),
               "subset_accuracy": _div(w @ self.exact, total),
               "hamming_loss": _div(w @ self.wrong, total * self.k)}
        both = (npos > 0) & (total[:, None] - npos > 0)
        return label, agg, both


def evaluate_multilabel(y_true, probs, labels: list[str], *, thresholds=None, groups=None,
                        n_bootstrap: int = 0, seed: int = 0, min_positives: int = 10) -> dict:
    """Evaluate per-label probabilities against a 0/1 label matrix; see the module docstring.

    ``y_true``: (N, K) 0/1; ``probs``: (N, K) sigmoid probabilities; ``labels``: the K names;
    ``thresholds``: one number or K (default 0.5); ``groups``: patient ids for the bootstrap.
    """
    y, p, labels, t = _validate(y_true, probs, labels, thresholds, groups, n_bootstrap,
                                min_positives)
    n, k = y.shape
    scorer = _Scorer(y, p, t)
    label_pt, agg_pt, _ = scorer(np.ones((1, n)))
    n_pos = y.sum(0).astype(int)
    gid = None if groups is None else np.unique(to_numpy(groups), return_inverse=True)[1].ravel()
    per_label = {}
    for j, name in enumerate(labels):
        yj, pj = y[:, j], p[:, j]
        both = 0 < n_pos[j] < n
        r = {"auc": _py(roc_auc_score(yj, pj)) if both else None,
             "average_precision": _py(average_precision_score(yj, pj)) if n_pos[j] else None}
        r.update({m: _py(label_pt[m][0, j]) for m in
                  ("sensitivity", "specificity", "ppv", "npv", "f1", "accuracy")})
        r.update({"threshold": float(t[j]), "brier": float(np.mean((pj - yj) ** 2)),
                  "ece": _binary_ece(yj, pj), "n_pos": int(n_pos[j]), "n_neg": int(n - n_pos[j])})
        if gid is not None:
            r["n_pos_patients"] = int(len(np.unique(gid[yj])))
            r["n_neg_patients"] = int(len(np.unique(gid[~yj])))
        rare = min(r["n_pos"], r["n_neg"]) < min_positives
        r["evaluable"] = not rare
        r["note"] = (f"too rare to evaluate reliably: {r['n_pos']} positive and {r['n_neg']} "
                     f"negative images (fewer than min_positives={min_positives}); the AUC and "
                     "its interval are shown only to tell how uncertain it is") if rare else None
        per_label[name] = r
    aucs = np.array([np.nan if r["auc"] is None else r["auc"] for r in per_label.values()])
    aps = [r["average_precision"] for r in per_label.values() if r["average_precision"] is not None]
    entered = np.isfinite(aucs)
    out = {"labels": labels, "per_label": per_label,
           "macro_auc": float(aucs[entered].mean()) if entered.any() else None,
           "macro_auc_n_labels": int(entered.sum()),
           "micro_auc": _py(roc_auc_score(y.ravel(), p.ravel())) if 0 < y.sum() < y.size else None,
           "macro_average_precision": float(np.mean(aps)) if aps else None,
           "micro_average_precision": _py(average_precision_score(y.ravel(), p.ravel()))
           if y.any() else None}
    out.update({m: _py(agg_pt[m][0]) for m in ("macro_f1", "micro_f1", "subset_accuracy",
                                               "hamming_loss")})
    out.update({"thresholds": t.tolist(), "n": int(n), "n_labels": int(k),
                "n_evaluable": int(sum(r["evaluable"] for r in per_label.values()))})
    if n_bootstrap > 0:
        _bootstrap(out, scorer, entered, n, int(n_bootstrap), seed, groups)
    return out


def _bootstrap(out, scorer, entered, n, n_bootstrap, seed, groups):
    rng = np.random.default_rng(seed)
    label_vals = {m: [] for m in LABEL_CI_METRICS}
    agg_vals = {m: [] for m in AGGREGATE_METRICS}
    label_used = np.zeros(len(entered), dtype=int)
    used = 0
    for w in _iter_weights(n, n_bootstrap, rng, groups):
        label, agg, both = scorer(w)
        label["auc"] = np.where(both, label["auc"], np.nan)  # one label: resamples with 2 classes
        for m in LABEL_CI_METRICS:
            label_vals[m].append(np.where(both, label[m], np.nan))
        label_used += both.sum(0)
        ok = both[:, entered].all(1)  # aggregates: every label of the macro AUC has 2 classes
        used += int(ok.sum())
        entered_auc = label["auc"][:, entered]
        agg["macro_auc"] = entered_auc.mean(1) if entered.any() else np.full(len(w), np.nan)
        agg["macro_average_precision"] = _nanmean(label["average_precision"], 1)
        for m in AGGREGATE_METRICS:
            agg_vals[m].append(agg[m][ok])
    for j, r in enumerate(out["per_label"].values()):
        for m in LABEL_CI_METRICS:
            values = np.concatenate([v[:, j] for v in label_vals[m]])
            r[f"{m}_ci"] = percentile_ci(values) if r[m] is not None else None
        r["n_bootstrap_used"] = int(label_used[j])
    for m in AGGREGATE_METRICS:
        out[f"{m}_ci"] = percentile_ci(np.concatenate(agg_vals[m])) if out[m] is not None else None
    out.update({"n_bootstrap": n_bootstrap, "n_bootstrap_used": used,
                "bootstrap_unit": "group" if groups is not None else "image"})


def choose_thresholds(y_val, p_val, rule="youden") -> tuple[list[float], list[str]]:
    """One threshold per label, chosen on validation data by ``rule`` (see
    :func:`~medxfer.evaluation.calibration.choose_threshold`), and why, per label.

    A rule that needs both classes (youden, sensitivity=S, specificity=S) falls back to 0.5 for a
    label that has one class only in ``y_val``; its reason says so.
    """
    rule = parse_threshold_rule(rule)
    p = to_numpy(p_val, float)
    if p.ndim != 2:
        raise MedxferError("The 'p_val' parameter of choose_thresholds must be an (N, K) array of "
                           f"per-label probabilities. Got shape {p.shape} instead.")
    y = _binary_matrix(y_val, "y_val", "choose_thresholds", p.shape)
    thresholds, reasons = [], []
    for j in range(p.shape[1]):
        n_pos, n = int(y[:, j].sum()), len(y)
        if isinstance(rule, float) or rule == "argmax":
            thresholds.append(choose_threshold(y[:, j], p[:, j], rule))
            reasons.append(f"fixed by the rule {rule!r}")
        elif n_pos in (0, n):
            thresholds.append(0.5)
            reasons.append(f"fell back to 0.5: validation has {n_pos} positive of {n} images, and "
                           f"'{rule}' needs both classes")
        else:
            thresholds.append(choose_threshold(y[:, j], p[:, j], rule))
            reasons.append(f"'{rule}' on validation ({n_pos} positive of {n} images)")
    return [float(v) for v in thresholds], reasons


def _check_logits(logits, who: str) -> np.ndarray:
    z = to_numpy(logits, float)
    if z.ndim != 2:
        raise MedxferError(f"The 'logits' parameter of {who} must be an (N, K) array of per-label "
                           f"logits. Got shape {z.shape} instead.")
    return z


def _bce(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    s = z / temperature
    return float(np.mean(np.where(y, np.logaddexp(0, -s), np.logaddexp(0, s))))


def fit_label_temperatures(logits, y) -> list[float]:
    """Per label, the temperature T in [0.05, 20] that minimises the BCE of sigmoid(logits / T).

    A bounded 1-D search on log T, as :func:`~medxfer.evaluation.calibration.fit_temperature` (the
    BCE is convex in 1/T). A label gets 1.0 when its problem is degenerate: no samples, non-finite
    logits, all logits 0, or one class only (the BCE then falls without bound as T shrinks).
    """
    z = _check_logits(logits, "fit_label_temperatures")
    yy = _binary_matrix(y, "y", "fit_label_temperatures", z.shape)
    temps = []
    for j in range(z.shape[1]):
        zj, yj = z[:, j], yy[:, j]
        if len(zj) == 0 or not np.all(np.isfinite(zj)) or np.all(zj == 0) or yj.all() or not yj.any():
            temps.append(1.0)
            continue
        res = minimize_scalar(lambda log_t: _bce(zj, yj, math.exp(log_t)),
                              bounds=(math.log(T_MIN), math.log(T_MAX)), method="bounded",
                              options={"xatol": 1e-5})
        t = float(min(max(math.exp(res.x), T_MIN), T_MAX))
        temps.append(t if math.isfinite(t) and _bce(zj, yj, t) <= _bce(zj, yj, 1.0) else 1.0)
    return temps


def apply_label_temperatures(logits, temps) -> np.ndarray:
    """sigmoid(logits[:, k] / temps[k]) as float64 probabilities, shape (N, K)."""
    z = _check_logits(logits, "apply_label_temperatures")
    t = to_numpy(temps, float)
    if t.shape != (z.shape[1],) or not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise MedxferError(f"The 'temps' parameter of apply_label_temperatures must be {z.shape[1]} "
                           f"finite numbers > 0 (one per label). Got {temps!r} instead.")
    return expit(z / t)
