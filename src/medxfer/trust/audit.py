"""A label audit: which training samples are most likely mislabelled, and which identical images carry
different labels.

Usage::

    from medxfer.trust.audit import out_of_fold_probs, find_label_issues, conflicting_duplicates

    probs, info = out_of_fold_probs(features, y, folds=5, seed=0)   # each sample predicted by a model
                                                                    # that never saw it
    issues = find_label_issues(probs, y)        # per sample: is_issue, suspected, self_confidence, rank
    groups = conflicting_duplicates(images_uint8, y)                # identical pixels, different labels

Out-of-fold probabilities: a k-fold (5) L2 logistic regression on standardised frozen features, the
cheapest honest estimate: no probability comes from a model that saw the sample's label. The strength C
is chosen once by cross-validated log-loss on all the given samples (a hyperparameter only; each
sample's probability still comes from a fold without it).

Confident learning (Northcutt, Jiang & Chuang 2021, JAIR 70): the threshold of class j is the mean
probability of j over the samples labelled j (its self-confidence); a sample's confident label is the
most probable class among those whose probability reaches their threshold; the confident joint counts
(given label, confident label) pairs. A sample is a suspected label issue when its confident label
differs from its given label (cleanlab's ``filter_by="confident_learning"``); suspects are ranked by the
probability of their given label, lowest first (``rank_by="self_confidence"``). ``estimated_issues`` is
the calibrated confident joint's off-diagonal mass times N, an estimate of how many labels are wrong.

Why not cleanlab's ``find_label_issues``: cleanlab was AGPL-3.0 up to its 2.x releases (newer releases
state Apache-2.0 on PyPI, which would be shippable if pinned and checked), and medxfer needs only this
core, a few lines of numpy on probabilities it already has, with no new dependency.

Conflicting duplicates: exact copies of one image (the same decoded pixels, hashed) whose labels differ,
in any splits. At most one of the labels can be right (BreastMNIST ships one such pair, train/test).
"""

from __future__ import annotations

import hashlib

import numpy as np

from medxfer.errors import MedxferError
from medxfer.trust.checks import check_labels, check_probs

__all__ = ["C_GRID", "conflicting_duplicates", "find_label_issues", "out_of_fold_probs"]

