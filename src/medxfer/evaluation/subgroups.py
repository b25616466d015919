"""Subgroup results of a binary model: AUC, sensitivity and specificity per group (sex, site, scanner,
age band...), each with the bootstrap interval of :func:`medxfer.evaluation.evaluate`, and a flag on the
groups whose interval lies entirely above or below the overall test value.

Usage::

    from medxfer.evaluation.subgroups import subgroup_metrics, subgroup_section

    sg = subgroup_metrics(y, probs, ["benign", "malignant"], {"sex": sex, "site": site}, positive=1,
                          threshold=0.31, groups=patient_ids, n_bootstrap=2000, overall=metrics["test"])
    sg["sex"]["F"]["auc"], sg["sex"]["F"]["auc_ci"], sg["site"]["B"]["flagged"]   # {"auc": "below"}

    sg = run_subgroups(run, table)        # a run's test predictions; ``table``: sample_id + group columns
    write_subgroups(run, sg)              # into RUN_DIR/metrics.json (the report and the model card read it)

Definitions
-----------
* A group is the test images with one value of a column; a missing value (None, NaN, empty text)
  makes the group ``"missing"``. Values are named as text (``1.0`` -> ``"1"``).
* Each group is evaluated by :func:`~medxfer.evaluation.metrics.evaluate` on its own images at the
  given (validation-chosen) threshold, with the same bootstrap: patients resampled when ``groups``
  (patient ids) are given, images otherwise; a resample counts only when both classes occur in it.
* ``too_small``: fewer than ``min_n`` images, or a class absent from the group; its metrics are None.
* ``flag``: for at least one of AUC, sensitivity and specificity the group's 95% interval lies
  entirely below or above the overall value (``overall``: the test metrics dict, e.g.
  ``metrics.json["test"]``); ``flagged`` names those metrics and the direction.

Every value is a plain int, float, str, bool, list, dict or None (never NaN): ``json.dumps`` takes it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from medxfer import files
from medxfer.errors import MedxferError
from medxfer.evaluation import html
from medxfer.evaluation.metrics import evaluate, to_numpy
from medxfer.runs import Run, amend

__all__ = ["FLAG_METRICS", "MISSING", "flag_text", "read_subgroups", "run_subgroups",
           "subgroup_metrics", "subgroup_section", "write_subgroups"]

MISSING = "missing"
FLAG_METRICS = ("auc", "sensitivity", "specificity")
#: predictions.csv columns that are never subgroup columns
_RESERVED = {"split", "sample_id", "label", "patient_id"}


def _key(value) -> str:
    """A group's name: text, integral numbers without '.0', missing values as MISSING."""
    if value is None:
        return MISSING
    try:
        if pd.isna(value):
            return MISSING
    except (TypeError, ValueError):
        pass
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    text = str(value).strip()
    return text if text else MISSING


def _order(keys) -> list[str]:
    """Groups in natural order (numbers by value), MISSING last."""
    def sort_key(k):
        try:
            return (0, float(k), "")
        except ValueError:
            return (1, 0.0, k)
    present = set(keys)
    return sorted((k for k in present if k != MISSING), key=sort_key) + ([MISSING] if MISSING in present else [])


def _patients(groups, n: int) -> np.ndarray | None:
    """Patient ids as text; a missing id becomes the image's own unit (resampled alone)."""
    if groups is None:
        return None
    g = to_numpy(groups).astype(object)
    if g.shape != (n,):
        raise MedxferError(f"The 'groups' parameter of subgroup_metrics must have one patient id per image ({n}). "
                           f"Got shape {g.shape} instead.")
    return np.array([f"\x00image-{i}" if _key(v) == MISSING else str(v) for i, v in enumerate(g)], dtype=object)


