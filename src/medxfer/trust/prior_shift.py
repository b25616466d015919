"""Prior-shift adaptation: the class mix of a new, unlabelled batch, and probabilities re-weighted to it.

Usage::

    from medxfer.trust.prior_shift import adapt_prior

    r = adapt_prior(test_probs, source_prior=val_prevalence)     # probabilities calibrated on validation
    r["prevalence"], r["iterations"], r["converged"], r["probs"]  # the batch's estimated class mix, ...
    r = adapt_prior(test_probs, val_prevalence, threshold=0.69)  # binary: r["threshold_on_original"] too

EM of Saerens, Latinne & Decaestecker (2002, Neural Computation 14:21-41): with probabilities ``p(y|x)``
calibrated under the prior ``source_prior`` (the class mix of the split they were calibrated on, i.e.
validation), alternate (E) re-weighting each image's probabilities by ``prior_new / source_prior`` and
normalising, and (M) taking the new prior as the mean of the re-weighted probabilities, until the prior
moves less than ``tol``. It assumes label shift only: the images of each class look as they did in
validation, only their proportions changed. It is as good as the calibration: over-confident
probabilities make the estimate overshoot.

For a binary task, a decision threshold ``t`` on the adapted probability of class 1 equals a threshold on
the original probability of ``odds^-1(odds(t) * w0 / w1)`` with ``w = prior_new / source_prior``:
``threshold_on_original`` says how far the run's validation threshold moves for this batch.
"""

from __future__ import annotations

import math

import numpy as np

from medxfer.errors import MedxferError
from medxfer.trust.checks import check_probs

__all__ = ["adapt_prior", "reweight"]


def _prior(prior, k: int) -> np.ndarray:
    pi = np.asarray(prior, dtype=float).ravel()
    if len(pi) != k or not np.isfinite(pi).all() or (pi <= 0).any():
        raise MedxferError(f"source_prior must be {k} positive class proportions (the validation class mix); got "
                           f"{np.asarray(prior).tolist()!r}.")
    return pi / pi.sum()


def reweight(probs, source_prior, new_prior) -> np.ndarray:
    """``probs`` calibrated under ``source_prior`` as they would be under ``new_prior`` (rows sum to 1)."""
    p = check_probs(probs)
    w = _prior(new_prior, p.shape[1]) / _prior(source_prior, p.shape[1])
    q = p * w[None, :]
    s = q.sum(axis=1, keepdims=True)
    return np.where(s > 0, q / np.where(s > 0, s, 1), 1 / p.shape[1])


def adapt_prior(probs, source_prior, threshold: float | None = None, tol: float = 1e-6,
                max_iter: int = 1000) -> dict:
    """EM prior adaptation of ``probs`` (N, K) from ``source_prior`` (K proportions). Returns ``prevalence``
    (the batch's estimated class mix, a list), ``source_prior``, ``probs`` (re-weighted, (N, K)),
    ``iterations``, ``converged`` and, for K == 2 with a ``threshold``, ``threshold`` and
    ``threshold_on_original`` (see the module docstring)."""
    p = check_probs(probs)
    n, k = p.shape
    src = _prior(source_prior, k)
    if k < 2:
        raise MedxferError("prior adaptation needs at least 2 classes (for a multi-label finding give (1 - p, p)).")
    if not (isinstance(max_iter, int) and max_iter >= 1) or not tol > 0:
        raise MedxferError(f"max_iter must be a positive integer and tol positive; got {max_iter!r}, {tol!r}.")
    p = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-300)
    pi, converged, it = src.copy(), False, 0
    for it in range(1, max_iter + 1):
        q = p * (pi / src)[None, :]
        q /= np.maximum(q.sum(axis=1, keepdims=True), 1e-300)
        new = q.mean(axis=0)
        new = np.maximum(new, 1e-12)
        new /= new.sum()
        step = float(np.abs(new - pi).max())
        pi = new
        if step < tol:
            converged = True
            break
    out = {"prevalence": pi.tolist(), "source_prior": src.tolist(), "probs": reweight(p, src, pi),
           "iterations": it, "converged": converged, "n": n, "method": "EM (Saerens et al. 2002)"}
    if threshold is not None:
        if k != 2:
            raise MedxferError(f"threshold is for binary tasks (2 classes); these probabilities have {k}.")
        t = float(threshold)
        if not 0 < t < 1:
            raise MedxferError(f"threshold must be between 0 and 1 (on the probability of class 1); got {threshold!r}.")
        w = pi / src
        odds = t / (1 - t) * w[0] / w[1]
        out["threshold"] = t
        out["threshold_on_original"] = odds / (1 + odds) if math.isfinite(odds) else 1.0
    return out
