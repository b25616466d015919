"""The Manifest: one row per sample (image ref, label, patient, split), validated once.

Usage::

    m = load_manifest("data/breastmnist_28.npz")
    m.table.columns  # sample_id, label, split, [path | row], [patient_id]
    m.labels         # class names, index = label value
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from medxfer.errors import MedxferError

SPLITS = ("train", "val", "test")


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
    """Map raw label values to indices; class names from ``names`` or the sorted distinct values."""
    if values.isna().any():
        n = int(values.isna().sum())
        raise MedxferError(f"{n} rows in {where} have no label. Fill the label column or remove those rows.")
    raw = values.astype(str)
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


def check_classes(manifest: Manifest) -> None:
    """Refuse a label column with fewer than two classes (nothing to learn)."""
    present = sorted(manifest.table["label"].unique())
    if len(present) < 2 or len(manifest.labels) < 2:
        only = manifest.labels[present[0]] if present else "none"
        raise MedxferError(
            f"the labels in {manifest.origin} have one class only ('{only}'): a classifier needs at least "
            "two. Check the label column or the class folders."
        )


def _natural_key(s: str):
    return (0, int(s), "") if s.isdigit() else (1, 0, s)