C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def out_of_fold_probs(features, labels, folds: int = 5, seed: int = 0, C: float | None = None
                      ) -> tuple[np.ndarray, dict]:
    """(probabilities (N, K), info) where every row comes from a logistic regression fitted on the other
    folds; K = max(label) + 1. ``info``: ``folds``, ``C``, ``model``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from threadpoolctl import threadpool_limits

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0 or not np.isfinite(x).all():
        raise MedxferError(f"features must be a finite, non-empty 2-D array (samples x dimensions); got shape "
                           f"{x.shape}.")
    y = check_labels(labels, len(x))
    k = int(y.max()) + 1
    counts = np.bincount(y, minlength=k)
    present = counts[counts > 0]
    if len(present) < 2:
        raise MedxferError("the audited samples hold one class only: a label audit needs at least two classes.")
    folds = int(folds)
    if folds < 2:
        raise MedxferError(f"--folds must be at least 2; got {folds}.")
    if present.min() < folds:
        raise MedxferError(f"a class has {int(present.min())} audited sample(s), fewer than --folds {folds}: lower "
                           "--folds or audit more splits.")
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    with threadpool_limits(limits=1, user_api="blas"):   # small matrices: BLAS threads only contend
        if C is None:
            def loss(c):
                model = _model(LogisticRegression, c, seed)
                return cross_val_score(model, _standard(x, x), y, cv=cv, scoring="neg_log_loss").mean()
            C = max(C_GRID, key=loss)
        probs = np.zeros((len(x), k))
        for fit, held in cv.split(x, y):   # every class has >= folds samples: each fit sees all of them
            model = _model(LogisticRegression, C, seed).fit(_standard(x[fit], x[fit]), y[fit])
            probs[np.ix_(held, model.classes_)] = model.predict_proba(_standard(x[fit], x[held]))
    return probs, {"folds": folds, "C": float(C), "model": "L2 logistic regression on standardised features, "
                   f"{folds}-fold out-of-fold, C by cross-validated log-loss over {list(C_GRID)}"}


def _model(cls, C: float, seed: int):
    return cls(C=C, max_iter=3000, random_state=seed)


def _standard(fit: np.ndarray, x: np.ndarray) -> np.ndarray:
    mu, sd = fit.mean(axis=0), fit.std(axis=0)
    sd = np.maximum(sd, max(1e-2 * float(sd.mean()), 1e-12))
    return (x - mu) / sd


def find_label_issues(probs, labels) -> dict:
    """Confident learning on out-of-fold ``probs`` (N, K) and given ``labels`` (see the module docstring).
    Returns arrays ``is_issue`` (bool), ``suspected`` (the confident label, else the most probable class),
    ``self_confidence`` (probability of the given label), ``rank`` (1 = most likely mislabelled; 0 for samples
    not suspected), and ``thresholds`` (per class), ``confident_joint`` (K x K, rows given, columns
    confident), ``estimated_issues`` (int)."""
    p = check_probs(probs, "out-of-fold probabilities")
    n, k = p.shape
    y = check_labels(labels, n, k)
    counts = np.bincount(y, minlength=k)
    thresholds = np.array([p[y == j, j].mean() if counts[j] else 1.0 for j in range(k)])
    above = p >= thresholds[None, :] - 1e-12
    masked = np.where(above, p, -1.0)
    has = above.any(axis=1)
    confident = np.where(has, masked.argmax(axis=1), -1)
    joint = np.zeros((k, k), dtype=int)
    np.add.at(joint, (y[has], confident[has]), 1)
    is_issue = has & (confident != y)
    self_conf = p[np.arange(n), y]
    suspected = np.where(has, confident, p.argmax(axis=1))
    rank = np.zeros(n, dtype=int)
    order = np.flatnonzero(is_issue)[np.argsort(self_conf[is_issue], kind="stable")]
    rank[order] = np.arange(1, len(order) + 1)
    # calibrated joint: each row scaled to the given class's count, then normalised to sum 1
    rows = joint.sum(axis=1, keepdims=True)
    calibrated = np.where(rows > 0, joint / np.maximum(rows, 1) * counts[:, None], 0.0)
    calibrated = calibrated / max(calibrated.sum(), 1e-12)
    estimated = int(round(n * (calibrated.sum() - np.trace(calibrated))))
    return {"is_issue": is_issue, "suspected": suspected, "self_confidence": self_conf, "rank": rank,
            "thresholds": thresholds.tolist(), "confident_joint": joint.tolist(), "estimated_issues": estimated,
            "n": n}


def pixel_hash(image: np.ndarray) -> str:
    """BLAKE2b of an image's bytes, dtype and shape (identical pixels <=> identical hash)."""
    a = np.ascontiguousarray(image)
    h = hashlib.blake2b(a.tobytes(), digest_size=16)
    h.update(repr((a.dtype.str, a.shape)).encode())
    return h.hexdigest()


def conflicting_duplicates(images, labels) -> list[list[int]]:
    """Groups (row indices, sorted) of byte-identical images whose labels are not all the same, in any
    splits. ``images``: (N, ...) array (or tensor) of pixels; ``labels``: (N,) labels of any type, or an (N, K)
    0/1 matrix (multi-label rows compared whole)."""
    arr = images.numpy() if hasattr(images, "numpy") else np.asarray(images)
    lab = np.asarray(labels)
    if len(arr) != len(lab):
        raise MedxferError(f"{len(arr)} images for {len(lab)} labels: they must align row for row.")
    by_hash: dict[str, list[int]] = {}
    for i in range(len(arr)):
        by_hash.setdefault(pixel_hash(arr[i]), []).append(i)
    key = (lambda i: lab[i].tobytes()) if lab.ndim > 1 else (lambda i: lab[i])
    groups = [g for g in by_hash.values() if len(g) > 1 and len({key(i) for i in g}) > 1]
    return sorted(groups)
