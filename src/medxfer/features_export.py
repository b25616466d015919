"""Export embeddings (pooled pre-logit features) for every sample, and optionally fit a logistic head.

Usage::

    r = export_features("feats.parquet", cfg, run_dir="runs/breast")     # the run's model + preprocessing
    r = export_features("feats.npz", TrainConfig.create(data="data/x.npz", image_size=64))   # a source's
    r = export_features("feats.npz", cfg, head="logistic")   # + feats_logistic.json, r["head"]["test_auc"]

Parquet (``.parquet``): columns ``sample_id, split, label, f0..fD-1``. Otherwise npz: arrays
``features`` (N, D) float32, ``sample_id``, ``split``, ``label`` (class names) and ``labels`` (the
class list). Features come from :func:`medxfer.engine.features.extract_features`, so they share the
disk cache with ``train --strategy linear-probe`` (same source, weights, size and reader options).

``out`` (and ``<out>_logistic.json``) go through the output guard (:func:`medxfer.runs.check_out`): never
over the data or into a run directory; an existing file only when it is a features file medxfer wrote (its
columns or arrays) or with ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import logging
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medxfer import files
from medxfer.config import TrainConfig
from medxfer.data.prepare import prepare_data
from medxfer.data.transforms import match_channels_uint8
from medxfer.engine.features import C_GRID, extract_features, feature_cache_dir, source_key_parts
from medxfer.engine.objectives import auc_score
from medxfer.engine.trainer import resolve_precision, seed_everything
from medxfer.errors import MedxferError
from medxfer.models.adapt import build_model
from medxfer.models.catalog import resolve_source
from medxfer.runs import Run, check_out

log = logging.getLogger(__name__)


def _run_model(run_dir: Path, cfg: TrainConfig, given: dict):
    """The run's model, its data options (the given ones override), size, cache key and description."""
    run = Run.load(run_dir)
    meta = run.model
    other = [k for k in ("source", "weights", "grey_mode") if k in given]
    if other:
        raise MedxferError(f"a run directory brings the run's own model: leave out --{other[0].replace('_', '-')} "
                           "(or give --source without a run directory).")
    if "image_size" in given and given["image_size"] != meta.image_size:
        raise MedxferError(f"the run was trained at {meta.image_size} px; --image-size {given['image_size']} would "
                           "change its preprocessing. Leave --image-size out with a run directory.")
    data = run.config.data
    if "data" in given:
        data = dataclasses.replace(data, path=given["data"], labels=cfg.data.labels)
    data = dataclasses.replace(data, label_fraction=1.0, cache_dir=cfg.data.cache_dir or data.cache_dir,
                               no_cache=cfg.data.no_cache or data.no_cache)
    key = {"run_weights": run.weights_digest(), "arch": meta.arch, "size": meta.image_size, "read": meta.read,
           "chans": meta.in_chans, "data_chans": meta.data_chans}
    # the network's own features: test-time augmentation averages logits, and has no features of its own
    return (run.load_model(tta=False), data, meta.image_size, key, f"run {run_dir} ({meta.source}, {meta.image_size} px)",
            meta)


NPZ_ARRAYS = {"features", "sample_id", "split", "label", "labels"}


def is_features_file(path: Path) -> bool:
    """Whether ``path`` is a file :func:`export_features` wrote: a parquet whose columns start sample_id, split,
    label, f0, an npz holding exactly its arrays, or the logistic head's JSON."""
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_schema(path).names[:4] == ["sample_id", "split", "label", "f0"]
        if path.suffix.lower() == ".json":
            head = json.loads(path.read_text())
            return isinstance(head, dict) and str(head.get("model", "")).startswith("sklearn LogisticRegressionCV")
        with zipfile.ZipFile(path) as z:
            return {n.removesuffix(".npy") for n in z.namelist()} == NPZ_ARRAYS
    except Exception:  # noqa: BLE001 - anything that cannot be read as a features file is not one
        return False


