"""The decision rules: from a run's calibrated probabilities to what it predicts. One rule for predict,
report, explain and serve.

Usage::

    from medxfer.evaluation.decisions import decide, findings

    pred = decide(probs, run.model)       # (N,) class indices (multi-label: the finding furthest above its threshold)
    on = findings(probs, run.model)       # multi-label: (N, K) booleans, each finding at its own threshold

``meta`` is a :class:`~medxfer.runs.ModelMeta` (or anything with its ``task``, ``threshold`` and
``positive_index``).
"""

from __future__ import annotations

import numpy as np

from medxfer.evaluation.ordinal import predict_grade

__all__ = ["decide", "findings"]


def decide(probs: np.ndarray, meta) -> np.ndarray:
    """Predicted class indices: the run's validation threshold on the positive class for a binary run,
    the median grade for an ordinal one, else the argmax; for a multi-label run, the finding furthest above
    its threshold (the one Grad-CAM explains by default; :func:`findings` gives them all)."""
    task = getattr(meta, "task", "")
    if task == "multilabel":
        return (probs - np.asarray(_thresholds(meta, probs.shape[1]))).argmax(1)
    if task == "ordinal":
        return predict_grade(probs)
    pos = meta.positive_index
    if pos is not None and meta.threshold is not None:
        return np.where(probs[:, pos] >= meta.threshold, pos, 1 - pos)
    return probs.argmax(1)


def findings(probs: np.ndarray, meta) -> np.ndarray:
    """Multi-label: (N, K) booleans, each finding at its threshold chosen on validation."""
    return probs >= np.asarray(_thresholds(meta, probs.shape[1]))


def _thresholds(meta, k: int) -> list[float]:
    t = meta.threshold
    return [float(v) for v in t] if isinstance(t, (list, tuple)) else [float(t if t is not None else 0.5)] * k
