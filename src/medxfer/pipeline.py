"""``train``: the whole transfer-learning run, from data to a finished run directory.

Usage::

    from medxfer import TrainConfig, train
    run = train(TrainConfig.create(data="data/breastmnist_28.npz", strategy="linear-probe", image_size=64))
    run = train("data/breastmnist_28.npz", strategy="full", image_size=64, out="runs/b")   # the same, flat
    run = train((images, labels), label_names=["benign", "malignant"], out="runs/arrays")  # in memory
    run.metrics["test"]["auc"], run.dir

Rank 0 writes the run directory (staged in ``OUT.partial``, moved into place when complete) and
returns it as a :class:`~medxfer.runs.Run`; other DDP ranks return None.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medxfer import run_writer
from medxfer.config import TrainConfig, auto_augment
from medxfer.data.manifest import Manifest
from medxfer.data.augment import TTA, Augment, get_preset
from medxfer.data.prepare import Prepared, prepare_data
from medxfer.data.sources import from_arrays, from_frame
from medxfer.engine.dist import DistContext, cleanup, init_distributed
from medxfer.engine.features import (
    content_hash,
    extract_features,
    feature_cache_dir,
    fit_logistic_head,
    fit_logistic_heads,
    fold_standardization,
    source_key_parts,
    standardize,
)
from medxfer.engine.optim import head_groups, param_groups
from medxfer.engine.objectives import objective
from medxfer.engine.trainer import FitResult, FitSettings, fit, predict_logits, resolve_precision, seed_everything
from medxfer.errors import MedxferError
from medxfer.evaluation.subgroups import run_subgroups
from medxfer.models.adapt import build_model
from medxfer.models.catalog import SourceSpec, resolve_source, volume_defaults
from medxfer.runs import ModelMeta, Run, RunDirectory
from medxfer.tracking import tracking_for

log = logging.getLogger("medxfer.train")


def resolve_task(task: str, manifest: Manifest) -> str:
    """--task as the data allows (auto: multilabel when samples carry several findings, else binary or
    multiclass by the number of classes)."""
    if manifest.multilabel:
        return "multilabel"
    if task in ("ordinal", "binary", "multiclass"):
        return task
    return "binary" if len(manifest.labels) == 2 else "multiclass"


def label_text(manifest: Manifest) -> list[str]:
    """Each sample's label as text: the class, or its findings joined by '|' (empty: none)."""
    labels, y = manifest.labels, manifest.table["label"].to_numpy(np.int64)
    if not manifest.multilabel:
        return [labels[i] for i in y]
    return ["|".join(n for k, n in enumerate(labels) if (v >> k) & 1) for v in y]


def positive_index(labels: list[str], positive_label: str | None) -> int | None:
    if len(labels) != 2:
        return None
    if positive_label is None:
        return 1
    if positive_label in labels:
        return labels.index(positive_label)
    raise MedxferError(f"--positive-label '{positive_label}' is not a class; the classes are {labels}.")


def data_fingerprint(manifest: Manifest, images: torch.Tensor) -> str:
    """sha256 of what training sees: sample ids, labels, splits and the decoded pixels. A resume onto
    other data (changed labels, files, splits) is refused by comparing it with the checkpoint's."""
    t = manifest.table
    rows = pd.DataFrame({"id": t["sample_id"].astype(str), "label": t["label"], "split": t["split"].astype(str)})
    blob = rows.to_csv(index=False) + "|".join(manifest.labels) + content_hash(images)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def train(data=None, config: TrainConfig | None = None, *, splits: dict | None = None, handlers: list | None = None,
          **options) -> Run | None:
    """Train one run end to end (see the module docstring).

    ``data``: a TrainConfig, a path (npz, folder, CSV/Parquet, DICOM folder), ``(images, labels)`` arrays
    or a DataFrame of ``path,label[,patient_id,split]``; ``options``: flat option names (``strategy=``,
    ``epochs=``, ``out=``...) applied on top of ``config``; ``splits``: sample_id -> split (cv folds);
    ``handlers``: loop handlers of the caller (:mod:`medxfer.engine.handlers`), e.g. a deadline or a
    tracker, called after each epoch's validation."""
    if isinstance(data, TrainConfig):
        config, data = data, None
    cfg = (config or TrainConfig()).replace(**options)
    cfg = _volume_options(cfg)
    source = None
    if isinstance(data, (str, Path)):
        cfg = cfg.replace(data=str(data))
    elif isinstance(data, pd.DataFrame):
        source = from_frame(data, list(cfg.data.label_names) if cfg.data.label_names else None, task=cfg.data.task,
                            label_columns=list(cfg.data.label_columns) if cfg.data.label_columns else None,
                            no_finding=cfg.data.no_finding)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        source = from_arrays(*data, label_names=list(cfg.data.label_names) if cfg.data.label_names else None)
    elif data is not None:
        raise MedxferError(f"train() takes a TrainConfig, a data path, (images, labels) or a DataFrame; got "
                           f"{type(data).__name__}.")
    with tracking_for(cfg) as tracker:
        tracker.log_config(cfg)
        run = _train_job(cfg, source, splits, [*(handlers or []), tracker.handler])
        tracker.log_run(run)
    return run


