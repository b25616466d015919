"""Stratified, patient-grouped splits and k-fold; leakage checks on given splits.

Usage::

    manifest = assign_splits(manifest, seed=0)          # keeps given splits, else makes 70/15/15
    folds = kfold(manifest, k=5, seed=0)                # fold index per row, patients never split
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from medxfer.data.manifest import Manifest
from medxfer.data.multilabel_split import multilabel_kfold, multilabel_split
from medxfer.errors import MedxferError
from medxfer.privacy import hash_id

N_PARTS = 20  # the split is made of 20 stratified (grouped) parts: 3 test, 3 val, 14 train


def _groups(manifest: Manifest, split_by: str | None) -> np.ndarray | None:
    """Group key per row; a row without one (no patient id) is a group of its own."""
    if split_by in (None, "none"):
        return None
    col = "patient_id" if split_by == "auto" else split_by
    if col not in manifest.table or not manifest.table[col].notna().any():
        if split_by == "auto":
            return None
        if col in manifest.table:
            raise MedxferError(f"--split-by '{split_by}': that column is empty in every row.")
        raise MedxferError(f"--split-by '{split_by}' is not a column of the manifest; it has "
                           f"{list(manifest.table.columns)}.")
    values = manifest.table[col]
    keys = values.astype(object).map(str).to_numpy(dtype=object)  # str(v), as the group names always were
    missing = values.isna().to_numpy()
    if missing.any():
        keys[missing] = ["\x00row:" + str(s) for s in manifest.table["sample_id"].to_numpy()[missing]]
    return keys


def _folds(y: np.ndarray, groups: np.ndarray | None, k: int, seed: int) -> np.ndarray:
    fold = np.full(len(y), -1)
    if groups is None:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(len(y)), y)
    else:
        if len(np.unique(groups)) < k:
            raise MedxferError(f"only {len(np.unique(groups))} patients: too few for {k} grouped parts. "
                               "Use fewer folds or give the splits in the manifest.")
        return grouped_folds(y, groups, k, seed)
    for i, (_, idx) in enumerate(parts):
        fold[idx] = i
    return fold


def grouped_folds(y: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold per row: scikit-learn's ``StratifiedGroupKFold(k, shuffle=True, random_state=seed)``, the same
    folds to the last row, in arrays instead of per-row Python loops.

    scikit-learn's version costs O(groups x k) NumPy calls on tiny arrays plus k passes over the rows
    in Python (minutes at 1M rows, ~330k patients). Here the rows are counted per group with one
    ``np.add.at``, the k candidate folds of each group are scored in one (k, k, classes) array with the
    same arithmetic (so the same floating-point results and the same ties), and rows get their group's
    fold by indexing. Raises ValueError with scikit-learn's messages where it would raise.
    """
    _, y_inv, y_cnt = np.unique(np.asarray(y), return_inverse=True, return_counts=True)
    y_inv = y_inv.reshape(-1)
    if np.all(k > y_cnt):
        raise ValueError("n_splits=%d cannot be greater than the number of members in each class." % k)
    if k > np.min(y_cnt):
        warnings.warn("The least populated class in y has only %d members, which is less than n_splits=%d."
                      % (np.min(y_cnt), k), UserWarning)
    groups_inv, uniques = pd.factorize(np.asarray(groups, dtype=object), sort=True)  # np.unique's order
    n_groups = len(uniques)
    if k > n_groups:
        raise ValueError(f"Cannot have number of splits n_splits={k} greater than the number of groups: {n_groups}.")
    per_group = np.zeros((n_groups, len(y_cnt)))
    np.add.at(per_group, (groups_inv, y_inv), 1)
    rng = np.random.RandomState(seed)
    perm = np.arange(n_groups)
    rng.shuffle(perm)
    per_group = per_group[perm]
    inv_perm = np.empty_like(perm)
    inv_perm[perm] = np.arange(perm.size)
    groups_inv = inv_perm[groups_inv]
    order = np.argsort(-np.std(per_group, axis=1), kind="stable")
    per_fold = np.zeros((k, len(y_cnt)))
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    cnt = y_cnt.reshape(1, 1, -1)
    eye = np.eye(k)[:, :, None]
    for g in order:
        counts = per_group[g]
        # row i: the fold counts with this group added to fold i (scikit-learn adds, divides, takes the std)
        ratio = (per_fold + eye * counts) / cnt
        evals = _std_folds(ratio, k).mean(axis=1).tolist()
        sizes = per_fold.sum(axis=1).tolist()
        best, min_eval, min_size = 0, np.inf, np.inf
        for i, (e, n) in enumerate(zip(evals, sizes)):
            close = min_eval != np.inf and abs(e - min_eval) <= 1e-8 + 1e-5 * abs(min_eval)  # np.isclose
            if e < min_eval or (close and n < min_size):
                best, min_eval, min_size = i, e, n
        per_fold[best] += counts
        fold_of_group[g] = best
    return fold_of_group[groups_inv]


