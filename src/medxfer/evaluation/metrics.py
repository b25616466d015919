"""Classification metrics for medical image models, with bootstrap confidence intervals.

Usage::

    from medxfer.evaluation import evaluate

    report = evaluate(y_true, probs, ["benign", "malignant"], threshold=0.31,
                      groups=patient_ids, n_bootstrap=2000, seed=0)
    report["sensitivity"], report["sensitivity_ci"]      # 0.91, [0.86, 0.95]

Every value in the returned dict is a plain Python int, float, list, dict or ``None``; a metric
that is undefined on the data (the AUC when ``y_true`` holds one class only, the PPV when nothing is
predicted positive) is ``None``, never NaN.

Definitions
-----------
* **Binary** (K == 2): ``positive`` is the index of the positive class. ``P(positive) >= threshold``
  means "predicted positive". Sensitivity = TP/(TP+FN), specificity = TN/(TN+FP), PPV = TP/(TP+FP),
  NPV = TN/(TN+FN), balanced accuracy = (sensitivity + specificity)/2, F1 = 2TP/(2TP+FP+FN).
  ``brier`` is the mean squared error of P(positive) against the 0/1 outcome.
* **Multi-class** (K > 2): predictions are the argmax; ``auc`` is the macro mean of the one-vs-rest
  AUCs (``None`` unless every class is present); ``balanced_accuracy`` is the mean recall over the
  classes present in ``y_true``; ``f1`` is the macro F1 over the classes that occur in ``y_true`` or
  the predictions; ``brier`` is the mean over images of sum_k (p_k - [y == k])^2 (range 0..2).
* ``log_loss`` (both cases): the mean negative log-likelihood of the true class, -mean log p_y (p
  clipped at 1e-12); the measure ``--select loss`` and ``medxfer auto`` rank by on validation.
* ``ece`` (both cases): 15 equal-width bins on the confidence max_k p_k, right-closed
  ((0, 1/15], ...); ECE = sum_b (n_b / N) |accuracy_b - confidence_b| where accuracy_b is the
  fraction of the bin's images whose argmax class is right.

Bootstrap
---------
With ``n_bootstrap > 0`` the 95% percentile interval of each main scalar metric is reported as
``"<name>_ci": [lo, hi]``. With ``groups`` (patient ids) whole patients are drawn with replacement
and all their images enter once per draw; otherwise images are drawn. A resample is used only when
every class occurs in it (``n_bootstrap_used`` counts those); within a used resample a metric
that is undefined (a PPV without predicted positives) is left out of that metric's interval only.
Resamples are represented as per-image weights (how many times each image is drawn), so all of
them are evaluated at once with numpy. The ECE and the argmax metrics get no interval.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.metrics import average_precision_score, brier_score_loss, confusion_matrix, roc_auc_score

from medxfer.errors import MedxferError
from medxfer.evaluation.calibration import expected_calibration_error

BINARY_CI_METRICS = ("auc", "average_precision", "accuracy", "balanced_accuracy", "f1",
                     "sensitivity", "specificity", "ppv", "npv", "brier")
MULTICLASS_CI_METRICS = ("auc", "accuracy", "balanced_accuracy", "f1", "brier")
_CHUNK_ELEMENTS = 1 << 21  # resample weights evaluated per block: rows * n_images <= this


def to_numpy(x, dtype=None) -> np.ndarray:
    """Return ``x`` (list, numpy array or torch tensor, on any device) as a numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _py(x):
    """A plain Python float, or None for NaN / None."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _div(num, den):
    """num / den elementwise, NaN where den == 0."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _rates(tp, fp, fn, tn) -> dict:
    """Threshold metrics from (possibly weighted, possibly vectorised) confusion counts."""
    sens, spec = _div(tp, tp + fn), _div(tn, tn + fp)
    return {
        "accuracy": _div(tp + tn, tp + fp + fn + tn),
        "balanced_accuracy": (sens + spec) / 2,
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "sensitivity": sens,
        "specificity": spec,
        "ppv": _div(tp, tp + fp),
        "npv": _div(tn, tn + fn),
    }


