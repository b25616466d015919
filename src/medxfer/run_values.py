"""The values read back from a run's files, range-checked where they are read (:meth:`medxfer.runs.Run.load`).

Usage::

    known = check_meta(model_json_dict, "runs/b/model.json")   # every key in range, or one MedxferError
    check_members(model_json_dict, where, n_labels, task)      # an ensemble's member networks
    check_metrics(metrics, where); check_table("predictions", df, where, labels)

A value medxfer cannot use is one line naming the file, the key, what is allowed and what was found: labels
distinct non-empty names (2 for binary), image_size and tta within the command line's own bounds (config.py),
temperature finite and above 0 (one per finding allowed for multi-label), threshold in [0, 1] or one per
finding, positive_label among the labels, task and spatial_dims known, mean/std one finite number per model
channel (std above 0), reader options valid, hashes 64 hex digits, input_dtype a numpy number type,
conformal a record of :mod:`medxfer.trust.conformal` (alpha in (0, 1), a known method, the run's task and labels,
thresholds from 0 to 1 or null), prior one proportion per class summing to 1.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from medxfer.config import EvalOptions, ModelOptions
from medxfer.data.readers import ReadOptions
from medxfer.errors import MedxferError
from medxfer.trust.conformal import METHODS as CONFORMAL_METHODS

TASKS = ("binary", "multiclass", "multilabel", "ordinal")
INFLATIONS = ("i3d", "acs")
GREY_MODES = ("sum", "replicate", "rgb")  # rgb: 3-channel data
MAX_CHANNELS = 16
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _limits(options: type, name: str) -> tuple[int, int]:
    """An option's bounds, as config.py declares them (one definition for the command line and model.json)."""
    f = next(f for f in dataclasses.fields(options) if f.name == name)
    return f.metadata["low"], f.metadata["high"]


