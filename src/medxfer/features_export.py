"""Export embeddings (pooled pre-logit features) for every sample, and optionally fit a logistic head.

Usage::

    r = export_features("feats.parquet", run_dir="runs/breast")                 # the run's model + preprocessing
    r = export_features("feats.npz", source="efficientnet_lite0.in1k", data="data/x.npz", image_size=64)
    r = export_features("feats.npz", ..., head="logistic")   # + feats_logistic.json, r["head"]["test_auc"]

Parquet (``.parquet``): columns ``sample_id, split, label, f0..fD-1``. Otherwise npz: arrays
``features`` (N, D) float32, ``sample_id``, ``split``, ``label`` (class names) and ``labels`` (the
class list). Features come from :func:`medxfer.engine.features.extract_features`, so they share the
disk cache with ``train --strategy linear-probe`` (same source, weights, size and reader options).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medxfer.errors import MedxferError


def _run_config(run_dir: Path, data: str | None):

    from medxfer.config import TrainConfig, config_from_dict

    cfg_path = run_dir / "config.yaml"
    from medxfer.runs import read_yaml

    raw = read_yaml(cfg_path, "config.yaml") if cfg_path.exists() else {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    d = {k: v for k, v in (raw or {}).items() if k in names}
    if data is not None:
        if d.get("data") != data:
            d.pop("labels_csv", None)
            d.pop("split_file", None)
        d["data"] = data
    if "data" not in d:
        raise MedxferError(f"'{run_dir}' has no config.yaml naming its data: pass --data PATH.")
    d["label_fraction"] = 1.0  # every sample
    return config_from_dict(d)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_feature_model(run_dir: str | Path | None = None, source: str | None = None, weights: str | None = None,
                       data: str | None = None, image_size: int | None = None, seed: int = 0,
                       cache_dir: str | None = None, no_cache: bool = False):
    """(model, cfg, size, cache key parts, meta, description) for a run directory; for a source the model
    is built later (it needs the data's channels and classes): (None, cfg, size, spec, None, description)."""
    from medxfer.config import TrainConfig

    if (run_dir is None) == (source is None):
        raise MedxferError("give either a run directory or --source NAME (not both).")
    if run_dir is not None:
        from medxfer.models.adapt import load_run_model

        run_dir = Path(run_dir)
        model, meta = load_run_model(run_dir)
        if image_size is not None and image_size != meta["image_size"]:
            raise MedxferError(f"the run was trained at {meta['image_size']} px; --image-size {image_size} would change "
                               "its preprocessing. Leave --image-size out with a run directory.")
        cfg = _run_config(run_dir, data)
        cfg = cfg.replace(cache_dir=cache_dir or cfg.cache_dir, no_cache=no_cache or cfg.no_cache)
        size = meta["image_size"]
        key = {"run_weights": _file_digest(run_dir / "model.safetensors"), "arch": meta["arch"], "size": size,
               "read": meta["read"], "chans": meta["in_chans"], "data_chans": meta["data_chans"]}
        return model, cfg, size, key, meta, f"run {run_dir} ({meta['source']}, {size} px)"
    if data is None:
        raise MedxferError("--source needs --data PATH (an .npz, a folder, a CSV/Parquet manifest).")
    from medxfer.models.catalog import resolve_source

    spec = resolve_source(source, weights)
    size = image_size or spec.input_size
    cfg = TrainConfig(data=data, source=source, weights=weights, image_size=size, seed=seed, cache_dir=cache_dir,
                      no_cache=no_cache, strategy="linear-probe")
    return None, cfg, size, spec, None, f"source {spec.name} ({size} px)"


def export_features(out: str | Path, run_dir: str | Path | None = None, source: str | None = None,
                    weights: str | None = None, data: str | None = None, image_size: int | None = None,
                    head: str | None = None, seed: int = 0, cache_dir: str | None = None, no_cache: bool = False,
                    batch_size: int = 256, log=print) -> dict:
    """Write features for all samples to ``out`` (.parquet or .npz); fit a logistic head when asked."""
    from medxfer.engine.features import extract_features, feature_cache_dir, source_key_parts
    from medxfer.engine.trainer import resolve_precision
    from medxfer.pipeline import prepare_data, seed_everything

    if head not in (None, "none", "logistic"):
        raise MedxferError(f"The 'head' parameter must be 'logistic' or 'none'. Got '{head}' instead.")
    out = Path(out)
    t0 = time.perf_counter()
    model, cfg, size, key, meta, what = load_feature_model(run_dir, source, weights, data, image_size, seed,
                                                            cache_dir, no_cache)
    manifest, images, skipped, read, _ = prepare_data(cfg, size, log)
    if model is None:  # a source: built as linear-probe training builds it, so the feature cache is shared
        from medxfer.models.adapt import build_model

        spec = key
        seed_everything(cfg.seed)
        model, info = build_model(spec, len(manifest.labels), images.shape[1], grey_mode=cfg.grey_mode)
        key = source_key_parts(spec, info, size, read, cfg.seed)
    else:
        from medxfer.predict import match_uint8_channels

        images = match_uint8_channels(images, meta["data_chans"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache = feature_cache_dir(cfg)
    feats, hit = extract_features(model, images, key, cache_dir=cache, device=device, batch_size=batch_size,
                                  precision=resolve_precision("auto", device))
    feats = feats.float().numpy()
    t = manifest.table
    labels = manifest.labels
    sample_id = np.asarray(t["sample_id"].astype(str).to_numpy(), dtype=str)
    split = np.asarray(t["split"].astype(str).to_numpy(), dtype=str)
    label = np.array([labels[i] for i in t["label"]], dtype=str)
    _write(out, feats, sample_id, split, label, labels)
    result = {"path": str(out), "n": int(len(feats)), "dim": int(feats.shape[1]), "from": what,
              "cache": "hit" if hit else ("off" if cache is None else "miss"), "image_size": size,
              "per_split": {s: int((split == s).sum()) for s in ("train", "val", "test")},
              "seconds": round(time.perf_counter() - t0, 3), "skipped": len(skipped)}
    if head == "logistic":
        fit = fit_logistic_cv(feats, t["label"].to_numpy(), split, labels, seed=cfg.seed)
        fit.update({"features": str(out), "from": what})
        head_path = out.with_name(out.stem + "_logistic.json")
        from medxfer.runs import write_json

        write_json(head_path, fit)
        result["head"] = {k: fit[k] for k in ("C", "cv_auc", "test_auc", "train_n", "test_n", "scoring")}
        result["head"]["path"] = str(head_path)
    return result


def _write(out: Path, feats, sample_id, split, label, labels) -> None:
    import os
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if out.suffix.lower() == ".parquet":
            cols = {"sample_id": sample_id, "split": split, "label": label}
            cols.update({f"f{j}": feats[:, j] for j in range(feats.shape[1])})
            pd.DataFrame(cols).to_parquet(tmp, index=False)
        else:
            with open(tmp, "wb") as f:
                np.savez(f, features=feats, sample_id=sample_id, split=split, label=label,
                         labels=np.array(labels, dtype=str))
        from medxfer.export import _publish

        _publish(Path(tmp), out)
    finally:
        Path(tmp).unlink(missing_ok=True)


def fit_logistic_cv(feats: np.ndarray, y: np.ndarray, split: np.ndarray, labels: list[str], seed: int = 0) -> dict:
    """LogisticRegressionCV on standardised train+val features (C by cross-validated AUC); test AUC."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    from medxfer.engine.features import C_GRID
    from medxfer.engine.trainer import auc_of

    fit_mask = np.isin(split, ("train", "val"))
    test_mask = split == "test"
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
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):  # small matrices: BLAS threads only contend (50x slower)
        clf.fit((xf - mu) / sd, yf)
    cv_auc = float(np.asarray(clf.scores_).mean(0).max())
    test_auc = None
    if test_mask.any():
        probs = np.zeros((int(test_mask.sum()), len(labels)))
        with threadpool_limits(limits=1, user_api="blas"):
            probs[:, clf.classes_] = clf.predict_proba((feats[test_mask] - mu) / sd)
        auc = auc_of(y[test_mask], probs)
        test_auc = None if np.isnan(auc) else auc
    return {"model": "sklearn LogisticRegressionCV (l2), standardised features", "scoring": scoring,
            "cv_folds": folds, "C_grid": list(C_GRID), "C": float(np.ravel(clf.C_)[0]), "cv_auc": cv_auc,
            "test_auc": test_auc, "train_n": int(fit_mask.sum()), "test_n": int(test_mask.sum()),
            "labels": list(labels), "classes": [labels[i] for i in clf.classes_],
            "coef": clf.coef_.tolist(), "intercept": clf.intercept_.tolist(),
            "mean": mu.tolist(), "std": sd.tolist(),
            "usage": "z = (features - mean) / std; logit = z @ coef.T + intercept (binary: one row, for classes[1])"}
