"""Input checks shared by the trust modules: one MedxferError line naming the value and what to do."""

from __future__ import annotations

import numpy as np

from medxfer.errors import MedxferError


def check_alpha(alpha) -> float:
    """``alpha`` as a float in (0, 1), else a MedxferError."""
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise MedxferError(f"alpha must be a number between 0 and 1 (e.g. 0.1 for 90% coverage). Got {alpha!r}.") from None
    if not 0 < a < 1:
        raise MedxferError(f"alpha must be between 0 and 1, exclusive (e.g. 0.1 for 90% coverage). Got {alpha!r}.")
    return a


def check_probs(probs, what: str = "probabilities", k: int | None = None) -> np.ndarray:
    """(N, K) float array of values in [0, 1] (N >= 1; K == ``k`` when given)."""
    p = np.asarray(probs, dtype=float)
    if p.ndim == 1:
        raise MedxferError(f"{what} must be a 2-D array (samples x classes); got a 1-D array of {len(p)} values. "
                           "For a binary task give both columns (1 - p, p).")
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise MedxferError(f"{what} must be a non-empty 2-D array (samples x classes); got shape {p.shape}.")
    if k is not None and p.shape[1] != k:
        raise MedxferError(f"{what} have {p.shape[1]} columns but the calibration record has {k} classes: use the "
                           "record made for this model.")
    if not np.isfinite(p).all():
        raise MedxferError(f"{what} hold {int((~np.isfinite(p)).sum())} NaN or infinite values: check the model's "
                           "output before computing sets or scores.")
    if p.min() < -1e-6 or p.max() > 1 + 1e-6:
        raise MedxferError(f"{what} must lie in [0, 1]; got values from {p.min():.4g} to {p.max():.4g} "
                           "(logits? apply softmax or sigmoid first).")
    return np.clip(p, 0.0, 1.0)


def check_labels(labels, n: int, k: int | None = None, what: str = "labels") -> np.ndarray:
    """(N,) integer class indices in [0, k) (``k`` None: any non-negative index)."""
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != n:
        raise MedxferError(f"{what} must be one class index per sample ({n}); got shape {y.shape}.")
    if len(y) and (not np.issubdtype(y.dtype, np.number) or not np.all(np.equal(np.mod(y, 1), 0))):
        raise MedxferError(f"{what} must be integer class indices 0, 1, ...; got values such as {y[:3].tolist()}.")
    y = y.astype(int)
    if k is None:
        k = int(y.max()) + 1 if len(y) else 1
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise MedxferError(f"{what} must be class indices 0..{k - 1}; got {int(y.min())}..{int(y.max())}.")
    return y


def check_binary_matrix(labels, shape: tuple, what: str = "labels") -> np.ndarray:
    """(N, K) 0/1 matrix (multi-label findings)."""
    y = np.asarray(labels, dtype=float)
    if y.shape != shape:
        raise MedxferError(f"{what} of a multi-label task must be a 0/1 matrix of shape {shape}; got {y.shape}.")
    if not np.isin(y, (0.0, 1.0)).all():
        raise MedxferError(f"{what} of a multi-label task must hold only 0 and 1.")
    return y.astype(int)