def _finite(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def subgroup_metrics(y_true, probs, labels, columns: dict, *, positive: int, threshold: float, groups=None,
                     n_bootstrap: int = 2000, seed: int = 0, overall: dict | None = None, min_n: int = 10) -> dict:
    """Per column and per value: n, n_pos, n_neg, AUC, sensitivity and specificity (with 95% bootstrap
    intervals) at ``threshold``, ``too_small`` and ``flag`` (see the module docstring).

    ``y_true``: (N,) class indices; ``probs``: (N, 2) probabilities; ``labels``: the two class names;
    ``columns``: column name -> N values. Returns ``{column: {value: {...}}}``.
    """
    probs = to_numpy(probs, float)
    if probs.ndim != 2 or probs.shape[1] != 2:
        raise MedxferError("subgroup results are for two-class models: 'probs' must be an (N, 2) array. Got shape "
                           f"{probs.shape} instead.")
    n = probs.shape[0]
    y = to_numpy(y_true)
    if y.shape != (n,):
        raise MedxferError(f"The 'y_true' parameter of subgroup_metrics must have shape ({n},) like the rows of "
                           f"probs. Got shape {y.shape} instead.")
    y = y.astype(int)
    if not isinstance(positive, (int, np.integer)) or positive not in (0, 1):
        raise MedxferError(f"The 'positive' parameter of subgroup_metrics must be 0 or 1. Got {positive!r} instead.")
    if not isinstance(min_n, (int, np.integer)) or min_n < 1:
        raise MedxferError(f"The 'min_n' parameter of subgroup_metrics must be an integer >= 1. Got {min_n!r}.")
    patients = _patients(groups, n)
    if overall is None:
        overall = evaluate(y, probs, labels, positive=positive, threshold=threshold, n_bootstrap=0)
    out: dict[str, dict] = {}
    for name, values in columns.items():
        vals = list(values) if not hasattr(values, "to_numpy") else list(values.to_numpy())
        if len(vals) != n:
            raise MedxferError(f"subgroup column '{name}' has {len(vals)} values for {n} images; give one per image.")
        keys = np.array([_key(v) for v in vals], dtype=object)
        out[str(name)] = {k: _group(y, probs, labels, keys == k, positive, threshold, patients, n_bootstrap, seed,
                                    overall, min_n) for k in _order(keys)}
    return out


def _group(y, probs, labels, mask, positive, threshold, patients, n_bootstrap, seed, overall, min_n) -> dict:
    yg = y[mask]
    n, n_pos = int(mask.sum()), int((yg == positive).sum())
    row = {"n": n, "n_pos": n_pos, "n_neg": n - n_pos}
    too_small = n < min_n or n_pos == 0 or n_pos == n
    row.update({m: None for k in FLAG_METRICS for m in (k, f"{k}_ci")})
    row.update({"too_small": too_small, "flag": False, "flagged": {}})
    if too_small:
        return row
    ev = evaluate(yg, probs[mask], labels, positive=int(positive), threshold=float(threshold),
                  groups=None if patients is None else patients[mask], n_bootstrap=int(n_bootstrap), seed=seed)
    for k in FLAG_METRICS:
        row[k], row[f"{k}_ci"] = _finite(ev.get(k)), ev.get(f"{k}_ci")
        ref, ci = (overall or {}).get(k), row[f"{k}_ci"]
        if ref is None or ci is None or (isinstance(ref, float) and math.isnan(ref)):
            continue
        if ci[1] < ref:
            row["flagged"][k] = "below"
        elif ci[0] > ref:
            row["flagged"][k] = "above"
    row["flag"] = bool(row["flagged"])
    if n_bootstrap:
        row["n_bootstrap_used"] = ev.get("n_bootstrap_used")
        if patients is not None:
            row["patients"] = len(set(patients[mask]))
    return row


# ------------------------------------------------------------------------------------------ a run's
def run_subgroups(run: Run, table: pd.DataFrame | None = None, *, columns: list[str] | None = None,
                  n_bootstrap: int | None = None, seed: int | None = None, min_n: int = 10) -> dict:
    """Subgroup results on a run's test predictions (two-class runs).

    ``table``: a DataFrame with ``sample_id`` and the group columns (e.g. the manifest's extra columns);
    test samples it does not list fall in the group ``"missing"``. Without ``table`` the extra columns of
    predictions.csv are used. ``columns``: which columns (default: all but sample_id, split, label,
    patient_id, path and the probabilities). The bootstrap defaults to the run's own (its resamples and
    seed); patients are resampled when predictions.csv has ``patient_id``.
    """
    labels = [str(c) for c in run.model.labels]
    if len(labels) != 2:
        raise MedxferError(f"subgroup results are for two-class runs; '{run.dir}' has {len(labels)} classes.")
    test = run.test_predictions
    if table is not None:
        if "sample_id" not in table:
            raise MedxferError("the subgroup table needs a 'sample_id' column (the ids of predictions.csv).")
        extra = table.drop(columns=[c for c in ("split", "label", "patient_id", "path") if c in table])
        extra = extra.assign(sample_id=extra["sample_id"].astype(str)).drop_duplicates("sample_id")
        source = test[["sample_id"]].merge(extra, on="sample_id", how="left")
    else:
        source = test
    cols = columns if columns is not None else [c for c in source.columns if c not in _RESERVED | {"path"}
                                                and not str(c).startswith("prob_")]
    missing = [c for c in cols if c not in source]
    if missing:
        raise MedxferError(f"no subgroup column {missing[0]!r}; the table has {[c for c in source.columns]}.")
    if not cols:
        return {}
    index = {name: i for i, name in enumerate(labels)}
    y = np.array([index[str(v)] for v in test["label"]], dtype=int)
    probs = test[[f"prob_{c}" for c in labels]].to_numpy(dtype=float)
    pos = run.model.positive_index
    pos = 1 if pos is None else pos
    threshold = run.metrics.get("threshold", run.model.threshold)
    threshold = 0.5 if threshold is None else float(threshold)
    tm = run.metrics.get("test", {})
    boot = n_bootstrap if n_bootstrap is not None else int(tm.get("n_bootstrap", run.config.evaluation.bootstrap) or 0)
    groups = test["patient_id"] if "patient_id" in test and test["patient_id"].notna().any() else None
    return subgroup_metrics(y, probs, labels, {c: source[c] for c in cols}, positive=pos, threshold=threshold,
                            groups=groups, n_bootstrap=boot,
                            seed=run.metrics.get("seed", run.config.optim.seed) if seed is None else seed,
                            overall=tm or None, min_n=min_n)


def write_subgroups(run: Run, subgroups: dict) -> Path:
    """Add the results to ``RUN_DIR/metrics.json`` under ``"subgroups"`` (atomic); the report and the model card
    read them from there."""
    path = run.dir / "metrics.json"
    with amend(run.dir):  # under the run's lock, its record checked before and written again after
        metrics = files.read_json(path, "metrics.json")
        metrics["subgroups"] = subgroups
        files.write_json(path, metrics)
    run.metrics["subgroups"] = subgroups
    return path


def read_subgroups(run: Run) -> dict | None:
    """The run's subgroup results (metrics.json), or None when it has none."""
    return run.metrics.get("subgroups") or None


# ------------------------------------------------------------------------------------------ HTML
def _with_ci(g: dict, key: str) -> str:
    return html.with_ci(g, key) if g.get(key) is not None else "–"


def flag_text(g: dict) -> str:
    """'AUC below overall, sensitivity below overall' / 'too small' / ''."""
    if g.get("too_small"):
        return "too small"
    names = {"auc": "AUC", "sensitivity": "sensitivity", "specificity": "specificity"}
    return ", ".join(f"{names.get(k, k)} {d} overall" for k, d in (g.get("flagged") or {}).items())


def subgroup_section(subgroups: dict) -> str:
    """The report's subgroup section: one table per column; flagged groups marked (class ``flag``)."""
    if not subgroups:
        return "<p class='muted'>No subgroup columns were given.</p>"
    parts = ["<p>Test split, per group, at the validation-chosen threshold; 95% bootstrap intervals. "
             "<span class='flag'>Flagged</span>: the group's interval lies entirely above or below the overall "
             "test value. Too small: fewer images than the minimum, or one class absent (no metrics).</p>"]
    for column, groups in subgroups.items():
        rows = []
        for value, g in groups.items():
            cells = [html.esc(value), str(g["n"]), f"{g['n_pos']} / {g['n_neg']}", _with_ci(g, "auc"),
                     _with_ci(g, "sensitivity"), _with_ci(g, "specificity"), html.esc(flag_text(g))]
            if g.get("flag"):
                cells = [f"<span class='flag'>{c}</span>" for c in cells]
            elif g.get("too_small"):
                cells = [f"<span class='muted'>{c}</span>" for c in cells]
            rows.append(cells)
        parts.append(f"<h3>{html.esc(column)}</h3>" + html.table(
            ["group", "images", "positive / negative", "AUC (95% CI)", "sensitivity (95% CI)",
             "specificity (95% CI)", "note"], rows))
    return "\n".join(parts)
