"""``train``: the whole transfer-learning run, from data path to a finished run directory.

Usage::

    from medxfer import TrainConfig, train
    result = train(TrainConfig(data="data/breastmnist_28.npz", strategy="linear-probe", image_size=64))
    result["metrics"]["test"]["auc"]
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medxfer import runs
from medxfer.config import TrainConfig
from medxfer.data.loading import load_images
from medxfer.data.manifest import Manifest, check_classes, check_split_classes
from medxfer.data.sources import load_manifest
from medxfer.data.splits import assign_splits
from medxfer.data.transforms import Augment
from medxfer.engine.dist import DistContext, cleanup, init_distributed
from medxfer.engine.features import (extract_features, feature_cache_dir, fit_logistic_head, fold_standardization,
                                     source_key_parts, standardize)
from medxfer.engine.trainer import FitResult, FitSettings, fit, predict_logits, resolve_precision
from medxfer.errors import MedxferError
from medxfer.models.adapt import build_model
from medxfer.models.catalog import resolve_source
from medxfer.strategies import param_groups


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_data(cfg: TrainConfig, size: int, log=print):
    """Manifest with splits + decoded uint8 images aligned with its rows, the skipped samples and the
    duplicates table (see :func:`medxfer.data.duplicates.handle_duplicates`)."""
    from medxfer.data.readers import ReadOptions

    manifest = load_manifest(cfg.data, label_names=list(cfg.label_names) if cfg.label_names else None,
                             labels_csv=cfg.labels_csv, on_unlabelled=cfg.on_unlabelled)
    check_classes(manifest)
    if cfg.split_file:
        from medxfer.cv import apply_split_file

        manifest = apply_split_file(manifest, cfg.split_file)
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    manifest = assign_splits(manifest, seed=split_seed, split_by=cfg.split_by)
    read = ReadOptions(window=cfg.window, frame=cfg.frame, slice=cfg.slice, intensity=cfg.intensity)
    cache = None
    if manifest.arrays is None and not cfg.no_cache:
        from medxfer.data.cache import DecodeCache, default_cache_dir

        cache = DecodeCache(cfg.cache_dir or default_cache_dir())
        cache.check_writable()
    loaded = load_images(manifest, size, read, cache, cfg.on_bad_file)
    if loaded.skipped:
        log(f"skipped {len(loaded.skipped)} unreadable samples (listed in skipped.csv)")
    manifest = manifest.subset(loaded.keep)
    from medxfer.data.duplicates import handle_duplicates

    keep, duplicates = handle_duplicates(manifest, loaded.images, cfg.duplicates, log=log)
    manifest, images = manifest.subset(keep), loaded.images[torch.from_numpy(keep)]
    if cfg.label_fraction < 1:
        manifest, images = _label_fraction(manifest, images, cfg.label_fraction, cfg.seed)
    check_split_classes(manifest, log)
    for note in manifest.notes:
        log(note)
    return manifest, images, loaded.skipped, read, duplicates


def _label_fraction(manifest: Manifest, images: torch.Tensor, fraction: float, seed: int):
    """Keep a stratified ``fraction`` of the train split (at least 2 per class); val/test untouched."""
    t = manifest.table
    rng = np.random.default_rng(seed)
    keep = np.ones(len(t), bool)
    for label in t["label"].unique():
        idx = np.flatnonzero((t["split"] == "train").to_numpy() & (t["label"] == label).to_numpy())
        n = max(2, int(round(len(idx) * fraction)))
        drop = rng.permutation(idx)[n:]
        keep[drop] = False
    out = manifest.subset(keep)
    out.notes.append(f"kept {fraction:g} of the train labels ({int((out.table['split'] == 'train').sum())} images)")
    return out, images[torch.from_numpy(keep)]


def positive_index(labels: list[str], positive_label: str | None) -> int | None:
    if len(labels) != 2:
        return None
    if positive_label is None:
        return 1
    if positive_label in labels:
        return labels.index(positive_label)
    raise MedxferError(f"--positive-label '{positive_label}' is not a class; the classes are {labels}.")


def train(cfg: TrainConfig, log=print, progress=None) -> dict:
    """Run one training job end to end; rank 0 writes the run directory. Returns metrics and paths."""
    ctx = init_distributed()
    _check_resume(cfg)
    rd = runs.RunDirectory(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume)
    try:
        if ctx.is_main:  # checked before any work: a run is never lost to an unwritable --out
            rd.__enter__()
        return _train(cfg, ctx, rd, log if ctx.is_main else (lambda *a, **k: None), progress if ctx.is_main else None)
    except BaseException:
        rd.abandon()
        raise
    finally:
        rd.release()
        cleanup(ctx)


def data_fingerprint(manifest: Manifest, images: torch.Tensor) -> str:
    """sha256 of what training sees: sample ids, labels, splits and the decoded pixels. A resume onto
    other data (changed labels, files, splits) is refused by comparing it with the checkpoint's."""
    from medxfer.engine.features import content_hash

    t = manifest.table
    rows = pd.DataFrame({"id": t["sample_id"].astype(str), "label": t["label"], "split": t["split"].astype(str)})
    blob = rows.to_csv(index=False) + "|".join(manifest.labels) + content_hash(images)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _train(cfg: TrainConfig, ctx: DistContext, rd: runs.RunDirectory, log, progress) -> dict:
    t_start = time.perf_counter()
    checkpoint = rd.checkpoint
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    spec = resolve_source(cfg.source, cfg.weights)
    size = cfg.image_size or spec.input_size
    manifest, images, skipped, read, duplicates = prepare_data(cfg, size, log)
    labels, t = manifest.labels, manifest.table
    pos = positive_index(labels, cfg.positive_label)
    data_chans = images.shape[1]
    seed_everything(cfg.seed)
    model, info = build_model(spec, len(labels), data_chans, grey_mode=cfg.grey_mode,
                              pretrained=cfg.strategy != "scratch")
    y = torch.tensor(t["label"].to_numpy(), dtype=torch.long)
    part = {s: torch.from_numpy((t["split"] == s).to_numpy().copy()) for s in ("train", "val", "test")}
    for s, mask in part.items():
        if int(mask.sum()) == 0:
            raise MedxferError(f"the {s} split is empty. Give train, val and test samples, or let medxfer split.")
    precision = resolve_precision(cfg.precision, ctx.device)
    counts = torch.bincount(y[part["train"]], minlength=len(labels)).float()
    weights = (counts.sum() / (len(labels) * counts.clamp(min=1))) if cfg.class_weights == "balanced" else None
    n_train = int(part["train"].sum())
    epochs = cfg.epochs_for(n_train, ctx.world)
    if progress is not None and hasattr(progress, "set_total"):
        progress.set_total(epochs)
    settings = FitSettings(epochs=epochs, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                           warmup_epochs=cfg.warmup_epochs, patience=cfg.patience_for(n_train, ctx.world),
                           ema_epochs=cfg.ema_epochs, class_weights=weights,
                           precision=precision, seed=cfg.seed, on_epoch=progress)
    if ctx.is_main:  # weights, best weights, two optimiser moments, the exported copies
        rd.check_space(6 * sum(p.numel() * p.element_size() for p in model.parameters()) + rd.MIN_FREE)
    settings.checkpoint, settings.resume = checkpoint, cfg.resume
    settings.signature = {**cfg.training_signature(), "epochs": epochs, "n_train": n_train, "world": ctx.world,
                          "data_fingerprint": data_fingerprint(manifest, images)}
    groups = param_groups(model, cfg.strategy, cfg.resolved_lr, unfreeze=cfg.unfreeze,
                          backbone_lr_mult=cfg.backbone_lr_mult, layer_decay=cfg.layer_decay)
    if cfg.compile:
        model.net = torch.compile(model.net)
    if cfg.strategy == "linear-probe":
        feats, hit = _features(model, images, cfg, spec, info, read, size, precision, ctx, part)
        log(f"features: {'from cache' if hit else 'extracted once'} ({feats['train'].shape[1]} per image)")
        if cfg.feature_augment == 0 and cfg.augment != "none":
            log("linear-probe trains the head on cached features, without augmentation; --feature-augment K adds "
                "K augmented views of the train set (each costs one more backbone pass over it)")
        settings.channels_last = False
        train_y = y[part["train"]].repeat(feats["views"])
        mu, sd, f_train, f_val = standardize(feats["train"], feats["val"])
        if cfg.head == "logistic":
            t0 = time.perf_counter()
            search = fit_logistic_head(model.head(), f_train, train_y, f_val, y[part["val"]], seed=cfg.seed,
                                       class_weight="balanced" if cfg.class_weights == "balanced" else None)
            result = FitResult(history=[{"epoch": 1, "C": search["C"], "val_auc": search["val_auc"]}], best_epoch=1,
                               best_auc=search["val_auc"], seconds=time.perf_counter() - t0)
            log(f"logistic head: C={search['C']} chosen on validation (AUC {search['val_auc']:.3f})")
        else:
            settings.batch_size = max(cfg.batch_size, 256)
            result = fit(model.head(), groups, f_train, train_y, f_val, y[part["val"]], settings,
                         DistContext(device=ctx.device))
        fold_standardization(model.head(), mu.to(ctx.device), sd.to(ctx.device))
        eval_inputs = (model.head(), feats["all"])  # val/test from the cached features: no second backbone pass
        result.extract_seconds = feats["seconds"]
    else:
        eval_inputs = (model, images)
        settings.augment = Augment(cfg.augment, seed=cfg.seed * 1000 + ctx.rank) or None
        result = fit(model, groups, images[part["train"]], y[part["train"]], images[part["val"]], y[part["val"]],
                     settings, ctx)
    if cfg.compile:
        model.net = model.net._orig_mod
    model.cpu().eval()
    out = {"run_dir": cfg.out}
    if ctx.is_main:
        result.max_epochs, result.patience = settings.epochs, settings.patience
        out.update(_finish(cfg, model, spec, info, manifest, images, eval_inputs, part, y, pos, result, skipped,
                           duplicates, size, read, t_start, log, rd.staging))
        rd.commit()  # OUT becomes the new complete run in one step; the checkpoint goes with the staging folder
    return out