IMAGE_SIZES = _limits(ModelOptions, "image_size")
TTA_VIEWS = _limits(EvalOptions, "tta")


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _shown(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


class _Checker:
    """Range checks of one record's values; the first failure is one MedxferError naming the file and the key."""

    def __init__(self, where: str, prefix: str = ""):
        self.where, self.prefix = where, prefix

    def fail(self, key: str, rule: str, value) -> MedxferError:
        return MedxferError(f"'{self.where}' holds a value medxfer cannot use: {self.prefix}{key} must be {rule}; got "
                            f"{_shown(value)}. Train the run again, or restore the file from a copy.")

    def whole(self, d: dict, key: str, low: int, high: int) -> None:
        v = d.get(key)
        if not (_whole(v) and low <= v <= high):
            raise self.fail(key, f"a whole number from {low} to {high}", v)

    def choice(self, d: dict, key: str, allowed: tuple, default=None) -> None:
        v = d.get(key, default)
        if v not in allowed:
            raise self.fail(key, " or ".join(", ".join(map(str, allowed)).rsplit(", ", 1)), v)

    def text(self, d: dict, key: str, empty: bool = True) -> None:
        v = d.get(key, "")
        if not isinstance(v, str) or (not empty and not v):
            raise self.fail(key, "text" if empty else "a non-empty name", v)

    def vector(self, d: dict, key: str, n: int, positive: bool = False) -> None:
        v = d.get(key)
        if not (isinstance(v, list) and len(v) == n and all(_finite(x) and (x > 0 or not positive) for x in v)):
            raise self.fail(key, f"a list of in_chans ({n}) finite numbers{' above 0' if positive else ''}", v)

    def temperature(self, d: dict, n_labels: int, per_finding: bool) -> None:
        v = d.get("temperature")
        if v is None:
            return
        ok = _finite(v) and v > 0
        if per_finding and isinstance(v, list):
            ok = len(v) == n_labels and all(_finite(x) and x > 0 for x in v)
        if not ok:
            raise self.fail("temperature", "a finite number above 0" + (f" (or one per finding, {n_labels})"
                                                                        if per_finding else ""), v)

    def threshold(self, d: dict, n_labels: int, per_finding: bool) -> None:
        v = d.get("threshold")
        if v is None:
            return
        ok = _finite(v) and 0 <= v <= 1
        if per_finding and isinstance(v, list):
            ok = len(v) == n_labels and all(_finite(x) and 0 <= x <= 1 for x in v)
        if not ok:
            raise self.fail("threshold", "a number from 0 to 1" + (f" (or one per finding, {n_labels})"
                                                                  if per_finding else "") + ", or null", v)

    def network(self, d: dict) -> None:
        """What builds one network: architecture, channels, size, normalisation, test-time augmentation."""
        self.text(d, "arch", empty=False)
        self.whole(d, "in_chans", 1, MAX_CHANNELS)
        self.whole(d, "data_chans", 1, MAX_CHANNELS)
        self.whole(d, "image_size", *IMAGE_SIZES)
        self.vector(d, "mean", d["in_chans"])
        self.vector(d, "std", d["in_chans"], positive=True)
        if "tta" in d:
            self.whole(d, "tta", *TTA_VIEWS)
        if "tta_hflip" in d and not isinstance(d["tta_hflip"], bool):
            raise self.fail("tta_hflip", "true or false", d["tta_hflip"])
        self.choice(d, "inflate", (None, *INFLATIONS))


def check_meta(d: dict, where: str = "model.json") -> dict:
    """model.json's known keys, every value range-checked (labels, task, size, channels, normalisation,
    temperature, threshold, positive label, 2-D/3-D, test-time augmentation, reader options, hashes, input
    type, an ensemble's members); returns them with the defaults of earlier releases filled in."""
    c = _Checker(where)
    labels = d.get("labels")
    task = d.get("task") or ("binary" if isinstance(labels, list) and len(labels) == 2 else "multiclass")
    c.choice({"task": task}, "task", TASKS)
    fewest = 1 if task == "multilabel" else 2
    if not (isinstance(labels, list) and len(labels) >= fewest and (task != "binary" or len(labels) == 2)
            and all(isinstance(x, str) and x for x in labels) and len(set(labels)) == len(labels)):
        raise c.fail("labels", f"{'2' if task == 'binary' else f'at least {fewest}'} distinct, non-empty names "
                               f"(task {task})", labels)
    c.network(d)
    c.temperature(d, len(labels), task == "multilabel")
    c.threshold(d, len(labels), task == "multilabel")
    c.choice(d, "positive_label", (None, *labels))
    if not (_whole(d.get("spatial_dims", 2)) and d.get("spatial_dims", 2) in (2, 3)):
        raise c.fail("spatial_dims", "2 or 3", d.get("spatial_dims"))
    c.choice(d, "grey_mode", GREY_MODES, default="sum")
    for key in ("source", "strategy", "input"):
        c.text(d, key)
    for key in ("weights_sha256", "onnx_sha256", "torchscript_sha256"):
        v = d.get(key)
        if v is not None and not (isinstance(v, str) and _SHA256.fullmatch(v)):
            raise c.fail(key, "a SHA-256 (64 hex digits) or null", v)
    _check_dtype(c, d.get("input_dtype"))
    _check_read(c, d.get("read", {}))
    _check_conformal(c, d.get("conformal"), labels, task)
    _check_prior(c, d.get("prior"), len(labels), task)
    out = {**d, "task": task}
    t = d.get("temperature")
    out["temperature"] = [float(v) for v in t] if isinstance(t, list) else float(1.0 if t is None else t)
    return out


def _check_dtype(c: _Checker, v) -> None:
    if v is None:
        return
    try:
        ok = isinstance(v, str) and np.dtype(v).name == v and np.dtype(v).kind in "biuf"
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise c.fail("input_dtype", "a numpy number type (uint8, uint16, int16, float32...) or null", v)


def _check_conformal(c: _Checker, v, labels: list[str], task: str) -> None:
    """The conformal record (or null): alpha in (0, 1), a method and the run's task, one threshold per class
    that is a finite number or null (include always); multi-label: an [absent, present] pair per finding."""
    if v is None:
        return
    if not isinstance(v, dict):
        raise c.fail("conformal", "a conformal record (a mapping) or null", v)
    c = _Checker(c.where, c.prefix + "conformal.")
    alpha = v.get("alpha")
    if not (_finite(alpha) and 0 < alpha < 1):
        raise c.fail("alpha", "a number between 0 and 1, exclusive (e.g. 0.1)", alpha)
    c.choice(v, "method", CONFORMAL_METHODS)
    if v.get("task") != task:
        raise c.fail("task", f"the run's task ({task})", v.get("task"))
    if v.get("classes") != list(labels):
        raise c.fail("classes", f"the run's labels ({', '.join(labels)})", v.get("classes"))

    def limit(t) -> bool:
        return t is None or (_finite(t) and -1e-9 <= t <= 1 + 1e-9)

    t = v.get("thresholds")
    pairs = task == "multilabel"
    if not (isinstance(t, list) and len(t) == len(labels) and all(
            (isinstance(x, list) and len(x) == 2 and all(limit(y) for y in x)) if pairs else limit(x) for x in t)):
        raise c.fail("thresholds", f"one {'[absent, present] pair' if pairs else 'number'} per class "
                                   f"({len(labels)}), each from 0 to 1 or null", t)


def _check_prior(c: _Checker, v, k: int, task: str) -> None:
    """The validation class mix (or null): one proportion per class, summing to 1; single-label runs only."""
    if v is None:
        return
    if not (task != "multilabel" and isinstance(v, list) and len(v) == k and all(_finite(x) and 0 <= x <= 1 for x in v)
            and abs(sum(v) - 1) < 1e-6):
        raise c.fail("prior", f"one proportion per class ({k}) summing to 1, or null (multi-label runs: null)", v)


def _check_read(c: _Checker, v) -> None:
    fields = [f.name for f in dataclasses.fields(ReadOptions)]
    if not (isinstance(v, dict) and all(k in fields and isinstance(x, str) for k, x in v.items())):
        raise c.fail("read", f"a mapping of {', '.join(fields)} to their options (text)", v)
    try:
        ReadOptions(**v)
    except MedxferError as e:
        raise c.fail("read", f"valid reader options ({e})", v) from None


def check_members(d: dict, where: str, n_labels: int, task: str) -> None:
    """An ensemble's members: each network's contract, temperature, test-time augmentation and weight."""
    members = d.get("members")
    if not (isinstance(members, list) and members and all(isinstance(m, dict) for m in members)):
        raise _Checker(where).fail("members", "a non-empty list of the member networks", members)
    for i, m in enumerate(members):
        c = _Checker(where, f"members[{i}].")
        c.network(m)
        if "temperature" not in m:
            raise c.fail("temperature", "a finite number above 0", None)
        c.temperature(m, n_labels, task == "multilabel")
        v = m.get("weight")
        if not (_finite(v) and v > 0):
            raise c.fail("weight", "a finite number above 0", v)


def check_metrics(m, where: str) -> dict:
    """metrics.json: a mapping holding the 'val' and 'test' results (mappings)."""
    if not isinstance(m, dict) or not all(isinstance(m.get(s), dict) for s in ("val", "test")):
        raise MedxferError(f"'{where}' is damaged: it must hold a mapping with the 'val' and 'test' results. Train "
                           "the run again, or restore the file from a copy.")
    return m


#: the columns every run's tables have, and the split names their rows may take
TABLE_COLUMNS = {"predictions": (("split", "sample_id", "label"), ("val", "test")),
                 "split": (("sample_id", "split", "label"), ("train", "val", "test")),
                 "skipped": (("sample_id", "reason"), None)}


def check_table(name: str, table: pd.DataFrame, where: Path, labels: list[str]) -> None:
    """A run's table has its columns, split names and (predictions.csv) one probability in [0, 1] per label."""
    columns, splits = TABLE_COLUMNS.get(name, ((), None))
    if name == "predictions":
        columns = (*columns, *(f"prob_{c}" for c in labels))
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise MedxferError(f"'{where}' is damaged: it has no column '{missing[0]}'. Train the run again, or restore the "
                           "file from a copy.")
    if splits is not None and not table["split"].isin(splits).all():
        bad = table.loc[~table["split"].isin(splits), "split"].iloc[0]
        raise MedxferError(f"'{where}' is damaged: split {_shown(bad)} is not one of {', '.join(splits)}. Train the run "
                           "again, or restore the file from a copy.")
    if name == "predictions":
        probs = table[[f"prob_{c}" for c in labels]].apply(pd.to_numeric, errors="coerce").to_numpy(float)
        if not (np.isfinite(probs) & (probs >= 0) & (probs <= 1)).all():
            raise MedxferError(f"'{where}' is damaged: a probability is not a number from 0 to 1. Train the run again, "
                               "or restore the file from a copy.")