def confusion_rates(cm) -> dict:
    """Sensitivity, specificity, PPV, NPV, F1, accuracy, balanced accuracy of a 2x2 confusion matrix
    ``[[tn, fp], [fn, tp]]`` (None where undefined): the one definition of these rates."""
    (tn, fp), (fn, tp) = np.asarray(cm, dtype=float)
    return {k: _py(v) for k, v in _rates(tp, fp, fn, tn).items()}


class RankedScores:
    """One score vector and its binary truth, sorted once, so that the AUC and the average
    precision of many resamples (given as per-image weights, shape (B, N)) cost a few numpy passes.

    AUC = sum over tie levels of w_pos(level) * (w_neg(below) + w_neg(level) / 2) / (W_pos W_neg),
    the weighted form of the rank formula (sum of positive ranks - n_pos(n_pos+1)/2)/(n_pos n_neg).
    """

    def __init__(self, scores, is_pos):
        scores, is_pos = to_numpy(scores, float), to_numpy(is_pos, bool)
        self.order = np.argsort(scores, kind="stable")
        ss = scores[self.order]
        self.starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
        self.pos_sorted = is_pos[self.order].astype(float)
        self.is_pos = is_pos

    def _levels(self, weights):
        w = np.atleast_2d(np.asarray(weights, dtype=float))[:, self.order]
        pos = np.add.reduceat(w * self.pos_sorted, self.starts, axis=1)
        neg = np.add.reduceat(w, self.starts, axis=1) - pos
        return pos, neg  # (B, L), levels in ascending score order

    def auc(self, weights) -> np.ndarray:
        pos, neg = self._levels(weights)
        below = np.cumsum(neg, axis=1) - neg
        return _div((pos * (below + 0.5 * neg)).sum(1), pos.sum(1) * neg.sum(1))

    def average_precision(self, weights) -> np.ndarray:
        pos, neg = self._levels(weights)
        pos, neg = pos[:, ::-1], neg[:, ::-1]  # descending thresholds, as sklearn
        tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
        precision = np.nan_to_num(_div(tp, tp + fp))
        return _div((pos * precision).sum(1), pos.sum(1))


