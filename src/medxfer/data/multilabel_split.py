"""Multi-label stratified, patient-grouped train/val/test splits and k-fold.

Usage::

    split = multilabel_split(Y, groups=patient_ids, seed=0)    # 'train'/'val'/'test' per row
    folds = multilabel_kfold(Y, groups=patient_ids, k=5)       # fold index 0..k-1 per row

``Y`` is the (N, K) 0/1 label matrix (one row per image). Each label's positives are spread over
the splits in proportion to ``fractions`` by iterative stratification (Sechidis, Tsoumakas and
Vlahavas 2011): take the label with the fewest positives still unassigned; give each unassigned
positive unit to the split that still lacks the most positives of that label (ties: the split that
lacks the most images; then at random); repeat; units with no positive label go to the split
that lacks the most images. Desired counts are updated after every unit, so a unit assigned for a
rare label counts towards its other labels too. Deterministic for a seed.

With ``groups`` (patient ids) the units are patients and every patient's images stay in one split.
A patient's label vector is **any-positive** (1 when any of their images has the label), not the
count of positive images: the patient is the independent unit, so "how many patients with the
finding are in the test set" is what decides whether a label can be evaluated there, and counts
would let one patient with many follow-up images of a finding (common in chest X-ray collections)
fill a split's quota for that label alone and starve another split of positive patients. The split
sizes are balanced in images (a patient weighs as many images as they have), so ``fractions`` hold
for the images. Without ``groups`` every image is its own unit.

Why not a package: ``iterative-stratification`` (iterstrat) and ``scikit-multilearn`` stratify
single examples only (no groups) and their splitters take train/test or equal folds, not three
arbitrary fractions; with patients as weighted units the algorithm is written out below.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from medxfer.errors import MedxferError

SPLIT_NAMES = ("train", "val", "test")


def _label_matrix(Y, who: str) -> np.ndarray:
    y = Y.detach().cpu().numpy() if hasattr(Y, "detach") else np.asarray(Y)
    if y.ndim != 2 or y.shape[0] < 1 or y.shape[1] < 1:
        raise MedxferError(f"The 'Y' parameter of {who} must be an (N, K) array of 0/1 labels, one "
                           f"row per image. Got shape {y.shape} instead.")
    if y.dtype != bool:
        ok = y.dtype.kind in "iuf" and np.all((y == 0) | (y == 1))
        if not ok:
            flat = y.ravel()
            bad = flat[~((flat == 0) | (flat == 1))] if y.dtype.kind in "iuf" else flat
            raise MedxferError(f"The 'Y' parameter of {who} must hold 0/1 labels only. Got "
                               f"{bad[:3].tolist()} among them instead.")
    return y.astype(bool)


def _units(groups, n: int, who: str) -> np.ndarray:
    """Unit index per row: the patient (in order of first appearance), or the row itself.
    A row without a patient id (None / NaN) is a unit of its own."""
    if groups is None:
        return np.arange(n)
    g = groups.detach().cpu().numpy() if hasattr(groups, "detach") else np.asarray(groups)
    if g.shape != (n,):
        raise MedxferError(f"The 'groups' parameter of {who} must have one patient id per row of Y "
                           f"({n}). Got shape {g.shape} instead.")
    keys = np.array(g, dtype=object)
    missing = pd.isna(pd.Series(keys, dtype=object)).to_numpy()
    keys[missing] = [f"\x00row:{i}" for i in np.flatnonzero(missing)]
    return pd.factorize(keys, sort=False)[0]


def _pick(primary: np.ndarray, secondary: np.ndarray, rng) -> int:
    best = np.flatnonzero(primary >= primary.max() - 1e-9)
    if len(best) > 1:
        best = best[secondary[best] >= secondary[best].max() - 1e-9]
    return int(best[0] if len(best) == 1 else rng.choice(best))


def _stratify(yu: np.ndarray, sizes: np.ndarray, fractions: np.ndarray, rng) -> np.ndarray:
    """Iterative stratification of units (label vectors ``yu``, ``sizes`` images) into
    len(fractions) parts; returns the part of each unit."""
    n_units = len(yu)
    need_label = fractions[:, None] * yu.sum(0)[None, :]  # positives each part still lacks
    need_size = fractions * sizes.sum()                   # images each part still lacks
    part = np.full(n_units, -1)
    order = rng.permutation(n_units)
    yf = yu.astype(float)

    def give(u: int, p: int):
        part[u] = p
        need_label[p] -= yf[u]
        need_size[p] -= sizes[u]

    while True:
        left = yu[part < 0].sum(0)
        if not left.any():
            break
        rarest = np.flatnonzero(left == left[left > 0].min())
        label = int(rarest[0] if len(rarest) == 1 else rng.choice(rarest))
        for u in order:
            if part[u] < 0 and yu[u, label]:
                give(u, _pick(need_label[:, label], need_size, rng))
    for u in order:
        if part[u] < 0:
            give(u, _pick(need_size, need_size, rng))
    for p in range(len(fractions)):  # tiny data: no part may stay empty
        if not (part == p).any():
            counts = np.bincount(part, minlength=len(fractions))
            donors = np.flatnonzero(part == int(np.argmax(counts)))
            part[donors[np.argmin(sizes[donors])]] = p
    return part


def _check_seed(seed, who: str) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise MedxferError(f"The 'seed' parameter of {who} must be an integer >= 0. Got {seed!r} "
                           "instead.")


def _run(Y, groups, fractions, seed, who: str, what: str) -> np.ndarray:
    y = _label_matrix(Y, who)
    _check_seed(seed, who)
    unit = _units(groups, len(y), who)
    n_units = int(unit.max()) + 1
    if n_units < len(fractions):
        kind = "patients" if groups is not None else "images"
        raise MedxferError(f"{who} needs at least {len(fractions)} {kind} for {what}. Got "
                           f"{n_units} instead.")
    yu = np.zeros((n_units, y.shape[1]), dtype=bool)
    np.logical_or.at(yu, unit, y)
    sizes = np.bincount(unit, minlength=n_units).astype(float)
    part = _stratify(yu, sizes, np.asarray(fractions, float), np.random.default_rng(seed))
    return part[unit]


def multilabel_split(Y, groups=None, fractions=(0.70, 0.15, 0.15), seed: int = 0) -> np.ndarray:
    """'train'/'val'/'test' per row of ``Y`` (an object array), stratified for every label; with
    ``groups`` every patient's rows share one split. ``fractions``: (train, val, test), each > 0,
    summing to 1."""
    who = "multilabel_split"
    try:
        f = np.asarray(fractions, dtype=float).reshape(-1) if np.ndim(fractions) == 1 else None
    except (TypeError, ValueError):
        f = None
    if f is None:
        f = np.zeros(0)
    if f.shape != (3,) or not np.all(np.isfinite(f)) or np.any(f <= 0) or abs(f.sum() - 1) > 1e-6:
        raise MedxferError(f"The 'fractions' parameter of {who} must be three numbers > 0 (train, "
                           f"val, test) that sum to 1. Got {fractions!r} instead.")
    part = _run(Y, groups, f, seed, who, "a train/val/test split")
    return np.array(SPLIT_NAMES, dtype=object)[part]


def multilabel_kfold(Y, groups=None, k: int = 5, seed: int = 0) -> np.ndarray:
    """Fold index 0..k-1 per row of ``Y``, stratified for every label; with ``groups`` every
    patient's rows share one fold."""
    who = "multilabel_kfold"
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise MedxferError(f"The 'k' parameter of {who} must be an integer >= 2. Got {k!r} "
                           "instead.")
    return _run(Y, groups, np.full(int(k), 1 / k), seed, who, f"{k} folds").astype(int)
