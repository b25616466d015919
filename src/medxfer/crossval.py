"""Patient-grouped, stratified k-fold cross-validation of one training configuration.

Usage::

    from medxfer import TrainConfig
    from medxfer.crossval import cross_validate

    result = cross_validate(TrainConfig.create(data="labels.csv", strategy="linear-probe"), folds=5, out="runs/cv")
    result["summary"]["auc"]          # {"mean", "sd", "n", "values"} over the folds' test AUCs

Fold ``i`` tests on part ``i``, validates (early stopping, calibration, threshold) on part
``(i + 1) % K`` and trains on the rest; the parts come from :func:`medxfer.data.splits.kfold`
(stratified by label, grouped by patient when the data has patients, so no patient is in two
parts). Every sample is pooled first: given train/val/test splits are ignored. Each fold is an
ordinary run directory ``OUT/fold_<i>`` trained with its split handed over as data; ``OUT/folds.csv``
records every sample's fold, and ``OUT/cv.json`` the per-fold test metrics with their mean and sd.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from medxfer import files
from medxfer.config import TrainConfig
from medxfer.data.prepare import load_source_manifest
from medxfer.data.splits import kfold
from medxfer.errors import MedxferError
from medxfer.evaluation.stats import summarize
from medxfer.pipeline import train
from medxfer.runs import checkpoint_path

__all__ = ["cross_validate", "fold_split", "make_folds", "summarize_folds"]
log = logging.getLogger(__name__)


def make_folds(manifest, k: int, seed: int = 0, split_by: str | None = "auto") -> np.ndarray:
    """Fold index per manifest row (stratified, patient-grouped), with clear errors for too few samples."""
    if k < 2:
        raise MedxferError(f"The 'folds' parameter must be at least 2. Got {k} instead.")
    counts = (manifest.targets().sum(0).astype(int) if manifest.multilabel
              else np.bincount(manifest.table["label"].to_numpy(), minlength=len(manifest.labels)))
    if counts[counts > 0].min() < k:
        small = manifest.labels[int(np.flatnonzero(counts == counts[counts > 0].min())[0])]
        raise MedxferError(f"{'finding' if manifest.multilabel else 'class'} '{small}' has {counts[counts > 0].min()} "
                           f"images: too few for {k} folds "
                           "(each fold needs one to test on). Use fewer folds.")
    try:
        return kfold(manifest, k=k, seed=seed, split_by=split_by)
    except ValueError as e:  # sklearn's own checks, e.g. too few samples
        raise MedxferError(f"cannot make {k} folds of {manifest.origin}: {e}") from e


def fold_split(folds: np.ndarray, i: int, k: int) -> np.ndarray:
    """test = fold i, val = fold (i + 1) % k, train = the rest."""
    return np.where(folds == i, "test", np.where(folds == (i + 1) % k, "val", "train"))


def cross_validate(cfg: TrainConfig, folds: int, out: str | Path, train_fn=None) -> dict:
    """Train ``cfg`` once per fold into ``out/fold_<i>``; write ``out/cv.json``; return it.

    ``train_fn(cfg, splits) -> Run`` defaults to :func:`medxfer.pipeline.train`."""
    if cfg.runtime.devices > 1:
        raise MedxferError("medxfer cv trains its folds in one process: --devices must be 1.")
    train_fn = train_fn or (lambda c, splits: train(c, splits=splits))
    out = Path(out)
    manifest = load_source_manifest(cfg.data)
    fold = make_folds(manifest, folds, seed=cfg.split_seed, split_by=cfg.data.split_by)
    ids = manifest.table["sample_id"].astype(str)
    files.write_csv(out / "folds.csv", pd.DataFrame({"sample_id": ids, "fold": fold}))
    if manifest.has_splits:
        log.info("cross-validation pools all samples: the given train/val/test splits are not used")
    per_fold = []
    for i in range(folds):
        splits = dict(zip(ids, fold_split(fold, i, folds)))
        log.info("fold %d/%d: test on part %d, validate on part %d", i + 1, folds, i, (i + 1) % folds)
        fold_dir = out / f"fold_{i}"
        resume = cfg.runtime.resume and checkpoint_path(fold_dir).exists()  # --resume: go on where a fold stopped
        run = train_fn(cfg.replace(out=str(fold_dir), resume=resume), splits)
        m = run.metrics
        per_fold.append({"fold": i, "run_dir": str(run.dir), "n_test": m["test"].get("n"),
                         "best_epoch": m.get("best_epoch"), "train_seconds": m.get("train_seconds"),
                         "test": m["test"], "val": m.get("val")})
    report = {"folds": folds, "seed": cfg.split_seed, "data": str(cfg.data.path), "strategy": cfg.optim.strategy,
              "source": cfg.model.source,
              "grouped_by_patient": bool(manifest.has_patients and cfg.data.split_by not in (None, "none")),
              "summary": summarize_folds([f["test"] for f in per_fold]), "per_fold": per_fold}
    files.write_json(out / "cv.json", report)
    return report


def summarize_folds(test_metrics: list[dict]) -> dict:
    """``{metric: summarize(values over folds)}`` for every scalar test metric (nested ones dotted)."""
    flat = [_flatten(m) for m in test_metrics]
    keys: list[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys]
    return {k: summarize([f.get(k) for f in flat]) for k in keys if any(f.get(k) is not None for f in flat)}


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
