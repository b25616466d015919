"""Split conformal prediction sets, calibrated on the validation split.

Usage::

    from medxfer.trust.conformal import calibrate, prediction_sets, coverage_by_class

    record = calibrate(val_probs, val_labels, alpha=0.1)                 # Mondrian (per class), the default
    record = calibrate(val_probs, val_labels, alpha=0.1, method="marginal")
    record = calibrate(val_probs, val_y_matrix, task="multilabel")       # per finding: {absent, present}
    record = calibrate(val_probs, val_grades, task="ordinal")            # sets are contiguous grade ranges
    sets = prediction_sets(test_probs, record)      # (N, K) bool; multi-label: (N, K, 2) [absent, present]
    coverage_by_class(sets, test_labels)            # per class: n, covered, coverage, 95% CI, mean set size

What is guaranteed: with nonconformity score ``1 - p(class)`` and a threshold per class taken as the
``ceil((n_k + 1)(1 - alpha))``-th smallest score among the ``n_k`` validation samples of class k, a new
sample of class k gets a set holding k with probability >= 1 - alpha, for every class separately
("Mondrian", class-conditional), as long as the new samples of that class are exchangeable with the
validation samples of that class. That survives a change in the class mix (label shift), which is why it
is the default. ``method="marginal"`` pools all classes into one threshold: the guarantee is then only
on average over the validation class mix, and a rare or hard class can be covered far less (the tests
show it). Nothing is guaranteed when the images themselves change (another scanner, another site): that
is what :mod:`medxfer.trust.ood` is for.

When a class has fewer validation samples than the level needs (``n_k < (1 - alpha)/alpha``, i.e.
fewer than 9 at alpha 0.1) no finite threshold can promise the level: that class's threshold is "include always"
(``None`` in the record, listed in ``include_always``), honest rather than silently under-covering.

Multi-label tasks: each finding is its own binary problem, and its set is a subset of {absent, present}
(Mondrian over the two states of each finding). Ordinal tasks: the set of grades is filled to the
contiguous range between its lowest and highest grade (a superset, so the guarantee still holds).
``nonempty`` (default on) adds the most probable class to an empty set (again a superset).

Why numpy and not MAPIE or crepes: MAPIE's classifiers wrap a scikit-learn estimator and fit or
calibrate it themselves, while medxfer's probabilities come from a PyTorch model with its own temperature
already fitted; crepes takes calibration scores and Mondrian bins, which works, but for what amounts to
one quantile per class it would add a dependency whose record is a Python object rather than a few JSON
floats that ``model.json`` can hold. The quantile rule above is the one both libraries implement.
"""

from __future__ import annotations

import math

import numpy as np

from medxfer.errors import MedxferError
from medxfer.trust.checks import check_alpha, check_binary_matrix, check_labels, check_probs

__all__ = ["METHODS", "TASKS", "calibrate", "coverage_by_class", "min_samples", "prediction_sets", "set_text"]

METHODS = ("mondrian", "marginal")
TASKS = ("multiclass", "binary", "ordinal", "multilabel")
SCORE = "1 - p(class)"


def min_samples(alpha: float) -> int:
    """The fewest calibration samples for which a finite threshold at level 1 - alpha exists."""
    a = check_alpha(alpha)
    return max(1, math.ceil((1 - a) / a - 1e-9))


def _threshold(scores: np.ndarray, alpha: float) -> float:
    """The ceil((n + 1)(1 - alpha))-th smallest score; +inf when that rank exceeds n."""
    n = len(scores)
    rank = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    if rank > n:
        return math.inf
    return float(np.sort(scores)[rank - 1])


def _check_task_method(task: str, method: str) -> None:
    if task not in TASKS:
        raise MedxferError(f"task must be one of {list(TASKS)}; got {task!r}.")
    if method not in METHODS:
        raise MedxferError(f"the conformal method must be one of {list(METHODS)} (mondrian: a guarantee per class; "
                           f"marginal: on average only); got {method!r}.")


def calibrate(probs, labels, alpha: float = 0.1, method: str = "mondrian", task: str = "multiclass",
              class_names: list[str] | None = None) -> dict:
    """A conformal record from validation ``probs`` (N, K) and ``labels`` (class indices, or a 0/1 (N, K)
    matrix for ``task="multilabel"``). The record is JSON-ready: ``alpha``, ``method``, ``task``,
    ``score``, ``classes``, ``thresholds`` (a float per class, ``None`` = include always; multi-label: per
    finding ``[absent, present]``), ``n`` (validation samples behind each threshold), ``include_always``
    (the classes or ``finding:state`` too small for the level) and ``min_n`` (the samples a class needs)."""
    alpha = check_alpha(alpha)
    _check_task_method(task, method)
    p = check_probs(probs, "validation probabilities")
    n, k = p.shape
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise MedxferError(f"{len(names)} class names for {k} probability columns: give one name per column.")
    if task == "multilabel":
        y = check_binary_matrix(labels, p.shape, "validation labels")
        thresholds, counts, always = [], [], []
        for j in range(k):
            # state 0 (absent) scores 1 - p(absent) = p_j, state 1 (present) scores 1 - p_j
            s = np.where(y[:, j] == 1, 1 - p[:, j], p[:, j])
            groups = [y[:, j] == 0, y[:, j] == 1] if method == "mondrian" else [np.ones(n, bool)] * 2
            qs = [_threshold(s[g], alpha) for g in groups]
            counts.append([int(g.sum()) for g in groups])
            thresholds.append([None if math.isinf(q) else q for q in qs])
            always += [f"{names[j]}:{state}" for state, q in zip(("absent", "present"), qs) if math.isinf(q)]
    else:
        if task == "binary" and k != 2:
            raise MedxferError(f"a binary task needs 2 probability columns; got {k}.")
        y = check_labels(labels, n, k, "validation labels")
        s = 1 - p[np.arange(n), y]
        if method == "mondrian":
            qs = [_threshold(s[y == c], alpha) for c in range(k)]
            counts = [int((y == c).sum()) for c in range(k)]
        else:
            qs, counts = [_threshold(s, alpha)] * k, [n] * k
        thresholds = [None if math.isinf(q) else q for q in qs]
        always = [names[c] for c in range(k) if math.isinf(qs[c])]
    return {"kind": "split-conformal", "alpha": alpha, "method": method, "task": task, "score": SCORE,
            "classes": names, "thresholds": thresholds, "n": counts, "include_always": always,
            "min_n": min_samples(alpha)}


