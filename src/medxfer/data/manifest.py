"""The Manifest: one row per sample (image ref, label, patient, split), validated once.

Usage::

    m = load_manifest("data/breastmnist_28.npz")
    m.table.columns  # sample_id, label, split, [path | row], [patient_id]
    m.labels         # class names, index = label value
    m.multilabel     # several findings per sample: ``label`` is then a bit mask over ``labels``
    m.targets()      # (N,) class indices, or the (N, K) 0/1 matrix of a multi-label manifest
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from medxfer.errors import MedxferError, did_you_mean

SPLITS = ("train", "val", "test")
log = logging.getLogger(__name__)


@dataclass
class Manifest:
    """Samples and their labels.

    ``table`` columns: ``sample_id`` (str, unique), ``label`` (int index into ``labels``; with
    ``multilabel``, a bit mask: bit k set when finding ``labels[k]`` is present), ``split``
    (train/val/test or missing), and either ``path`` (a file) or ``row`` (an index into ``arrays``),
    optionally ``patient_id``.
    """

    table: pd.DataFrame
    labels: list[str]
    origin: str
    arrays: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    multilabel: bool = False

    def with_table(self, table: pd.DataFrame) -> "Manifest":
        """The same manifest over another table (a subset, a new split)."""
        return dataclasses.replace(self, table=table, notes=list(self.notes))

    def targets(self) -> np.ndarray:
        """(N,) class indices, or for a multi-label manifest the (N, K) 0/1 float matrix."""
        y = self.table["label"].to_numpy(np.int64)
        if not self.multilabel:
            return y
        return ((y[:, None] >> np.arange(len(self.labels))) & 1).astype(np.float32)

    @property
    def has_patients(self) -> bool:
        return "patient_id" in self.table and self.table["patient_id"].notna().any()

    @property
    def has_splits(self) -> bool:
        return "split" in self.table and self.table["split"].notna().all()

    def subset(self, mask) -> "Manifest":
        return self.with_table(self.table[np.asarray(mask)].reset_index(drop=True))

    def counts(self) -> dict:
        """Counts per split and class (and patients), for logs and the report."""
        out = {}
        for split, part in self.table.groupby("split", sort=False):
            entry = {"n": int(len(part)),
                     "per_class": self._per_class(part)}
            if self.has_patients:
                entry["patients"] = int(part["patient_id"].nunique())
            out[str(split)] = entry
        return out


    def _per_class(self, part: pd.DataFrame) -> dict:
        y = part["label"].to_numpy(np.int64)
        if self.multilabel:  # images with each finding
            return {name: int(((y >> k) & 1).sum()) for k, name in enumerate(self.labels)}
        return {name: int((y == i).sum()) for i, name in enumerate(self.labels)}


#: a bit mask per sample holds at most this many findings
MAX_LABELS = 62


def multilabel_from_matrix(values, names: list[str] | None, where: str) -> tuple[np.ndarray, list[str]]:
    """An (N, K) 0/1 array -> (bit mask per row, the K names). ``names`` must match K when given."""
    y = np.asarray(values)
    if y.ndim != 2:
        raise MedxferError(f"multi-label labels in {where} must be an (N, K) 0/1 array; got shape {y.shape}.")
    k = y.shape[1]
    if names is not None and len(names) != k:
        raise MedxferError(f"{where} has {k} columns, --label-names gives {len(names)}: give one name per column, in "
                           "column order.")
    if not np.issubdtype(y.dtype, np.number) and y.dtype != bool:
        raise MedxferError(f"multi-label labels in {where} must be numbers 0/1; got {y.dtype}.")
    yf = y.astype(float)
    if np.isnan(yf).any():
        row = int(np.argwhere(np.isnan(yf))[0][0])
        raise MedxferError(f"multi-label labels in {where} hold a missing value (row {row + 1}): medxfer needs 0 or 1 "
                           "for every finding (uncertain labels must be mapped to 0 or 1 first).")
    bad = ~np.isin(yf, (0.0, 1.0))
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raise MedxferError(f"multi-label labels in {where} must be 0 or 1; row {r + 1}, column {c + 1} (counting from "
                           f"1) holds {y[r, c].item()!r}.")
    if k > MAX_LABELS:
        raise MedxferError(f"{where} has {k} findings; medxfer handles at most {MAX_LABELS}.")
    return (yf.astype(np.int64) << np.arange(k)).sum(1), list(names) if names else [str(i) for i in range(k)]


def multilabel_from_text(values: pd.Series, names: list[str] | None, no_finding: str | None,
                         where: str) -> tuple[np.ndarray, list[str]]:
    """A column of '|'-separated findings ('Effusion|Infiltration'; empty or ``no_finding``: none)."""
    if values.isna().any() and no_finding is None:
        n = int(values.isna().sum())
        raise MedxferError(f"{n} rows in {where} have an empty label. Give every row its findings, or name the "
                           "value that means 'none' with --no-finding (empty cells then mean none too).")
    sets = [frozenset(p.strip() for p in str(v).split("|") if p.strip()) if pd.notna(v) else frozenset()
            for v in values]
    if no_finding is not None:
        mixed = [s for s in sets if no_finding in s and len(s) > 1]
        if mixed:
            raise MedxferError(f"a row in {where} lists '{no_finding}' together with findings "
                               f"({'|'.join(sorted(mixed[0]))}): '{no_finding}' must stand alone.")
        sets = [s - {no_finding} for s in sets]
    found = sorted(set().union(*sets), key=_natural_key)
    if names:
        unknown = [v for v in found if v not in names]
        if unknown:
            raise MedxferError(f"findings {unknown[:5]} in {where} are not among the label names {list(names)}"
                               f"{did_you_mean(unknown[0], names)}")
        found = list(names)
    if len(found) > MAX_LABELS:
        raise MedxferError(f"{where} has {len(found)} findings; medxfer handles at most {MAX_LABELS}.")
    bit = {name: 1 << k for k, name in enumerate(found)}
    return np.array([sum(bit[f] for f in s) for s in sets], dtype=np.int64), found


def labels_from_values(values: pd.Series, names: list[str] | None, where: str) -> tuple[np.ndarray, list[str]]:
    """Map raw label values to indices; class names from ``names`` or the sorted distinct values.

    Numbers are compared as numbers: ``1``, ``1.0`` and ``"1"`` are one class (a CSV column of
    floats in one split and integers in another must not make two classes). Non-integer numbers
    (``0.5``) are refused: medxfer classifies, it does not regress.
    """
    if values.isna().any():
        n = int(values.isna().sum())
        raise MedxferError(f"{n} rows in {where} have no label. Fill the label column or remove those rows.")
    raw = _canonical_labels(values)
    if raw.isna().any():
        odd = list(values)[int(np.argmax(raw.isna().to_numpy()))]  # as iteration gives it: 0.5
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


def _canonical_labels(values: pd.Series) -> pd.Series:
    """:func:`_canonical` of every value, computed once per distinct value (equal values, such as 1, 1.0
    and True, have one spelling); None for a fraction."""
    try:
        codes, distinct = pd.factorize(values)
    except TypeError:  # values that cannot be hashed (lists): one by one
        return values.map(_canonical)
    spelled = np.array([_canonical(v) for v in distinct] + [None], dtype=object)
    return pd.Series(spelled[codes], index=values.index, dtype=object)


#: a number as a label may spell it: signed, with a decimal part or an exponent ('-1', '+2', '1.0', '2e1');
#: not '1_000', 'inf' or 'nan', which float() reads but which are names
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _number(text: str) -> float | None:
    return float(text) if _NUMBER.fullmatch(text) else None


def _canonical(value) -> str | None:
    """One spelling per class: integral numbers as integers ('1.0' -> '1', '+2' -> '2'); None for a fraction."""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    text = str(value).strip()
    number = _number(text)
    if number is None or not np.isfinite(number):  # '1e400': too large to be a class index, kept as written
        return text
    return str(int(number)) if number == int(number) else None


def check_classes(manifest: Manifest) -> None:
    """Refuse a label column with fewer than two classes (nothing to learn); for multi-label data, a
    finding that no sample has, or that every sample has."""
    if manifest.multilabel:
        y = manifest.targets()
        if len(manifest.labels) < 1:
            raise MedxferError(f"{manifest.origin} names no findings.")
        n_pos = y.sum(0)
        for k, name in enumerate(manifest.labels):
            if n_pos[k] == 0 or n_pos[k] == len(y):
                raise MedxferError(f"finding '{name}' is {'absent from' if n_pos[k] == 0 else 'present in'} every "
                                   f"sample of {manifest.origin}: nothing to learn. Leave it out (--label-columns or "
                                   "--label-names) or add samples.")
        return
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
    if manifest.multilabel:
        _check_split_findings(manifest)
        return
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


def _check_split_findings(manifest: Manifest) -> None:
    """Multi-label: every finding has positive training images; a finding without positives (or without
    negatives) in val or test is reported, its AUC there being undefined."""
    y, split = manifest.targets(), manifest.table["split"].to_numpy()
    absent = []
    for k, name in enumerate(manifest.labels):
        per = {s: int(y[split == s, k].sum()) for s in SPLITS}
        if per["train"] == 0:
            absent.append(f"{name} (val {per['val']}, test {per['test']})")
    if len(absent) == len(manifest.labels):
        raise MedxferError("no finding has positive training images: nothing to learn. Check the labels and split.")
    if absent:  # rare findings of patient-grouped splits and folds: reported, not fatal (the others still train)
        msg = (f"finding(s) without positive training images: {', '.join(absent)}; the model cannot learn them and "
               "their results mean nothing. Move such images to train, or leave the finding out.")
        log.warning(msg)
        manifest.notes.append(msg)
    for s in ("val", "test"):
        ys = y[split == s]
        if len(ys) == 0:
            continue
        undefined = [n for k, n in enumerate(manifest.labels) if ys[:, k].min() == ys[:, k].max()]
        if len(undefined) == len(manifest.labels):
            raise MedxferError(f"no finding has both positive and negative images in the {s} split: its AUC would be "
                               "undefined. Let medxfer make a stratified split (leave out the split column).")
        if undefined:
            log.warning("the %s split has no positive (or no negative) images of %s: their %s AUC is undefined",
                        s, undefined, s)


def _natural_key(s: str):
    """Numbers first, in numeric order (-1 < 0 < 1 < 2.5 < 10), then names in text order."""
    number = _number(s)
    return (0, number, s) if number is not None else (1, 0.0, s)


def order_note(names: list[str]) -> str | None:
    """The log line that says how numeric class labels were ordered (the positive class of a binary task
    is the last one unless --positive-label says otherwise; ordinal grades rise in this order)."""
    numbers = [_number(n) for n in names]
    if len(names) < 2 or None in numbers or numbers != sorted(numbers):  # names given in another order: theirs
        return None
    then = (f"a binary task's positive class is the last, '{names[-1]}', unless --positive-label names the other"
            if len(names) == 2 else "ordinal grades rise in this order")
    return f"class labels are numbers, in numeric order: {' < '.join(names)} ({then})"
