"""Selective prediction: how accurate the model is on the cases it keeps when it may refer its least
certain ones to a human (the risk-coverage curve).

Usage::

    from medxfer.trust.selective import risk_coverage, at_coverage

    c = risk_coverage(test_probs, test_labels)                   # argmax decisions, confidence = max prob
    c = risk_coverage(test_probs, test_labels, threshold=0.69)   # binary: decision p1 >= threshold
    c["coverage"], c["accuracy"], c["sensitivity"], c["aurc"]
    at_coverage(c, [1.0, 0.9, 0.8])      # rows: coverage, accuracy, sensitivity, n kept, confidence cut

Images are kept from the most to the least confident; ``coverage`` is the fraction kept and ``accuracy``
the accuracy on them (``risk`` = 1 - accuracy). Images with the same confidence are kept or referred
together, so the curve has one point per distinct confidence and does not depend on their order.
``sensitivity`` (binary only) is the recall of class 1 among the kept cases that are class 1.
``aurc``: the area under the risk-coverage curve (mean risk over the kept-fractions, lower is better;
Geifman & El-Yaniv 2017); ``aurc_random`` is what a confidence unrelated to correctness would give (the
overall risk), for comparison.

Confidence: the probability of the predicted class; with a binary ``threshold`` (the run's, chosen on
validation) the distance of p1 from the threshold, as a fraction of the room on its side
((p1 - t)/(1 - t) above, (t - p1)/t below), so that both decisions are measured alike.
"""

from __future__ import annotations

import numpy as np

from medxfer.errors import MedxferError
from medxfer.trust.checks import check_labels, check_probs

__all__ = ["at_coverage", "confidence_and_decision", "risk_coverage"]


def confidence_and_decision(probs, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, decided class) per row of ``probs``; see the module docstring."""
    p = check_probs(probs)
    if threshold is None:
        return p.max(axis=1), p.argmax(axis=1)
    if p.shape[1] != 2:
        raise MedxferError(f"threshold is for binary tasks (2 classes); these probabilities have {p.shape[1]}.")
    t = float(threshold)
    if not 0 < t < 1:
        raise MedxferError(f"threshold must be between 0 and 1 (on the probability of class 1); got {threshold!r}.")
    p1 = p[:, 1]
    decision = (p1 >= t).astype(int)
    conf = np.where(decision == 1, (p1 - t) / (1 - t), (t - p1) / t)
    return conf, decision


def risk_coverage(probs, labels, threshold: float | None = None) -> dict:
    """The risk-coverage curve of ``probs`` (N, K) against class indices ``labels`` (see the module docstring).
    Returns lists: ``coverage``, ``accuracy``, ``risk``, ``sensitivity`` (binary, else None), ``confidence`` (the
    lowest confidence kept at each point), ``n_kept``; floats ``aurc``, ``aurc_random``, ``accuracy_all``."""
    p = check_probs(probs)
    y = check_labels(labels, len(p), p.shape[1])
    conf, decision = confidence_and_decision(p, threshold)
    order = np.argsort(-conf, kind="stable")
    conf, correct, y = conf[order], (decision == y)[order], y[order]
    # the last index of every run of equal confidences: the curve's points
    ends = np.r_[np.flatnonzero(np.diff(conf) != 0), len(conf) - 1]
    kept = ends + 1
    accuracy = np.cumsum(correct)[ends] / kept
    coverage = kept / len(conf)
    sensitivity = None
    if p.shape[1] == 2:
        pos = np.cumsum(y == 1)[ends]
        tp = np.cumsum((y == 1) & correct)[ends]
        sensitivity = [float(a / b) if b else None for a, b in zip(tp, pos)]
    risk = 1 - accuracy
    # area under the step curve: each point stands for the kept-fractions it covers
    widths = np.diff(np.r_[0, coverage])
    return {"coverage": coverage.tolist(), "accuracy": accuracy.tolist(), "risk": risk.tolist(),
            "sensitivity": sensitivity, "confidence": conf[ends].tolist(), "n_kept": kept.tolist(),
            "aurc": float((risk * widths).sum()), "aurc_random": float(1 - correct.mean()),
            "accuracy_all": float(correct.mean()), "n": int(len(conf))}


def at_coverage(curve: dict, levels=(1.0, 0.9, 0.8, 0.7, 0.5)) -> list[dict]:
    """For each target coverage, the largest point of the curve that keeps no more than it: ``target``,
    ``coverage``, ``accuracy``, ``sensitivity``, ``n_kept``, ``confidence`` (the cut: refer below it)."""
    rows = []
    cov = np.asarray(curve["coverage"])
    for level in levels:
        if not 0 < float(level) <= 1:
            raise MedxferError(f"coverage levels must be in (0, 1]; got {level!r}.")
        i = np.searchsorted(cov, float(level) + 1e-12, side="right") - 1
        if i < 0:
            rows.append({"target": float(level), "coverage": 0.0, "accuracy": None, "sensitivity": None,
                         "n_kept": 0, "confidence": None})
            continue
        rows.append({"target": float(level), "coverage": float(cov[i]), "accuracy": curve["accuracy"][i],
                     "sensitivity": curve["sensitivity"][i] if curve["sensitivity"] else None,
                     "n_kept": curve["n_kept"][i], "confidence": curve["confidence"][i]})
    return rows
