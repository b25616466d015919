"""Probabilities and their calibration per task, one rule for training, predict, export and serve.

Usage::

    T = fit_calibration("multilabel", val_logits, val_y)      # a list: one temperature per finding
    probs = probabilities("multilabel", logits, T)            # (N, K) sigmoid(z_k / T_k)
    probs = probabilities("ordinal", logits, 1.3)             # (N, K) grades from (N, K-1) CORN logits
    probs = probabilities("binary", logits, 0.9)              # softmax(z / T), as before

Tasks: ``binary`` and ``multiclass`` (softmax), ``multilabel`` (a sigmoid per finding, a temperature
per finding), ``ordinal`` (CORN: the K-1 conditional logits divided by one temperature, then the
grade probabilities). Temperatures are fitted on validation by minimising the negative log-likelihood.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from medxfer.errors import MedxferError
from medxfer.evaluation.calibration import T_MAX, T_MIN, apply_temperature, choose_threshold, fit_temperature
from medxfer.evaluation.metrics import evaluate
from medxfer.evaluation.multilabel import (apply_label_temperatures, choose_thresholds, evaluate_multilabel,
                                           fit_label_temperatures)
from medxfer.evaluation.ordinal import evaluate_ordinal
from medxfer.models.ordinal import corn_probabilities

TASKS = ("binary", "multiclass", "multilabel", "ordinal")
log = logging.getLogger(__name__)


def label_matrix(values, labels: list[str]) -> np.ndarray:
    """Multi-label: the 'A|B' texts of predictions.csv (empty or missing: none) as an (N, K) 0/1 matrix."""
    col = {name: k for k, name in enumerate(labels)}
    y = np.zeros((len(values), len(labels)))
    for i, v in enumerate(values):
        for name in (str(v).split("|") if isinstance(v, str) and v else []):
            y[i, col[name]] = 1
    return y


def probabilities(task: str, logits, temperature=1.0) -> np.ndarray:
    """Calibrated probabilities (float64) of ``logits`` for ``task`` (see the module docstring)."""
    z = np.asarray(logits, dtype=np.float64)
    if task == "multilabel":
        t = temperature if isinstance(temperature, (list, tuple, np.ndarray)) else [temperature or 1.0] * z.shape[1]
        return apply_label_temperatures(z, [float(v) for v in t])
    if task == "ordinal":
        return corn_probabilities(torch.from_numpy(z / float(temperature or 1.0))).numpy()
    return apply_temperature(z, float(temperature or 1.0))


def _ordinal_nll(z: np.ndarray, y: np.ndarray, t: float) -> float:
    p = corn_probabilities(torch.from_numpy(z / t)).numpy()
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0))))


def fit_calibration(task: str, logits, y):
    """The temperature(s) for ``task`` that minimise the validation NLL (1.0 when degenerate). A temperature
    at the search's bound is logged as a warning: the validation split could not pin it down."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y)
    if task == "multilabel":
        t = [float(v) for v in fit_label_temperatures(z, y)]
    elif task == "ordinal":
        t = _fit_ordinal(z, y)
    else:
        t = fit_temperature(z, y)
    at_bound = [v for v in (t if isinstance(t, list) else [t]) if v <= T_MIN * 1.01 or v >= T_MAX * 0.99]
    if at_bound:
        log.warning("the calibration temperature reached its bound (%s, allowed %g-%g) on %d validation samples: "
                    "the calibrated probabilities are unreliable; give more validation samples (or a better model)",
                    ", ".join(f"{v:.3g}" for v in at_bound), T_MIN, T_MAX, len(y))
    return t


def _fit_ordinal(z: np.ndarray, y: np.ndarray) -> float:
    if len(y) == 0 or not np.all(np.isfinite(z)):
        return 1.0
    res = minimize_scalar(lambda lt: _ordinal_nll(z, y.astype(int), math.exp(lt)),
                          bounds=(math.log(T_MIN), math.log(T_MAX)), method="bounded", options={"xatol": 1e-5})
    t = float(min(max(math.exp(res.x), T_MIN), T_MAX))
    return t if _ordinal_nll(z, y.astype(int), t) <= _ordinal_nll(z, y.astype(int), 1.0) else 1.0


def choose_task_threshold(task: str, y_val, p_val, rule, positive: int | None):
    """The operating point chosen on validation: a threshold on P(positive) (binary), one per finding
    (multilabel), or None (multiclass and ordinal decide by argmax / the median grade)."""
    if task == "multilabel":
        return [float(v) for v in choose_thresholds(np.asarray(y_val), p_val, rule)[0]]
    if positive is None:
        return None
    try:
        return choose_threshold(y_val, p_val[:, positive], rule, positive=positive)
    except MedxferError as e:
        log.warning("threshold rule '%s' not usable on validation (%s); using 0.5", rule, e)
        return 0.5


def evaluate_task(task: str, y, probs, labels: list[str], *, positive=None, threshold=None, groups=None,
                  n_bootstrap: int = 0, seed: int = 0) -> dict:
    """The task's metrics. Every task reports ``auc`` (binary AUC, macro AUC over classes, findings, or
    ordinal cuts), ``auc_ci`` with a bootstrap, and ``log_loss`` (validation NLL, for choosing)."""
    y, probs = np.asarray(y), np.asarray(probs, dtype=np.float64)
    if task == "multilabel":
        out = evaluate_multilabel(y, probs, labels, thresholds=threshold, groups=groups, n_bootstrap=n_bootstrap,
                                  seed=seed)
        out["auc"], out["auc_ci"] = out["macro_auc"], out.get("macro_auc_ci")
        p = np.clip(probs, 1e-12, 1 - 1e-12)
        out["log_loss"] = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
        return out
    out = evaluate(y, probs, labels, positive=positive, threshold=threshold, groups=groups,
                   n_bootstrap=n_bootstrap, seed=seed)
    if task == "ordinal":
        ordinal = evaluate_ordinal(y, probs, labels, groups=groups, n_bootstrap=n_bootstrap, seed=seed)
        out["multiclass_accuracy"] = out.get("accuracy")   # the argmax's, beside the median grade's
        out.update({k: v for k, v in ordinal.items() if k not in ("n", "n_per_class")})
        out["auc"], out["auc_ci"] = ordinal.get("cut_auc_macro"), ordinal.get("cut_auc_macro_ci")
    return out


def macro_auc(y: np.ndarray, probs: np.ndarray) -> float | None:
    """Mean AUC over the findings with both classes in ``y`` (None when none has)."""
    from sklearn.metrics import roc_auc_score

    aucs = [roc_auc_score(y[:, k], probs[:, k]) for k in range(y.shape[1]) if 0 < y[:, k].sum() < len(y)]
    return float(np.mean(aucs)) if aucs else None


def qwk(y: np.ndarray, pred: np.ndarray, k: int) -> float | None:
    """Quadratic weighted kappa over the k grades (None when undefined)."""
    from sklearn.metrics import cohen_kappa_score

    value = cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(k)))
    return float(value) if np.isfinite(value) else None