def export_features(out: str | Path, cfg: TrainConfig, run_dir: str | Path | None = None, head: str | None = None,
                    given: dict | None = None, overwrite: bool = False) -> dict:
    """Write features for all samples to ``out`` (.parquet or .npz); fit a logistic head when asked.

    ``cfg``: the data and model options (``--data``, ``--source``, ``--image-size``...); with ``run_dir``
    the run's own model and preprocessing are used and ``given`` (the options named on the command line)
    may only change the data path and caches."""
    if head not in (None, "none", "logistic"):
        raise MedxferError(f"The 'head' parameter must be 'logistic' or 'none'. Got '{head}' instead.")
    out, t0, given = Path(out), time.perf_counter(), given or {}
    seed = cfg.optim.seed
    if run_dir is not None:
        model, data, size, key, what, meta = _run_model(Path(run_dir), cfg, given)
    else:
        if not cfg.data.path:
            raise MedxferError("--source needs --data PATH (an .npz, a folder, a CSV/Parquet manifest).")
        spec = resolve_source(cfg.model.source, cfg.model.weights)
        model, data, meta, size = None, cfg.data, None, cfg.model.image_size  # None: from the data, as train
    inputs = [p for p in (data.path, run_dir) if p]
    check_out(out, inputs=inputs, overwrite=overwrite, ours=is_features_file)  # before any work
    if head == "logistic":
        check_out(out.with_name(out.stem + "_logistic.json"), inputs=inputs, overwrite=overwrite, ours=is_features_file)
    prep = prepare_data(dataclasses.replace(data, label_fraction=1.0), size, seed,
                        source_size=spec.input_size if model is None else 224)
    images, size = prep.images, prep.size
    if model is None:
        what = f"source {spec.name} ({size} px)"
    if model is None:  # a source: built as linear-probe training builds it, so the feature cache is shared
        seed_everything(seed)
        model, info = build_model(spec, len(prep.labels), images.shape[1], grey_mode=cfg.model.grey_mode)
        key = source_key_parts(spec, info, size, prep.read, seed)
    else:
        images = match_channels_uint8(images, meta.data_chans)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache = feature_cache_dir(data.cache_dir, data.no_cache)
    feats, hit = extract_features(model, images, key, cache_dir=cache, device=device,
                                  precision=resolve_precision("auto", device))
    feats = feats.float().numpy()
    t, labels = prep.table, prep.labels
    sample_id = np.asarray(t["sample_id"].astype(str).to_numpy(), dtype=str)
    split = np.asarray(t["split"].astype(str).to_numpy(), dtype=str)
    _write(out, feats, sample_id, split, np.array([labels[i] for i in t["label"]], dtype=str), labels)
    result = {"path": str(out), "n": int(len(feats)), "dim": int(feats.shape[1]), "from": what,
              "cache": "hit" if hit else ("off" if cache is None else "miss"), "image_size": size,
              "per_split": {s: int((split == s).sum()) for s in ("train", "val", "test")},
              "seconds": round(time.perf_counter() - t0, 3), "skipped": len(prep.skipped)}
    if head == "logistic":
        fit = fit_logistic_cv(feats, t["label"].to_numpy(), split, labels, seed=seed)
        fit.update({"features": str(out), "from": what})
        head_path = out.with_name(out.stem + "_logistic.json")
        files.write_json(head_path, fit)
        result["head"] = {k: fit[k] for k in ("C", "cv_auc", "test_auc", "train_n", "test_n", "scoring")}
        result["head"]["path"] = str(head_path)
    return result


def _write(out: Path, feats, sample_id, split, label, labels) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = files.temp_beside(out)   # the umask's mode, as every file medxfer writes (mkstemp made 0600)
    except OSError as e:
        raise files.write_error(out, e) from None
    try:
        if out.suffix.lower() == ".parquet":
            cols = {"sample_id": sample_id, "split": split, "label": label}
            cols.update({f"f{j}": feats[:, j] for j in range(feats.shape[1])})
            pd.DataFrame(cols).to_parquet(tmp, index=False)
        else:
            with open(tmp, "wb") as f:
                np.savez(f, features=feats, sample_id=sample_id, split=split, label=label,
                         labels=np.array(labels, dtype=str))
        os.replace(tmp, out)
    except OSError as e:
        raise files.write_error(out, e) from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def fit_logistic_cv(feats: np.ndarray, y: np.ndarray, split: np.ndarray, labels: list[str], seed: int = 0) -> dict:
    """LogisticRegressionCV on standardised train+val features (C by cross-validated AUC); test AUC."""
    from sklearn.linear_model import LogisticRegressionCV  # scikit-learn's solvers: only when a head is fitted
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    fit_mask, test_mask = np.isin(split, ("train", "val")), split == "test"
    xf, yf = feats[fit_mask], y[fit_mask]
    present, counts = np.unique(yf, return_counts=True)
    if len(present) < 2:
        raise MedxferError("the train and val splits hold one class only: a logistic head needs at least two.")
    folds = int(min(5, counts.min()))
    if folds < 2:
        raise MedxferError(f"a class has {int(counts.min())} train+val sample(s): cross-validation needs at least 2 each.")
    mu, sd = xf.mean(0), xf.std(0)
    sd = np.maximum(sd, max(1e-2 * float(sd.mean()), 1e-6))
    scoring = "roc_auc" if len(labels) == 2 else "roc_auc_ovr"
    clf = LogisticRegressionCV(Cs=list(C_GRID), l1_ratios=(0.0,), cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                               scoring=scoring, max_iter=3000, random_state=seed, use_legacy_attributes=False)
    with threadpool_limits(limits=1, user_api="blas"):  # small matrices: BLAS threads only contend (50x slower)
        clf.fit((xf - mu) / sd, yf)
    test_auc = None
    if test_mask.any():
        probs = np.zeros((int(test_mask.sum()), len(labels)))
        with threadpool_limits(limits=1, user_api="blas"):
            probs[:, clf.classes_] = clf.predict_proba((feats[test_mask] - mu) / sd)
        auc = auc_score("single", y[test_mask], probs)
        test_auc = None if np.isnan(auc) else auc
    return {"model": "sklearn LogisticRegressionCV (l2), standardised features", "scoring": scoring,
            "cv_folds": folds, "C_grid": list(C_GRID), "C": float(np.ravel(clf.C_)[0]),
            "cv_auc": float(np.asarray(clf.scores_).mean(0).max()), "test_auc": test_auc,
            "train_n": int(fit_mask.sum()), "test_n": int(test_mask.sum()),
            "labels": list(labels), "classes": [labels[i] for i in clf.classes_],
            "coef": clf.coef_.tolist(), "intercept": clf.intercept_.tolist(), "mean": mu.tolist(), "std": sd.tolist(),
            "usage": "z = (features - mean) / std; logit = z @ coef.T + intercept (binary: one row, for classes[1])"}
