"""What a run records of the trust modules, from its calibrated validation and test probabilities.

Usage::

    from medxfer.trust.run_records import class_prior, conformal_record, conformal_section, selective_section

    record = conformal_record("binary", labels, val_probs, val_y, alpha=0.1)    # model.json 'conformal'; 0: None
    prior = class_prior("binary", val_y, len(labels))                           # model.json 'prior'
    test["conformal"] = conformal_section(record, val_probs, val_y, test_probs, test_y)
    test["selective"] = selective_section("binary", test_probs, test_y, threshold=0.42, pos=0)

``val_y``/``test_y`` are as a run holds them: class (or grade) indices, or a 0/1 (N, K) matrix for a
multi-label run. The conformal record is Mondrian (a threshold per class, see :mod:`.conformal`); the test
section gives its per-class coverage with 95% CIs and mean set size, and the same for a marginal record
calibrated on the same validation probabilities, for comparison (where label shift breaks the latter).
Values that JSON cannot hold (NaN for an empty class) are written as null.
"""

from __future__ import annotations

import math

import numpy as np

from medxfer.trust.conformal import calibrate, coverage_by_class, prediction_sets
from medxfer.trust.selective import at_coverage, risk_coverage

__all__ = ["COVERAGE_LEVELS", "class_prior", "conformal_record", "conformal_section", "selective_section"]

#: the kept fractions the test section reports (refer the least certain 0%, 10%, 20%, 50% to a human)
COVERAGE_LEVELS = (1.0, 0.9, 0.8, 0.5)


def conformal_record(task: str, labels: list[str], val_probs, val_y, alpha: float,
                     method: str = "mondrian") -> dict | None:
    """The run's conformal record at ``alpha`` (None when ``alpha`` is 0: --conformal 0 turns it off)."""
    if not alpha:
        return None
    return calibrate(val_probs, _labels(task, val_y), alpha=alpha, method=method, task=task,
                     class_names=[str(c) for c in labels])


def class_prior(task: str, val_y, k: int) -> list[float] | None:
    """The validation class mix (single-label tasks; None for multi-label): what the calibrated
    probabilities assume, and what ``predict --adapt-prior`` re-weights from."""
    if task == "multilabel":
        return None
    y = np.asarray(val_y).astype(int).ravel()
    counts = np.bincount(y, minlength=k)[:k].astype(float)
    return (counts / counts.sum()).tolist() if counts.sum() else None


def conformal_section(record: dict, val_probs, val_y, test_probs, test_y) -> dict:
    """metrics.json test 'conformal': the record's per-class coverage on test, and the marginal method's."""
    task, names = record["task"], record["classes"]
    marginal = calibrate(val_probs, _labels(task, val_y), alpha=record["alpha"], method="marginal", task=task,
                         class_names=names)
    y = _labels(task, test_y)

    def rows(r: dict) -> list[dict]:
        return [_plain(row) for row in coverage_by_class(prediction_sets(test_probs, r), y, names)]

    return {"alpha": record["alpha"], "method": record["method"], "target": 1 - record["alpha"],
            "by_class": rows(record), "marginal": rows(marginal), "include_always": record["include_always"]}


def selective_section(task: str, test_probs, test_y, threshold=None, pos: int | None = None) -> dict | None:
    """metrics.json test 'selective': accuracy (and sensitivity, binary) when the least certain cases are
    referred, at :data:`COVERAGE_LEVELS`, and the AURC. Binary runs decide at their validation threshold on
    the positive class (sensitivity refers to it); multiclass and ordinal runs by the most probable class;
    None for multi-label runs (one decision per finding)."""
    if task == "multilabel":
        return None
    p, y = np.asarray(test_probs, dtype=float), np.asarray(test_y).astype(int).ravel()
    decision = "argmax"
    if task == "binary" and pos is not None and threshold is not None and not isinstance(threshold, list):
        p, y = p[:, [1 - pos, pos]], (y == pos).astype(int)   # the positive class as column 1
        decision = "threshold"
    else:
        threshold = None
    curve = risk_coverage(p, y, threshold=threshold)
    return {"decision": decision, "at_coverage": [_plain(r) for r in at_coverage(curve, COVERAGE_LEVELS)],
            "aurc": curve["aurc"], "aurc_random": curve["aurc_random"], "n": curve["n"]}


def _labels(task: str, y):
    y = np.asarray(y)
    return y.astype(int) if task == "multilabel" else y.astype(int).ravel()


def _plain(row: dict) -> dict:
    """NaN (an empty class) as None, tuples as lists: what JSON holds."""
    def value(v):
        if isinstance(v, (tuple, list)):
            return [value(x) for x in v]
        if isinstance(v, float) and math.isnan(v):
            return None
        return v

    return {k: value(v) for k, v in row.items()}