def _iter_weights(n, n_bootstrap, rng, groups=None):
    """Yield blocks (B_i, n) of bootstrap weights: how often each image enters each resample."""
    if groups is None:
        inverse, n_units = None, n
    else:
        _, inverse = np.unique(to_numpy(groups), return_inverse=True)
        inverse = inverse.ravel()
        n_units = int(inverse.max()) + 1
    rows = max(1, _CHUNK_ELEMENTS // max(n, n_units))
    done = 0
    while done < n_bootstrap:
        b = min(rows, n_bootstrap - done)
        draws = rng.integers(0, n_units, size=(b, n_units))
        counts = np.bincount((draws + n_units * np.arange(b)[:, None]).ravel(),
                             minlength=b * n_units).reshape(b, n_units)
        yield (counts if inverse is None else counts[:, inverse]).astype(float)
        done += b


def bootstrap_weights(n: int, n_bootstrap: int, *, seed: int = 0, groups=None) -> np.ndarray:
    """All bootstrap resamples as an (n_bootstrap, n) array of draw counts per image.

    With ``groups``, groups are drawn with replacement and each image carries its group's count,
    so every resample holds whole groups only. The same stream as :func:`evaluate` uses.
    """
    rng = np.random.default_rng(seed)
    blocks = list(_iter_weights(n, n_bootstrap, rng, groups))
    return np.concatenate(blocks) if blocks else np.zeros((0, n))


def percentile_ci(values, level: float = 0.95):
    """[lo, hi] percentile interval of the finite values, or None when there are none."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(v, [a, 100 - a])
    return [float(lo), float(hi)]


def check_indices(y_true, n: int, k: int, who: str, noun: str) -> np.ndarray:
    """``y_true`` as n integer indices in 0..k-1 (class indices, grades), or one line saying what is wrong."""
    y = to_numpy(y_true)
    if y.shape != (n,):
        raise MedxferError(f"The 'y_true' parameter of {who} must have shape ({n},) like the rows of probs. "
                           f"Got shape {y.shape} instead.")
    if y.dtype.kind not in "iub" and not (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0)):
        raise MedxferError(f"The 'y_true' parameter of {who} must hold integer {noun}. Got dtype {y.dtype} instead.")
    y = y.astype(int)
    if y.min() < 0 or y.max() >= k:
        raise MedxferError(f"The 'y_true' parameter of {who} must hold {noun} in 0..{k - 1}. Got "
                           f"{int(y.min())}..{int(y.max())} instead.")
    return y


def _validate(y_true, probs, labels, positive, threshold, groups, n_bootstrap):
    probs = to_numpy(probs, float)
    if probs.ndim != 2 or probs.shape[1] < 2 or probs.shape[0] < 1:
        raise MedxferError("The 'probs' parameter of evaluate must be an (N, K) array with N >= 1 "
                           f"and K >= 2 classes. Got shape {probs.shape} instead.")
    n, k = probs.shape
    y = check_indices(y_true, n, k, "evaluate", "class indices")
    labels = [str(lab) for lab in labels]
    if len(labels) != k or len(set(labels)) != k:
        raise MedxferError(f"The 'labels' parameter of evaluate must be {k} distinct class names "
                           f"(one per column of probs). Got {labels!r} instead.")
    if not np.all(np.isfinite(probs)) or probs.min() < -1e-6 or probs.max() > 1 + 1e-6:
        raise MedxferError("The 'probs' parameter of evaluate must hold finite probabilities in "
                           "[0, 1] (apply softmax to logits first).")
    worst = float(np.abs(probs.sum(1) - 1).max())
    if worst > 1e-3:
        raise MedxferError("The rows of the 'probs' parameter of evaluate must sum to 1 (apply "
                           f"softmax to logits first). Got a row off by {worst:.3g} instead.")
    if positive is not None and not (isinstance(positive, (int, np.integer)) and 0 <= positive < k):
        raise MedxferError(f"The 'positive' parameter of evaluate must be a class index in "
                           f"0..{k - 1}. Got {positive!r} instead.")
    if k == 2 and threshold is not None:
        try:
            ok = math.isfinite(float(threshold))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise MedxferError("The 'threshold' parameter of evaluate must be a finite number "
                               "(P(positive) >= threshold -> positive). "
                               f"Got {threshold!r} instead.")
    if groups is not None and to_numpy(groups).shape != (n,):
        raise MedxferError(f"The 'groups' parameter of evaluate must have one entry per image "
                           f"({n}). Got shape {to_numpy(groups).shape} instead.")
    if not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 0:
        raise MedxferError("The 'n_bootstrap' parameter of evaluate must be an integer >= 0. "
                           f"Got {n_bootstrap!r} instead.")
    return y, probs, labels


def _binary(y, probs, positive, threshold):
    """Point estimates and a function of bootstrap weights -> {metric: (B,) array}."""
    is_pos = y == positive
    s = probs[:, positive]
    both = 0 < is_pos.sum() < len(y)
    pred_pos = s >= threshold
    arg_pos = probs.argmax(1) == positive
    out = {"auc": _py(roc_auc_score(is_pos, s)) if both else None,
           "average_precision": _py(average_precision_score(is_pos, s)) if is_pos.any() else None}

    def counts(w, pp):
        tp, fp = w @ (is_pos & pp), w @ (~is_pos & pp)
        npos, nneg = w @ is_pos, w @ ~is_pos
        return tp, fp, npos - tp, nneg - fp

    ones = np.ones(len(y))
    out.update({key: _py(v) for key, v in _rates(*counts(ones, pred_pos)).items()})
    pred = np.where(pred_pos, positive, 1 - positive)
    out["confusion_matrix"] = confusion_matrix(y, pred, labels=[0, 1]).tolist()
    out["threshold"] = float(threshold)
    arg = _rates(*counts(ones, arg_pos))
    out["argmax"] = {key: _py(arg[key]) for key in
                     ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1")}
    out["brier"] = _py(brier_score_loss(is_pos, s))
    ranked, sq = RankedScores(s, is_pos), (s - is_pos) ** 2

    def boot(w):
        res = _rates(*counts(w, pred_pos))
        res["auc"], res["average_precision"] = ranked.auc(w), ranked.average_precision(w)
        res["brier"] = _div(w @ sq, w.sum(1))
        valid = (w @ is_pos > 0) & (w @ ~is_pos > 0)
        return res, valid

    return out, boot


def _multiclass(y, probs, labels):
    k = probs.shape[1]
    onehot = np.eye(k, dtype=bool)[y]
    pred = probs.argmax(1)
    pred_hot = np.eye(k, dtype=bool)[pred]
    ranked = [RankedScores(probs[:, c], onehot[:, c]) for c in range(k)]
    per_class = {labels[c]: (_py(roc_auc_score(onehot[:, c], probs[:, c]))
                             if 0 < onehot[:, c].sum() < len(y) else None) for c in range(k)}
    sq = ((probs - onehot) ** 2).sum(1)
    tp_hot = onehot & pred_hot

    def scores(w):
        cls, predicted, tp = w @ onehot, w @ pred_hot, w @ tp_hot
        with warnings.catch_warnings():  # all-NaN rows (a class missing) -> NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            recall = _div(tp, cls)
            f1 = _div(2 * tp, cls + predicted)  # 2TP / (2TP + FP + FN)
            bal = np.nanmean(np.where(cls > 0, recall, np.nan), axis=1)
            f1m = np.nanmean(f1, axis=1)
        total = w.sum(1)
        return {"accuracy": _div(tp.sum(1), total), "balanced_accuracy": bal, "f1": f1m,
                "brier": _div(w @ sq, total)}, cls

    point, _ = scores(np.ones((1, len(y))))
    defined = [v for v in per_class.values() if v is not None]
    out = {"auc": float(np.mean(defined)) if len(defined) == k else None,
           "per_class_auc": per_class}
    out.update({key: _py(v[0]) for key, v in point.items()})
    out["brier"] = _py(brier_score_loss(y, probs, labels=list(range(k))))
    out["confusion_matrix"] = confusion_matrix(y, pred, labels=list(range(k))).tolist()

    def boot(w):
        res, cls = scores(w)
        res["auc"] = np.mean([r.auc(w) for r in ranked], axis=0)
        return res, (cls > 0).all(1)

    return out, boot


def evaluate(y_true, probs, labels: list[str], *, positive: int | None = None,
             threshold: float | None = None, groups=None, n_bootstrap: int = 0,
             seed: int = 0) -> dict:
    """Evaluate class probabilities against true labels; see the module docstring for definitions.

    ``y_true``: (N,) class indices; ``probs``: (N, K) probabilities, rows summing to 1;
    ``labels``: the K class names. Binary only: ``positive`` (default 1) and ``threshold`` on
    P(positive) (default 0.5). ``groups``: patient ids for the bootstrap. Returns a JSON-ready dict.
    """
    y, probs, labels = _validate(y_true, probs, labels, positive, threshold, groups, n_bootstrap)
    k = probs.shape[1]
    if k == 2:
        positive = 1 if positive is None else int(positive)
        threshold = 0.5 if threshold is None else float(threshold)
        out, boot = _binary(y, probs, positive, threshold)
        ci_names = BINARY_CI_METRICS
    else:
        out, boot = _multiclass(y, probs, labels)
        ci_names = MULTICLASS_CI_METRICS
    out["ece"] = _py(expected_calibration_error(y, probs, n_bins=15))
    out["log_loss"] = _py(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0))))
    out["n"] = int(len(y))
    counts = np.bincount(y, minlength=k)
    out["n_per_class"] = {labels[c]: int(counts[c]) for c in range(k)}
    if k == 2:
        out["positive_label"] = labels[positive]
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        collected = {name: [] for name in ci_names}
        used = 0
        for w in _iter_weights(len(y), int(n_bootstrap), rng, groups):
            res, valid = boot(w)
            used += int(valid.sum())
            for name in ci_names:
                collected[name].append(np.asarray(res[name])[valid])
        for name in ci_names:
            values = np.concatenate(collected[name])
            out[f"{name}_ci"] = percentile_ci(values) if out.get(name) is not None else None
        out["n_bootstrap"] = int(n_bootstrap)
        out["n_bootstrap_used"] = used
        out["bootstrap_unit"] = "group" if groups is not None else "image"
    return out
