"""Patient-grouped, stratified k-fold cross-validation of one training configuration.

Usage::

    from medxfer.config import TrainConfig
    from medxfer.cv import cross_validate

    result = cross_validate(TrainConfig(data="labels.csv", strategy="linear-probe"), folds=5, out="runs/cv")
    result["summary"]["auc"]          # {"mean", "sd", "n", "values"} over the folds' test AUCs

Fold ``i`` tests on part ``i``, validates (early stopping, calibration, threshold) on part
``(i + 1) % K`` and trains on the rest; the parts come from :func:`medxfer.data.splits.kfold`
(stratified by label, grouped by patient when the data has patients, so no patient is in two
parts). Every sample is pooled first: given train/val/test splits are ignored. Each fold is an
ordinary run directory ``OUT/fold_<i>``; the split it used is the CSV ``OUT/splits/fold_<i>.csv``
(``sample_id,split``), handed to the pipeline as :attr:`TrainConfig.split_file` and applied by
:func:`apply_split_file`. ``OUT/cv.json`` holds the per-fold test metrics and their mean and
standard deviation (:func:`medxfer.evaluation.stats.summarize`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from medxfer.data.manifest import SPLITS, Manifest
from medxfer.errors import MedxferError

__all__ = ["apply_split_file", "cross_validate", "fold_split", "make_folds", "summarize_folds"]


def apply_split_file(manifest: Manifest, path: str | Path) -> Manifest:
    """The manifest with its ``split`` column replaced by the CSV ``path`` (``sample_id,split``).

    Every sample of the manifest must be listed once, and every listed sample must exist: a
    split file written for other data is refused rather than half applied.
    """
    path = Path(path)
    if not path.is_file():
        raise MedxferError(f"split file '{path}' does not exist.")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001
        raise MedxferError(f"cannot read split file '{path}' ({type(e).__name__}).") from e
    missing_cols = [c for c in ("sample_id", "split") if c not in df.columns]
    if missing_cols:
        raise MedxferError(f"split file '{path}' lacks column(s) {missing_cols}; it needs sample_id,split.")
    bad = sorted(set(df["split"]) - set(SPLITS))
    if bad:
        raise MedxferError(f"split file '{path}': split values {bad[:5]} are not allowed; use train, val or test.")
    if df["sample_id"].duplicated().any():
        dup = df["sample_id"][df["sample_id"].duplicated()].iloc[0]
        raise MedxferError(f"split file '{path}' lists sample '{dup}' more than once.")
    lookup = dict(zip(df["sample_id"], df["split"]))
    ids = manifest.table["sample_id"].astype(str)
    absent = [s for s in ids if s not in lookup]
    if absent:
        raise MedxferError(f"split file '{path}' has no split for {len(absent)} of the {len(ids)} samples "
                           f"(first: '{absent[0]}'). It must list every sample of the data.")
    extra = len(lookup) - (len(ids) - len(absent))
    if extra:
        unknown = next(s for s in df["sample_id"] if s not in set(ids))
        raise MedxferError(f"split file '{path}' lists {extra} samples that are not in the data "
                           f"(first: '{unknown}'). Was it written for other data?")
    t = manifest.table.copy()
    t["split"] = ids.map(lookup).to_numpy()
    out = Manifest(t, manifest.labels, manifest.origin, manifest.arrays, list(manifest.notes))
    out.notes.append(f"splits from split file {path}")
    return out


def make_folds(manifest: Manifest, k: int, seed: int = 0, split_by: str | None = "auto") -> np.ndarray:
    """Fold index per manifest row (stratified, patient-grouped), with clear errors for too few samples."""
    from medxfer.data.splits import kfold

    if k < 2:
        raise MedxferError(f"The 'folds' parameter must be at least 2. Got {k} instead.")
    counts = np.bincount(manifest.table["label"].to_numpy(), minlength=len(manifest.labels))
    if counts[counts > 0].min() < k:
        small = manifest.labels[int(np.flatnonzero(counts == counts[counts > 0].min())[0])]
        raise MedxferError(f"class '{small}' has {counts[counts > 0].min()} images: too few for {k} folds "
                           "(each fold needs one to test on). Use fewer folds.")
    try:
        return kfold(manifest, k=k, seed=seed, split_by=split_by)
    except ValueError as e:  # sklearn's own checks, e.g. too few samples
        raise MedxferError(f"cannot make {k} folds of {manifest.origin}: {e}") from e


def fold_split(folds: np.ndarray, i: int, k: int) -> np.ndarray:
    """test = fold i, val = fold (i + 1) % k, train = the rest."""
    return np.where(folds == i, "test", np.where(folds == (i + 1) % k, "val", "train"))


def cross_validate(cfg, folds: int, out: str | Path, log=print, train_fn=None) -> dict:
    """Train ``cfg`` once per fold into ``out/fold_<i>``; write ``out/cv.json``; return it.

    ``train_fn(cfg) -> {"metrics": ..., "run_dir": ...}`` defaults to :func:`medxfer.pipeline.train`.
    """
    from medxfer import runs
    from medxfer.data.manifest import check_classes
    from medxfer.data.sources import load_manifest

    if cfg.devices > 1:
        raise MedxferError("medxfer cv trains its folds in one process: --devices must be 1.")
    if train_fn is None:
        from medxfer.pipeline import train

        def train_fn(c):
            return train(c, log=log)

    out = Path(out)
    manifest = load_manifest(cfg.data, label_names=list(cfg.label_names) if cfg.label_names else None,
                             labels_csv=cfg.labels_csv)
    check_classes(manifest)
    seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    fold = make_folds(manifest, folds, seed=seed, split_by=cfg.split_by)
    ids = manifest.table["sample_id"].astype(str)
    runs.write_csv(out / "folds.csv", pd.DataFrame({"sample_id": ids, "fold": fold}))
    if manifest.has_splits:
        log("cross-validation pools all samples: the given train/val/test splits are not used")
    per_fold = []
    for i in range(folds):
        split_file = out / "splits" / f"fold_{i}.csv"
        runs.write_csv(split_file, pd.DataFrame({"sample_id": ids, "split": fold_split(fold, i, folds)}))
        log(f"fold {i + 1}/{folds}: test on part {i}, validate on part {(i + 1) % folds}")
        fold_dir = out / f"fold_{i}"
        resume = cfg.resume and runs.checkpoint_path(fold_dir).exists()  # --resume: go on where a fold stopped
        result = train_fn(cfg.replace(split_file=str(split_file), out=str(fold_dir), resume=resume))
        m = result["metrics"]
        per_fold.append({"fold": i, "run_dir": str(result.get("run_dir", out / f"fold_{i}")),
                         "n_test": m["test"].get("n"), "best_epoch": m.get("best_epoch"),
                         "train_seconds": m.get("train_seconds"), "test": m["test"], "val": m.get("val")})
    summary = summarize_folds([f["test"] for f in per_fold])
    report = {"folds": folds, "seed": seed, "data": str(cfg.data), "strategy": cfg.strategy, "source": cfg.source,
              "grouped_by_patient": bool(manifest.has_patients and cfg.split_by not in (None, "none")),
              "summary": summary, "per_fold": per_fold}
    runs.write_json(out / "cv.json", report)
    return report


def summarize_folds(test_metrics: list[dict]) -> dict:
    """``{metric: summarize(values over folds)}`` for every scalar test metric (nested ones dotted)."""
    from medxfer.evaluation.stats import summarize

    flat = [_flatten(m) for m in test_metrics]
    keys: list[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys]
    return {k: summarize([f.get(k) for f in flat]) for k in keys}


_NOT_METRICS = {"n", "n_bootstrap", "n_bootstrap_used"}


def _flatten(d: dict, prefix: str = "") -> dict:
    """Float (or None) leaves of a metrics dict; counts, lists, labels and intervals are left out."""
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            if k != "n_per_class":
                out.update(_flatten(v, name + "."))
        elif (v is None or isinstance(v, (float, np.floating))) and k not in _NOT_METRICS and not k.endswith("_ci"):
            out[name] = v
    return out


def format_mean_sd(s: dict) -> str:
    if s["mean"] is None:
        return "-"
    if s["sd"] is None or not math.isfinite(s["sd"]):
        return f"{s['mean']:.3f}"
    return f"{s['mean']:.3f} ± {s['sd']:.3f}"