def _check_resume(cfg: TrainConfig) -> None:
    """--resume continues an epoch loop; linear-probe with the logistic head has none."""
    uses_loop = cfg.strategy != "linear-probe" or cfg.head == "linear"
    if cfg.resume and not uses_loop:
        raise MedxferError("--resume continues an epoch loop; linear-probe with the logistic head has none (it "
                           "takes seconds): run it again without --resume.")


def _features(model, images, cfg, spec, info, read, size, precision, ctx, part) -> tuple[dict, bool]:
    t0 = time.perf_counter()
    cache = feature_cache_dir(cfg)
    if cache is not None:
        from medxfer.data.cache import DecodeCache

        DecodeCache(cache).check_writable()
    key = source_key_parts(spec, info, size, read, cfg.seed)
    kw = dict(cache_dir=cache, precision=precision, device=ctx.device)
    all_feats, hit = extract_features(model, images, key, **kw)
    train_x = all_feats[part["train"]]
    out = {"train": train_x, "val": all_feats[part["val"]], "all": all_feats, "views": 1}
    if cfg.feature_augment > 0:
        aug = Augment(cfg.augment if cfg.augment != "none" else "light", seed=cfg.seed)
        views = [extract_features(model, images[part["train"]], {**key, "augment": cfg.augment, "view": k,
                                                                  "seed": cfg.seed}, augment=aug, **kw)[0]
                 for k in range(cfg.feature_augment)]
        out["train"] = torch.cat([train_x, *views])
        out["views"] = 1 + len(views)
    out["seconds"] = time.perf_counter() - t0
    return out, hit