def assign_splits(manifest: Manifest, seed: int = 0, split_by: str | None = "auto") -> Manifest:
    """Return the manifest with a ``split`` column: the given one (checked for leakage) or a new one."""
    groups = _groups(manifest, split_by)
    if manifest.has_splits:
        if groups is not None:
            check_leakage(manifest, groups, hashed=split_by in ("auto", "patient_id"))
        return manifest
    t = manifest.table.copy()
    if manifest.multilabel:  # iterative stratification over every finding, patients kept whole
        t["split"] = multilabel_split(manifest.targets(), groups=groups, seed=seed)
        out = manifest.with_table(t)
        out.notes.append(f"made a multi-label stratified{' patient-grouped' if groups is not None else ''} 70/15/15 "
                         f"split with seed {seed}")
        return out
    y = manifest.table["label"].to_numpy()
    counts = np.bincount(y)
    if counts[counts > 0].min() < N_PARTS // 4 and groups is None:
        raise MedxferError(f"the smallest class has {counts[counts > 0].min()} images: too few to split into "
                           "train/val/test. Give the splits in the manifest or add images.")
    t["split"] = _make_split(y, groups, seed)
    out = manifest.with_table(t)
    out.notes.append(f"made a stratified{' patient-grouped' if groups is not None else ''} 70/15/15 split with seed {seed}")
    return out


def check_leakage(manifest: Manifest, groups: np.ndarray, hashed: bool = False) -> None:
    """Refuse given splits that put one patient in two splits (keys shown hashed).

    ``hashed``: the keys are already hashed (the sources hash ``patient_id``); they are shown as
    they are, so the user finds them in split.csv.
    """
    t = manifest.table.assign(_g=groups)
    per = t.groupby("_g")["split"].nunique()
    leaked = per[per > 1].index.tolist()
    if leaked:
        shown = ", ".join(str(g) if hashed else hash_id(str(g)) for g in leaked[:3])
        raise MedxferError(f"{len(leaked)} patients appear in more than one split (first, hashed: {shown}). "
                           "Images of one patient must stay in one split: fix the split column, or drop it "
                           "and let medxfer make a patient-grouped split.")


def _make_split(y: np.ndarray, groups: np.ndarray | None, seed: int) -> np.ndarray:
    """train/val/test per row, about 70/15/15, stratified; grouped rows stay together."""
    rng = np.random.default_rng(seed)
    split = np.full(len(y), "train", dtype=object)
    if groups is None:  # exact per-class allocation: small classes get their share of train too
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            n = max(1, int(round(0.15 * len(idx))))
            split[idx[:n]], split[idx[n:2 * n]] = "test", "val"
        return split
    n_groups = len(np.unique(groups))
    if n_groups < 3:
        raise MedxferError(f"only {n_groups} patients: too few for a patient-grouped train/val/test split. "
                           "Give the splits in the manifest, or pass --split-by none.")
    n_parts = min(N_PARTS, n_groups)
    try:
        part = _folds(y, groups, n_parts, seed)
    except ValueError as e:  # sklearn: too few images per class for n_parts
        raise MedxferError(f"cannot make a patient-grouped split of {len(y)} images ({e}). "
                           "Give the splits in the manifest or add images.") from e
    n = max(1, int(round(0.15 * n_parts)))
    role = np.full(n_parts, "train", dtype=object)
    order = rng.permutation(n_parts)  # which parts test/val: random, not always the (larger) first ones
    role[order[:n]], role[order[n:2 * n]] = "test", "val"
    return role[part]


def _std_folds(x: np.ndarray, k: int) -> np.ndarray:
    """``np.std(x, axis=1)`` of a (k, k, classes) array, the same operations in the same order as NumPy's
    ``_var`` (so the same floating-point results), without its per-call checks."""
    mean = np.add.reduce(x, axis=1, keepdims=True)
    mean /= k
    d = x - mean
    np.multiply(d, d, out=d)
    var = np.add.reduce(d, axis=1)
    var /= k
    return np.sqrt(var, out=var)


def kfold(manifest: Manifest, k: int, seed: int = 0, split_by: str | None = "auto") -> np.ndarray:
    """Stratified (group) k-fold: the fold index of each row; one patient is never in two folds."""
    if k < 2:
        raise MedxferError(f"The 'folds' parameter must be at least 2. Got {k} instead.")
    if manifest.multilabel:
        return multilabel_kfold(manifest.targets(), groups=_groups(manifest, split_by), k=k, seed=seed)
    return _folds(manifest.table["label"].to_numpy(), _groups(manifest, split_by), k, seed)