def _volume_options(cfg: TrainConfig) -> TrainConfig:
    """--spatial-dims 3 reads volumes whole (--slice volume); the two only go together. --tta is resolved
    here (recorded in config.yaml as the number of views used), and so is --source auto for volumes
    (models.catalog.volume_defaults: the small ResNet from scratch, recorded as the options it stands for)."""
    if cfg.model.spatial_dims == 3:
        if cfg.resolved_tta > 1:
            raise MedxferError("--tta views are 2-D: a 3-D model (--spatial-dims 3) is evaluated without --tta.")
        cfg = cfg.replace(tta=1)
        if cfg.model.source == "auto":
            cfg = cfg.replace(**volume_defaults(cfg.optim.strategy, cfg.model.weights)[0])
        return cfg if cfg.data.slice == "volume" else cfg.replace(slice="volume")
    cfg = cfg.replace(tta=cfg.resolved_tta)
    if cfg.data.slice == "volume":
        raise MedxferError("--slice volume keeps volumes whole: train them with --spatial-dims 3.")
    return cfg


def _train_job(cfg: TrainConfig, source: Manifest | None, splits, handlers: list) -> Run | None:
    ctx = init_distributed()
    if cfg.runtime.resume and cfg.strategy.feature_cache and cfg.optim.head == "logistic":
        raise MedxferError("--resume continues an epoch loop; linear-probe with the logistic head has none (it "
                           "takes seconds): run it again without --resume.")
    rd = RunDirectory(cfg.runtime.out, overwrite=cfg.runtime.overwrite, resume=cfg.runtime.resume)
    handler, quiet = None, logging.getLogger("medxfer")
    level = quiet.level
    try:
        if ctx.is_main:  # checked before any work: a run is never lost to an unwritable --out
            rd.__enter__()
            handler = logging.FileHandler(rd.staging / "train.log", encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            quiet.addHandler(handler)
        else:
            quiet.setLevel(logging.WARNING)  # one process speaks
        return _Job(cfg, ctx, rd, source, splits, handlers).run()
    except BaseException:
        rd.abandon()
        raise
    finally:
        if handler is not None:
            quiet.removeHandler(handler)
            handler.close()
        quiet.setLevel(level)
        rd.release()
        cleanup(ctx)


# ------------------------------------------------------------------------------------------ data
@dataclasses.dataclass(frozen=True)
class _Data:
    """What the job trains on: the source, the prepared samples, the task and its positive class."""

    spec: SourceSpec
    prep: Prepared
    task: str
    pos: int | None

    @property
    def labels(self) -> list[str]:
        return self.prep.labels

    @property
    def masks(self) -> dict:
        return self.prep.masks

    def outputs(self) -> int:
        return len(self.labels) - (1 if self.task == "ordinal" else 0)  # CORN: K-1 conditional logits

    def order(self) -> str:
        """What the labels mean for the decision: the positive class (binary) or the grades' order (ordinal)."""
        if self.task == "binary" and self.pos is not None:
            return f"; positive class '{self.labels[self.pos]}' (sensitivity and the threshold refer to it)"
        if self.task == "ordinal":
            return "; grades in the order " + " < ".join(self.labels)
        return ""

    def class_weights(self, rule: str | None) -> torch.Tensor | None:
        """--class-weights balanced: inverse class frequency (single label) or negatives/positives per finding
        (multilabel, BCE's pos_weight); ordinal grades are not reweighted."""
        y, k = self.prep.y[self.masks["train"]], len(self.labels)
        if rule != "balanced" or self.task == "ordinal":
            return None
        if self.task == "multilabel":
            pos = y.sum(0)
            return (len(y) - pos) / pos.clamp(min=1)
        counts = torch.bincount(y, minlength=k).float()
        return counts.sum() / (k * counts.clamp(min=1))


def _prepare(cfg: TrainConfig, source: Manifest | None, splits: dict | None) -> _Data:
    """The source resolved, the samples prepared (--image-size, or chosen from the data) and checked."""
    spec = resolve_source(cfg.model.source, cfg.model.weights, spatial_dims=cfg.model.spatial_dims)
    prep = prepare_data(cfg.data, cfg.model.image_size, cfg.optim.seed, splits=splits, source=source,
                        source_size=spec.input_size, spatial_dims=cfg.model.spatial_dims,
                        batch_size=cfg.optim.batch_size, arch=spec.arch)
    for s, mask in prep.masks.items():
        if int(mask.sum()) == 0:
            raise MedxferError(f"the {s} split is empty. Give train, val and test samples, or let medxfer split.")
    task = resolve_task(cfg.data.task, prep.manifest)
    pos = positive_index(prep.labels, cfg.data.positive_label) if task == "binary" else None
    _check_subgroups(cfg, prep, task)
    if (prep.images.dim() == 5) != (cfg.model.spatial_dims == 3):
        raise MedxferError("--spatial-dims 3 needs volumes (an npz of (N,D,H,W) arrays, or NIfTI files); these "
                           "samples are 2-D images." if cfg.model.spatial_dims == 3 else
                           "these samples are volumes kept whole: train them with --spatial-dims 3.")
    return _Data(spec, prep, task, pos)


def _check_subgroups(cfg: TrainConfig, prep: Prepared, task: str) -> None:
    cols = list(cfg.evaluation.subgroups or ())
    if not cols:
        return
    if task != "binary":
        raise MedxferError(f"--subgroups is for two-class tasks; this one is {task} "
                           f"({len(prep.labels)} {'findings' if task == 'multilabel' else 'classes'}).")
    have = [c for c in prep.table.columns if c not in ("sample_id", "label", "split", "path", "row")]
    missing = [c for c in cols if c not in prep.table.columns or c in ("sample_id", "path", "row")]
    if missing:
        raise MedxferError(f"--subgroups: the data has no column '{missing[0]}'. Columns it has: "
                           f"{', '.join(have) or 'none besides path and label'} (a CSV/Parquet manifest's extra "
                           "columns).")


def _augment_for(cfg: TrainConfig, data: _Data) -> TrainConfig:
    """--augment auto resolved from the data (config.AUGMENT_CHOICES says why): xray for grey 2-D images, light
    otherwise; recorded in config.yaml as the preset used, so replay and --resume train the same."""
    if cfg.optim.augment != "auto":
        return cfg
    preset = auto_augment(int(data.prep.images.shape[1]), 3 if data.prep.images.dim() == 5 else 2)
    grey = preset == "xray"
    log.info("augmentation %s: %s (--augment to choose another)", preset,
             "grey 2-D images (it lowered the validation log-loss over light on BreastMNIST and PneumoniaMNIST)"
             if grey else "the preset for colour images and volumes")
    return cfg.replace(augment=preset)


def _hflip(cfg: TrainConfig) -> bool:
    """Whether mirrored images are allowed (TTA views): --hflip, else the augmentation preset's rule."""
    return bool(cfg.optim.hflip if cfg.optim.hflip is not None else get_preset(cfg.optim.augment).hflip)


# ------------------------------------------------------------------------------------------- job
@dataclasses.dataclass
class _Job:
    """One run: data, model, fit (the strategy's path), finish (the run's files, by :mod:`medxfer.run_writer`)."""

    cfg: TrainConfig
    ctx: DistContext
    rd: RunDirectory
    source: Manifest | None = None
    splits: dict | None = None
    handlers: list = dataclasses.field(default_factory=list)

    def run(self) -> Run | None:
        cfg, ctx = self.cfg, self.ctx
        t_start = time.perf_counter()
        if cfg.runtime.num_threads:
            torch.set_num_threads(cfg.runtime.num_threads)
        seed_everything(cfg.optim.seed)
        data = _prepare(cfg, self.source, self.splits)
        cfg = _augment_for(cfg, data)
        seed_everything(cfg.optim.seed)
        model, info = build_model(data.spec, data.outputs(), data.prep.images.shape[1], grey_mode=cfg.model.grey_mode,
                                  pretrained=cfg.strategy.pretrained, spatial_dims=cfg.model.spatial_dims,
                                  inflate=cfg.model.inflate)
        if ctx.is_main:  # weights, best weights, two optimiser moments, the exported copies
            self.rd.check_space(6 * sum(p.numel() * p.element_size() for p in model.parameters()) + self.rd.MIN_FREE)
        precision = resolve_precision(cfg.optim.precision, ctx.device)
        log.info("%s %s: %d train / %d val / %d test images at %d px; task %s (%d %s)%s", cfg.optim.strategy,
                 f"from {data.spec.name}" if cfg.strategy.pretrained else f"({data.spec.arch}, random init)",
                 *(int(m.sum()) for m in data.masks.values()), data.prep.size, data.task,
                 len(data.labels), "findings" if data.task == "multilabel" else "classes", data.order())
        fitted = _Fit(cfg, ctx, self.rd, data, model, info, precision, self.handlers).run()
        model.cpu().eval()
        if cfg.evaluation.tta > 1:  # the views are images: evaluate the whole model on them (features cannot)
            fitted = dataclasses.replace(fitted, module=TTA(model, cfg.evaluation.tta, hflip=_hflip(cfg)),
                                         inputs=data.prep.images)
        if not ctx.is_main:
            return None
        _finish(cfg, self.rd, data, model, info, fitted, t_start, world=ctx.world, cv_splits=self.splits is not None)
        self.rd.commit()  # OUT becomes the new complete run in one step; the checkpoint goes with the staging folder
        return Run.load(cfg.runtime.out)


# ------------------------------------------------------------------------------------------- fit
@dataclasses.dataclass(frozen=True)
class _Fitted:
    """What fitting gives the finish: the result, what to evaluate (module on inputs) and the head search."""

    result: FitResult
    module: torch.nn.Module
    inputs: torch.Tensor
    feature_seconds: float | None = None
    head_search: dict | None = None       # a head fitted first (head_first strategies): its C and validation AUC


@dataclasses.dataclass
class _Fit:
    """The strategy's path: a head on the frozen source's cached features (feature_cache), or the epoch loop
    (after a head fitted on those features when the strategy fits its head first)."""

    cfg: TrainConfig
    ctx: DistContext
    rd: RunDirectory
    data: _Data
    model: torch.nn.Module
    info: dict
    precision: str
    handlers: list

    def run(self) -> _Fitted:
        if self.cfg.strategy.feature_cache:
            result, search, feats = self._head_on_features(main=True)
            # val/test from the cached features: no second pass
            return _Fitted(result, self.model.head(), feats["all"], feature_seconds=feats["seconds"])
        head = self._head_on_features(main=False) if self.cfg.strategy.head_first else None
        result = self._loop()
        if head is None:
            return _Fitted(result, self.model, self.data.prep.images)
        return _Fitted(result, self.model, self.data.prep.images, feature_seconds=head[2]["seconds"],
                       head_search={"C": head[1]["C"], "val_auc": head[1]["val_auc"]})

    def settings(self, n_train: int) -> FitSettings:
        cfg, data = self.cfg, self.data
        weights = data.class_weights(cfg.optim.class_weights)
        epochs = cfg.epochs_for(n_train, self.ctx.world)
        signature = {**cfg.training_signature(), "epochs": epochs, "n_train": n_train, "world": self.ctx.world,
                     "data_fingerprint": data_fingerprint(data.prep.manifest, data.prep.images)}
        return FitSettings(epochs=epochs, batch_size=cfg.optim.batch_size, weight_decay=cfg.optim.weight_decay,
                           warmup_epochs=cfg.optim.warmup_epochs, patience=cfg.patience_for(n_train, self.ctx.world),
                           average=cfg.optim.average, ema_epochs=cfg.optim.ema_epochs, select=cfg.optim.select,
                           class_weights=weights, precision=self.precision,
                           objective=objective(data.task, len(data.labels), weights),
                           seed=cfg.optim.seed, checkpoint=self.rd.checkpoint, resume=cfg.runtime.resume,
                           signature=signature, progress=cfg.optim.strategy, handlers=self.handlers)

    def _loop(self) -> FitResult:
        cfg, prep, m = self.cfg, self.data.prep, self.data.masks
        settings = self.settings(int(m["train"].sum()))
        settings.augment = Augment(cfg.optim.augment, seed=cfg.optim.seed * 1000 + self.ctx.rank,
                                   hflip=cfg.optim.hflip) or None
        o = cfg.optim
        groups = param_groups(self.model, cfg.strategy, cfg.resolved_lr, unfreeze=o.unfreeze,
                              backbone_lr_mult=o.backbone_lr_mult, layer_decay=o.layer_decay)
        if o.compile:
            self.model.net = torch.compile(self.model.net)
        result = fit(self.model, groups, prep.images[m["train"]], prep.y[m["train"]], prep.images[m["val"]],
                     prep.y[m["val"]], settings, self.ctx)
        if o.compile:
            self.model.net = self.model.net._orig_mod
        return result

    def _head_on_features(self, main: bool) -> tuple[FitResult, dict, dict]:
        """The head on the frozen source's cached features (standardised; the standardisation then folded into
        the head so it takes raw features): logistic regression with C chosen on validation, or the task's
        loss by AdamW (--head linear; ordinal tasks). ``main``: this is the run's fit (a linear probe: its
        checkpoint, handlers and progress); else the first stage of a strategy that fits its head first.
        -> (result, {C, val_auc}, features)."""
        cfg, m, y = self.cfg, self.data.masks, self.data.prep.y
        groups = head_groups(self.model, cfg.resolved_lr)  # freezes the backbone (BN eval) for the features
        feats = self._features()
        train_y = y[m["train"]].repeat(feats["views"], *([1] * (y.ndim - 1)))
        mu, sd, f_train, f_val = standardize(feats["train"], feats["val"])
        logistic = self.data.task != "ordinal" and (cfg.optim.head == "logistic" or not main)
        if main and cfg.optim.head == "logistic" and not logistic:
            log.info("linear-probe for an ordinal task: the CORN head is trained by its own loss (AdamW) on the "
                     "cached features, not by logistic regression")
        if logistic:
            result, search = self._logistic(f_train, train_y, f_val, y[m["val"]], main)
        else:
            settings = self.settings(len(f_train))
            settings.batch_size, settings.channels_last = max(cfg.optim.batch_size, 256), False
            if not main:
                settings.checkpoint, settings.handlers, settings.progress = None, [], None
            result = fit(self.model.head(), groups, f_train, train_y, f_val, y[m["val"]], settings,
                         DistContext(device=self.ctx.device))
            search = {"C": None, "val_auc": result.best_score}
        fold_standardization(self.model.head(), mu.to(self.ctx.device), sd.to(self.ctx.device))
        if not main:
            log.info("%s: head fitted on frozen features (validation AUC %.3f); fine-tuning from it",
                     cfg.optim.strategy, search["val_auc"])
        return result, search, feats

    def _logistic(self, f_train, y_train, f_val, y_val, main: bool) -> tuple[FitResult, dict]:
        """Logistic regression (one per finding for multilabel), C chosen on validation."""
        cfg, t0 = self.cfg, time.perf_counter()
        fit_head = fit_logistic_heads if self.data.task == "multilabel" else fit_logistic_head
        search = fit_head(self.model.head(), f_train, y_train, f_val, y_val, seed=cfg.optim.seed,
                          class_weight="balanced" if cfg.optim.class_weights == "balanced" else None)
        result = FitResult(history=[{"epoch": 1, "C": search["C"], "val_auc": search["val_auc"]}], best_epoch=1,
                           best_score=search["val_auc"], seconds=time.perf_counter() - t0, epochs=0)
        if main:
            views = cfg.evaluation.tta
            log.info("logistic head: C=%s chosen on validation (AUC %.3f on the unaugmented view%s)", search["C"],
                     search["val_auc"], f"; the run is evaluated on {views} test-time views" if views > 1 else "")
        return result, search

    def _features(self) -> dict:
        cfg, prep, m = self.cfg, self.data.prep, self.data.masks
        t0 = time.perf_counter()
        if cfg.strategy.feature_cache and cfg.optim.feature_augment == 0 and cfg.optim.augment != "none":
            log.info("linear-probe trains the head on cached features, without augmentation; --feature-augment K "
                     "adds K augmented views of the train set (each costs one more backbone pass over it)")
        cache = feature_cache_dir(cfg.data.cache_dir, cfg.data.no_cache)
        key = source_key_parts(self.data.spec, self.info, prep.size, prep.read, cfg.optim.seed)
        kw = dict(cache_dir=cache, precision=self.precision, device=self.ctx.device)
        all_feats, hit = extract_features(self.model, prep.images, key, **kw)
        log.info("features: %s (%d per image)", "from the cache" if hit else "extracted once", all_feats.shape[1])
        out = {"train": all_feats[m["train"]], "val": all_feats[m["val"]], "all": all_feats, "views": 1}
        if cfg.optim.feature_augment > 0:
            aug = Augment(cfg.optim.augment if cfg.optim.augment != "none" else "light", seed=cfg.optim.seed,
                          hflip=cfg.optim.hflip)
            views = [extract_features(self.model, prep.images[m["train"]],
                                      {**key, "augment": cfg.optim.augment, "view": k, "seed": cfg.optim.seed},
                                      augment=aug, **kw)[0] for k in range(cfg.optim.feature_augment)]
            out["train"], out["views"] = torch.cat([out["train"], *views]), 1 + len(views)
        out["seconds"] = time.perf_counter() - t0
        return out


# ---------------------------------------------------------------------------------------- finish
def _evaluate(cfg: TrainConfig, data: _Data, fitted: _Fitted) -> run_writer.Evaluated:
    """Calibrate and choose the threshold(s) on validation; evaluate val and test (run_writer.evaluate)."""
    prep, module = data.prep, fitted.module.cpu()
    parts = {s: prep.masks[s] for s in run_writer.SPLITS}
    logits = {s: predict_logits(module, fitted.inputs[mask].cpu()).numpy() for s, mask in parts.items()}
    targets = {s: prep.y[mask].numpy() for s, mask in parts.items()}
    groups = {s: prep.table.loc[mask.numpy(), "patient_id"].to_numpy() for s, mask in parts.items()} \
        if prep.manifest.has_patients else {}
    ev = run_writer.evaluate(data.task, data.labels, data.pos, logits, targets, groups,
                             calibrate=cfg.evaluation.calibrate, threshold=cfg.evaluation.threshold,
                             n_bootstrap=cfg.evaluation.bootstrap, seed=cfg.optim.seed,
                             conformal=cfg.evaluation.conformal)
    search = fitted.result.history[0] if cfg.strategy.feature_cache and "C" in fitted.result.history[0] else None
    if search is not None and cfg.evaluation.tta > 1:  # one number per view, both said
        log.info("validation AUC %s on %d test-time views (the reported one; C was chosen at %.3f on the unaugmented "
                 "view)", _num(ev.metrics["val"].get("auc")), cfg.evaluation.tta, search["val_auc"])
    return ev


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def build_record(cfg: TrainConfig, data: _Data, model, info: dict) -> ModelMeta:
    """model.json before calibration: what rebuilds the model and applies it exactly as training did."""
    spec, labels = data.spec, data.labels
    dims = cfg.model.spatial_dims
    return ModelMeta(arch=spec.arch.split(".")[0], source=spec.name, labels=labels, in_chans=info["in_chans"],
                     data_chans=model.data_chans, image_size=data.prep.size, mean=model.mean.flatten().tolist(),
                     std=model.std.flatten().tolist(), grey_mode=info["grey_mode"], read=data.prep.read.key(),
                     positive_label=labels[data.pos] if data.pos is not None else None, strategy=cfg.optim.strategy,
                     input=f"float32 (N, C, {', '.join(['S'] * dims)}) in [0, 1]; normalisation is inside the model",
                     tta=cfg.evaluation.tta, tta_hflip=_hflip(cfg), task=data.task, input_dtype=data.prep.input_dtype,
                     spatial_dims=dims, inflate=cfg.model.inflate if dims == 3 else None)


def _finish(cfg: TrainConfig, rd: RunDirectory, data: _Data, model, info: dict, fitted: _Fitted, t_start: float,
            world: int, cv_splits: bool) -> None:
    """Evaluate, and write every file of the run into the staging folder (run_writer.finish)."""
    ev = _evaluate(cfg, data, fitted)
    result = fitted.result
    metrics = {**ev.metrics, "train_seconds": round(result.seconds, 3),
               "train_images_per_s": round(result.images_per_second, 2),
               "total_seconds": round(time.perf_counter() - t_start, 3), "best_epoch": result.best_epoch,
               "patience": result.patience, "epochs_run": len(result.history), "temperature": ev.temperature,
               "threshold": ev.threshold, "seed": cfg.optim.seed, "strategy": cfg.optim.strategy,
               "source": data.spec.name, "processes": world}
    if fitted.feature_seconds is not None:
        metrics["feature_seconds"] = round(fitted.feature_seconds, 3)
    if fitted.head_search is not None:
        metrics["lp_head"] = fitted.head_search
    meta = build_record(cfg, data, model, info).replace(temperature=ev.temperature, threshold=ev.threshold,
                                                        conformal=ev.conformal, prior=ev.prior)
    split_df, tables = _tables(cfg, data)
    rows = {s: split_df[data.masks[s].numpy()][["split", "sample_id", "label", *split_df.columns[3:]]]
            for s in run_writer.SPLITS}
    resolved = _resolved(cfg, data, model, info, result, world, cv_splits)
    run_files = run_writer.RunFiles(config={**cfg.to_dict(), "resolved": resolved}, metrics=metrics,
                                    predictions=run_writer.predictions(rows, ev.probs, data.labels), split=split_df,
                                    history=pd.DataFrame(result.history), tables=tables,
                                    test_images=data.prep.images[data.masks["test"]])
    cols = list(cfg.evaluation.subgroups or ())
    subgroups = (lambda run: run_subgroups(run, data.prep.table[["sample_id", *cols]], columns=cols)) if cols else None
    run_writer.finish(rd, meta, model.state_dict(), run_files, test_images=data.prep.images[data.masks["test"]],
                      title=cfg.runtime.out, report=cfg.evaluation.report, subgroups=subgroups)


def _resolved(cfg: TrainConfig, data: _Data, model, info: dict, result: FitResult, world: int, cv_splits: bool) -> dict:
    spec, prep = data.spec, data.prep
    return {"source": {"name": spec.name, "arch": spec.arch, "weights": spec.weights,
                       "weights_sha256": info["weights_sha256"], "domain": spec.domain,
                       "unexpected_keys": info.get("unexpected_keys", [])},
            "input": {"data_channels": model.data_chans, "model_channels": info["in_chans"],
                      "grey_mode": info["grey_mode"], "mean": model.mean.flatten().tolist(),
                      "std": model.std.flatten().tolist()},
            "data": {"origin": prep.manifest.origin, "labels": prep.labels, "counts": prep.manifest.counts(),
                     "notes": prep.manifest.notes, "splits": "given by the caller (cv folds)" if cv_splits else None},
            "image_size": prep.size, "lr": cfg.resolved_lr, "epochs": result.epochs or None,
            "patience": result.patience or None, "processes": world, "torch": torch.__version__}


def _tables(cfg: TrainConfig, data: _Data) -> tuple[pd.DataFrame, dict]:
    """split.csv, and the optional tables: skipped samples, cross-split duplicates, --keep-paths' mapping."""
    prep, t = data.prep, data.prep.table
    split_cols = ["sample_id", "split", "label"] + (["patient_id"] if prep.manifest.has_patients else [])
    split_df = t[split_cols].assign(label=label_text(prep.manifest))
    tables = {}
    if prep.skipped:
        tables["skipped"] = pd.DataFrame([(s.sample_id, s.reason) for s in prep.skipped],
                                         columns=["sample_id", "reason"])
    if len(prep.duplicates):
        tables["duplicates"] = prep.duplicates
    if cfg.data.keep_paths:
        paths = list(zip(t["sample_id"], t["path"])) if "path" in t else []
        paths += [(s.sample_id, s.path) for s in prep.skipped]
        tables["paths"] = pd.DataFrame(paths, columns=["sample_id", "path"], dtype=object)
        log.warning("paths.csv maps sample ids to files: it can hold patient names; keep it with the data, do not "
                    "share it")
    return split_df, tables