def _finish(cfg, model, spec, info, manifest, images, eval_inputs, part, y, pos, result, skipped, duplicates,
            size, read, t_start, log, run_dir: Path) -> dict:
    """Calibrate and choose the threshold on validation, evaluate val and test, write the run directory."""
    from medxfer.evaluation.calibration import apply_temperature, choose_threshold, fit_temperature
    from medxfer.evaluation.metrics import evaluate

    settings_epochs = getattr(result, "max_epochs", None)
    labels, t = manifest.labels, manifest.table
    module, inputs = eval_inputs
    module.cpu()
    logits = {s: predict_logits(module, inputs[part[s]].cpu()).numpy() for s in ("val", "test")}
    ys = {s: y[part[s]].numpy() for s in ("val", "test")}
    temperature = fit_temperature(logits["val"], ys["val"]) if cfg.calibrate == "temperature" else 1.0
    probs = {s: apply_temperature(logits[s], temperature) for s in logits}
    threshold = None
    if pos is not None:
        try:
            threshold = choose_threshold(ys["val"], probs["val"][:, pos], cfg.threshold, positive=pos)
        except MedxferError as e:
            log(f"threshold rule '{cfg.threshold}' not usable on validation ({e}); using 0.5")
            threshold = 0.5
    groups = {s: (t.loc[part[s].numpy(), "patient_id"].to_numpy() if manifest.has_patients else None) for s in logits}
    metrics = {s: evaluate(ys[s], probs[s], labels, positive=pos, threshold=threshold, groups=groups[s],
                           n_bootstrap=cfg.bootstrap if s == "test" else 0, seed=cfg.seed) for s in logits}
    metrics.update({"train_seconds": round(result.seconds, 3), "train_images_per_s": round(result.images_per_second, 2),
                    "total_seconds": round(time.perf_counter() - t_start, 3), "best_epoch": result.best_epoch,
                    "patience": getattr(result, "patience", None),
                    "epochs_run": len(result.history), "temperature": temperature, "threshold": threshold,
                    "seed": cfg.seed, "strategy": cfg.strategy, "source": spec.name,
                    "processes": int(os.environ.get("WORLD_SIZE", "1"))})
    if hasattr(result, "extract_seconds"):
        metrics["feature_seconds"] = round(result.extract_seconds, 3)
    meta = {"arch": spec.arch.split(".")[0], "source": spec.name, "labels": labels, "in_chans": info["in_chans"],
            "data_chans": model.data_chans, "image_size": size, "mean": model.mean.flatten().tolist(),
            "std": model.std.flatten().tolist(), "grey_mode": info["grey_mode"], "read": read.key(),
            "temperature": temperature, "threshold": threshold, "positive_label": labels[pos] if pos is not None else None,
            "strategy": cfg.strategy, "input": "float32 (N, C, S, S) in [0, 1]; normalisation is inside the model"}
    config = cfg.to_dict()
    config.update({"image_size": size, "lr": cfg.resolved_lr, "epochs_max": settings_epochs,
                   "resolved": {"source": {"name": spec.name, "arch": spec.arch, "weights": spec.weights,
                                           "weights_sha256": info["weights_sha256"], "domain": spec.domain,
                                           "unexpected_keys": info.get("unexpected_keys", [])},
                                "input": {"data_channels": model.data_chans, "model_channels": info["in_chans"],
                                          "grey_mode": info["grey_mode"], "mean": meta["mean"], "std": meta["std"]},
                                "data": {"origin": manifest.origin, "labels": labels, "counts": manifest.counts(),
                                         "notes": manifest.notes},
                                "torch": torch.__version__}})
    meta["weights_sha256"] = runs.write_weights(run_dir / "model.safetensors", model.state_dict())
    runs.write_json(run_dir / "model.json", meta)
    runs.write_yaml(run_dir / "config.yaml", config)
    runs.write_json(run_dir / "metrics.json", metrics)
    runs.write_csv(run_dir / "history.csv", pd.DataFrame(result.history))
    split_cols = ["sample_id", "split", "label"] + (["patient_id"] if manifest.has_patients else [])
    split_df = t[split_cols].assign(label=[labels[i] for i in t["label"]])
    runs.write_csv(run_dir / "split.csv", split_df)
    rows = []
    for s in ("val", "test"):
        sub = split_df[part[s].numpy()].reset_index(drop=True)
        df = pd.DataFrame(probs[s], columns=[f"prob_{c}" for c in labels])
        rows.append(pd.concat([sub[["split", "sample_id", "label"] + split_cols[3:]], df], axis=1))
    runs.write_csv(run_dir / "predictions.csv", pd.concat(rows, ignore_index=True))
    if skipped:
        runs.write_csv(run_dir / "skipped.csv", pd.DataFrame([(s.sample_id, s.reason) for s in skipped],
                                                             columns=["sample_id", "reason"]))
    if len(duplicates):
        runs.write_csv(run_dir / "duplicates.csv", duplicates)
    if cfg.keep_paths:
        paths = [(sid, p) for sid, p in zip(t["sample_id"], t["path"])] if "path" in t else []
        paths += [(s.sample_id, s.path) for s in skipped]
        runs.write_csv(run_dir / "paths.csv", pd.DataFrame(paths, columns=["sample_id", "path"]))
        log("paths.csv maps sample ids to files: it can hold patient names; keep it with the data, do not share it")
    if cfg.report:
        from medxfer.evaluation.report import write_report

        try:
            write_report(run_dir, test_images=images[part["test"]], log=log)
        except MedxferError as e:
            log(f"report not written ({e}); retry with 'medxfer report {cfg.out}'")
        except Exception as e:  # noqa: BLE001 - the run is written; a failed report must not lose it
            log(f"report not written ({type(e).__name__}: {e}); retry with 'medxfer report {cfg.out}'")
    return {"metrics": metrics, "run_dir": str(cfg.out)}