def _check_record(record) -> dict:
    if not isinstance(record, dict) or record.get("kind") != "split-conformal" or "thresholds" not in record:
        raise MedxferError("not a conformal record: make one with medxfer.trust.conformal.calibrate on the "
                           "validation probabilities.")
    _check_task_method(record.get("task"), record.get("method"))
    return record


def _limits(thresholds) -> np.ndarray:
    """The record's thresholds as floats, ``None`` (include always) as +inf."""
    def value(t):
        return math.inf if t is None else float(t)

    return np.array([[value(t) for t in row] if isinstance(row, (list, tuple)) else value(row) for row in thresholds])


def prediction_sets(probs, record: dict, nonempty: bool = True) -> np.ndarray:
    """The conformal sets of ``probs`` (N, K) under ``record``: (N, K) bool (class k in the set), or for a
    multi-label record (N, K, 2) bool ([absent, present] in the set of finding k). See the module docstring
    for ``nonempty`` and for ordinal filling."""
    record = _check_record(record)
    k = len(record["thresholds"])
    p = check_probs(probs, "probabilities", k=k)
    q = _limits(record["thresholds"])
    if record["task"] == "multilabel":
        sets = np.stack([p <= q[:, 0][None, :] + 1e-12, 1 - p <= q[:, 1][None, :] + 1e-12], axis=2)
        if nonempty:
            empty = ~sets.any(axis=2)
            more_likely_present = p >= 0.5
            sets[..., 1] |= empty & more_likely_present
            sets[..., 0] |= empty & ~more_likely_present
        return sets
    sets = (1 - p) <= q[None, :] + 1e-12
    if nonempty:
        empty = ~sets.any(axis=1)
        sets[np.flatnonzero(empty), p[empty].argmax(axis=1)] = True
    if record["task"] == "ordinal":
        has = sets.any(axis=1)
        lo = np.where(has, sets.argmax(axis=1), 0)
        hi = np.where(has, k - 1 - sets[:, ::-1].argmax(axis=1), -1)
        grades = np.arange(k)[None, :]
        sets = (grades >= lo[:, None]) & (grades <= hi[:, None])
    return sets


def _ci(covered: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson interval of a proportion (exact, conservative)."""
    from scipy.stats import beta

    if n == 0:
        return (math.nan, math.nan)
    a = (1 - level) / 2
    lo = 0.0 if covered == 0 else float(beta.ppf(a, covered, n - covered + 1))
    hi = 1.0 if covered == n else float(beta.ppf(1 - a, covered + 1, n - covered))
    return lo, hi


def coverage_by_class(sets, labels, class_names: list[str] | None = None) -> list[dict]:
    """Per class (multi-label: per finding and state): ``class``, ``n``, ``covered``, ``coverage``, its 95%
    Clopper-Pearson ``ci``, and ``mean_set_size`` over that class's samples; a last row ``all``."""
    s = np.asarray(sets, dtype=bool)
    if s.ndim == 3:  # multi-label: each finding's states
        y = check_binary_matrix(labels, s.shape[:2], "labels")
        rows = []
        for j in range(s.shape[1]):
            name = class_names[j] if class_names else str(j)
            for state in (0, 1):
                m = y[:, j] == state
                hit = s[m, j, state]
                rows.append(_row(f"{name}:{('absent', 'present')[state]}", hit, s[m, j].sum(axis=1)))
        hit_all = np.take_along_axis(s, y[..., None], axis=2)[..., 0].ravel()
        rows.append(_row("all", hit_all, s.sum(axis=2).ravel()))
        return rows
    if s.ndim != 2:
        raise MedxferError(f"sets must be the (N, K) array prediction_sets returns; got shape {s.shape}.")
    y = check_labels(labels, len(s), s.shape[1], "labels")
    hit = s[np.arange(len(s)), y]
    size = s.sum(axis=1)
    rows = [_row(class_names[c] if class_names else str(c), hit[y == c], size[y == c]) for c in range(s.shape[1])]
    rows.append(_row("all", hit, size))
    return rows


def _row(name: str, hit: np.ndarray, size: np.ndarray) -> dict:
    n, c = int(len(hit)), int(np.sum(hit))
    return {"class": name, "n": n, "covered": c, "coverage": c / n if n else math.nan, "ci": _ci(c, n),
            "mean_set_size": float(np.mean(size)) if n else math.nan}


def set_text(sets, class_names: list[str]) -> list[str]:
    """Each set as text for a table column: class names joined by ``|`` (ordinal: ``lo..hi``; empty: ``-``);
    multi-label sets give ``finding=absent|present`` per finding, joined by ``;``."""
    s = np.asarray(sets, dtype=bool)
    if s.ndim == 3:
        states = ("absent", "present")
        return [";".join(f"{class_names[j]}=" + "|".join(states[t] for t in (0, 1) if row[j, t]) for j in range(len(row)))
                for row in s]
    return ["|".join(class_names[c] for c in np.flatnonzero(row)) or "-" for row in s]
