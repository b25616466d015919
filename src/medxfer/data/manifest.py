"""The Manifest: one row per sample (image ref, label, patient, split), validated once.

Usage::

    m = load_manifest("data/breastmnist_28.npz")
    m.table.columns  # sample_id, label, split, [path | row], [patient_id]
    m.labels         # class names, index = label value
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from medxfer.errors import MedxferError, did_you_mean

SPLITS = ("train", "val", "test")
log = logging.getLogger(__name__)


@dataclass
class Manifest:
    """Samples and their labels.

    ``table`` columns: ``sample_id`` (str, unique), ``label`` (int index into ``labels``), ``split``
    (train/val/test or missing), and either ``path`` (a file) or ``row`` (an index into ``arrays``),
    optionally ``patient_id``.
    """

    table: pd.DataFrame
    labels: list[str]
    origin: str
    arrays: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def has_patients(self) -> bool:
        return "patient_id" in self.table and self.table["patient_id"].notna().any()

    @property
    def has_splits(self) -> bool:
        return "split" in self.table and self.table["split"].notna().all()

    def subset(self, mask) -> "Manifest":
        return Manifest(self.table[np.asarray(mask)].reset_index(drop=True), self.labels, self.origin,
                        self.arrays, list(self.notes))

    def counts(self) -> dict:
        """Counts per split and class (and patients), for logs and the report."""
        out = {}
        for split, part in self.table.groupby("split", sort=False):
            entry = {"n": int(len(part)),
                     "per_class": {self.labels[i]: int((part["label"] == i).sum()) for i in range(len(self.labels))}}
            if self.has_patients:
                entry["patients"] = int(part["patient_id"].nunique())
            out[str(split)] = entry
        return out


def labels_from_values(values: pd.Series, names: list[str] | None, where: str) -> tuple[np.ndarray, list[str]]:
    """Map raw label values to indices; class names from ``names`` or the sorted distinct values.

    Numbers are compared as numbers: ``1``, ``1.0`` and ``"1"`` are one class (a CSV column of
    floats in one split and integers in another must not make two classes). Non-integer numbers
    (``0.5``) are refused: medxfer classifies, it does not regress.
    """
    if values.isna().any():
        n = int(values.isna().sum())
        raise MedxferError(f"{n} rows in {where} have no label. Fill the label column or remove those rows.")
    raw = values.map(_canonical)
    bad = [v for v in raw.unique() if v is None]
    if bad:
        odd = next(v for v, c in zip(values, raw) if c is None)
        raise MedxferError(f"label {odd!r} in {where} is a fraction: labels must be class names or integer class "
                           "indices (medxfer classifies, it does not regress).")
    distinct = sorted(raw.unique(), key=_natural_key)
    if names:
        if all(v.isdigit() and int(v) < len(names) for v in distinct):
            idx = raw.astype(int).to_numpy()
            return idx, list(names)
        unknown = [v for v in distinct if v not in names]
        if unknown:
            raise MedxferError(f"labels {unknown[:5]} in {where} are not among the label names {names}.")
        lookup = {n: i for i, n in enumerate(names)}
        return raw.map(lookup).to_numpy(), list(names)
    lookup = {v: i for i, v in enumerate(distinct)}
    return raw.map(lookup).to_numpy(), distinct


def _canonical(value) -> str | None:
    """One spelling per class: integral numbers as integers ('1.0' -> '1'); None for a fraction."""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    if not np.isfinite(number):
        return text
    return str(int(number)) if number == int(number) else None


def check_classes(manifest: Manifest) -> None:
    """Refuse a label column with fewer than two classes (nothing to learn)."""
    present = sorted(manifest.table["label"].unique())
    if len(present) < 2 or len(manifest.labels) < 2:
        only = manifest.labels[present[0]] if present else "none"
        raise MedxferError(
            f"the labels in {manifest.origin} have one class only ('{only}'): a classifier needs at least "
            "two. Check the label column or the class folders."
        )


def check_split_values(values: pd.Series, where: str) -> pd.Series:
    """The split column with every value one of train/val/test, or all missing (medxfer splits).

    One rule for every input (npz, folders, CSV/Parquet, DICOM labels, split files): an unknown name
    (``Test``, ``valid``) is refused with a did-you-mean, never dropped; a column filled for some rows
    and empty for others is refused, never silently replaced by medxfer's own split.
    """
    text = values.map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == ""
                      else str(v).strip())
    given = text.dropna()
    bad = sorted(set(given) - set(SPLITS))
    if bad:
        v = bad[0]
        hint = did_you_mean(v.lower(), SPLITS) or did_you_mean(v, SPLITS)
        raise MedxferError(f"{where}: split value '{v}' is not allowed ({len(bad)} unknown: {bad[:5]}); use train, "
                           f"val or test.{hint}")
    if 0 < len(given) < len(text):
        raise MedxferError(f"{where}: {len(text) - len(given)} of {len(text)} rows have no split value while the "
                           "others do. Give every row a split (train, val or test), or leave the column out and let "
                           "medxfer make a stratified split.")
    return text


def check_split_classes(manifest: Manifest) -> None:
    """After splitting (and skipping, de-duplicating, label fractions): every class has training images,
    and val and test hold at least two classes, so that the model, the threshold and the test AUC mean
    something. A multi-class val/test split missing some class is allowed with a warning (its
    per-class AUC is undefined and reported as such)."""
    t = manifest.table
    counts = {s: np.bincount(t.loc[t["split"] == s, "label"].to_numpy(int), minlength=len(manifest.labels))
              for s in SPLITS}
    for c, name in enumerate(manifest.labels):
        if counts["train"][c] == 0:
            where = ", ".join(f"{s}: {int(counts[s][c])}" for s in SPLITS)
            raise MedxferError(f"class '{name}' has no training images ({where}). Every class needs training "
                               "images: add some to train, fix the labels or split, or leave the class out of "
                               "--label-names.")
    for s in ("val", "test"):
        present = [manifest.labels[c] for c in range(len(manifest.labels)) if counts[s][c] > 0]
        if len(present) < 2:
            what = f"one class ('{present[0]}')" if present else "no images"
            raise MedxferError(f"the {s} split holds {what}: {'AUC, the threshold and calibration' if s == 'val' else 'the test AUC'} "
                               f"would be undefined. Give the {s} split images of every class, or let medxfer make "
                               "a stratified split (leave out the split column).")
        missing = [manifest.labels[c] for c in range(len(manifest.labels)) if counts[s][c] == 0]
        if missing:
            log.warning("the %s split has no images of class(es) %s: their %s AUC is undefined", s, missing, s)


def _natural_key(s: str):
    return (0, int(s), "") if s.isdigit() else (1, 0, s)
