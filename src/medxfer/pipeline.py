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

from medxfer import files
from medxfer.config import TrainConfig
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
from medxfer.evaluation.tasks import choose_task_threshold, evaluate_task, fit_calibration, probabilities
from medxfer.evaluation.card import write_model_card
from medxfer.evaluation.report import write_report
from medxfer.evaluation.subgroups import run_subgroups, write_subgroups
from medxfer.models.adapt import build_model
from medxfer.models.catalog import SourceSpec, resolve_source, volume_defaults
from medxfer.runs import Run, RunDirectory, write_model_json
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


@dataclasses.dataclass
class _Job:
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
        self.spec: SourceSpec = resolve_source(cfg.model.source, cfg.model.weights, spatial_dims=cfg.model.spatial_dims)
        self.prep: Prepared = prepare_data(cfg.data, cfg.model.image_size, cfg.optim.seed, splits=self.splits,
                                           source=self.source, source_size=self.spec.input_size,
                                           spatial_dims=cfg.model.spatial_dims, batch_size=cfg.optim.batch_size,
                                           arch=self.spec.arch)
        self.size = self.prep.size  # --image-size, or chosen from the data (logged by prepare_data)
        for s, mask in self.prep.masks.items():
            if int(mask.sum()) == 0:
                raise MedxferError(f"the {s} split is empty. Give train, val and test samples, or let medxfer split.")
        self.task = resolve_task(cfg.data.task, self.prep.manifest)
        self.pos = positive_index(self.prep.labels, cfg.data.positive_label) if self.task == "binary" else None
        self._check_subgroups()
        seed_everything(cfg.optim.seed)
        outputs = len(self.prep.labels) - (1 if self.task == "ordinal" else 0)  # CORN: K-1 conditional logits
        if (self.prep.images.dim() == 5) != (cfg.model.spatial_dims == 3):
            raise MedxferError("--spatial-dims 3 needs volumes (an npz of (N,D,H,W) arrays, or NIfTI files); these "
                               "samples are 2-D images." if cfg.model.spatial_dims == 3 else
                               "these samples are volumes kept whole: train them with --spatial-dims 3.")
        self.model, self.info = build_model(self.spec, outputs, self.prep.images.shape[1],
                                            grey_mode=cfg.model.grey_mode, pretrained=cfg.strategy.pretrained,
                                            spatial_dims=cfg.model.spatial_dims, inflate=cfg.model.inflate)
        if ctx.is_main:  # weights, best weights, two optimiser moments, the exported copies
            self.rd.check_space(6 * sum(p.numel() * p.element_size() for p in self.model.parameters())
                                + self.rd.MIN_FREE)
        self.precision = resolve_precision(cfg.optim.precision, ctx.device)
        log.info("%s from %s: %d train / %d val / %d test images at %d px; task %s (%d %s)%s", cfg.optim.strategy,
                 self.spec.name, *(int(m.sum()) for m in self.prep.masks.values()), self.size, self.task,
                 len(self.prep.labels), "findings" if self.task == "multilabel" else "classes", self._order())
        result, eval_module, eval_inputs = self._fit_head() if cfg.strategy.feature_cache else self._fit_loop()
        self.model.cpu().eval()
        if cfg.evaluation.tta > 1:  # the views are images: evaluate the whole model on them (features cannot)
            eval_module, eval_inputs = TTA(self.model, cfg.evaluation.tta, hflip=self.hflip), self.prep.images
        if not ctx.is_main:
            return None
        self._finish(result, eval_module, eval_inputs, t_start)
        self.rd.commit()  # OUT becomes the new complete run in one step; the checkpoint goes with the staging folder
        return Run.load(cfg.runtime.out)

    def _order(self) -> str:
        """What the labels mean for the decision: the positive class (binary) or the grades' order (ordinal)."""
        labels = self.prep.labels
        if self.task == "binary" and self.pos is not None:
            return f"; positive class '{labels[self.pos]}' (sensitivity and the threshold refer to it)"
        if self.task == "ordinal":
            return "; grades in the order " + " < ".join(labels)
        return ""

    @property
    def hflip(self) -> bool:
        """Whether mirrored images are allowed (TTA views): --hflip, else the augmentation preset's rule."""
        return bool(self.cfg.optim.hflip if self.cfg.optim.hflip is not None else get_preset(self.cfg.optim.augment).hflip)

    def _class_weights(self) -> torch.Tensor | None:
        """--class-weights balanced: inverse class frequency (single label) or negatives/positives per finding
        (multilabel, BCE's pos_weight); ordinal grades are not reweighted."""
        y, k = self.prep.y[self.prep.masks["train"]], len(self.prep.labels)
        if self.cfg.optim.class_weights != "balanced" or self.task == "ordinal":
            return None
        if self.task == "multilabel":
            pos = y.sum(0)
            return (len(y) - pos) / pos.clamp(min=1)
        counts = torch.bincount(y, minlength=k).float()
        return counts.sum() / (k * counts.clamp(min=1))

    def _settings(self, n_train: int) -> FitSettings:
        cfg = self.cfg
        weights = self._class_weights()
        epochs = cfg.epochs_for(n_train, self.ctx.world)
        signature = {**cfg.training_signature(), "epochs": epochs, "n_train": n_train, "world": self.ctx.world,
                     "data_fingerprint": data_fingerprint(self.prep.manifest, self.prep.images)}
        return FitSettings(epochs=epochs, batch_size=cfg.optim.batch_size, weight_decay=cfg.optim.weight_decay,
                           warmup_epochs=cfg.optim.warmup_epochs, patience=cfg.patience_for(n_train, self.ctx.world),
                           average=cfg.optim.average, ema_epochs=cfg.optim.ema_epochs, select=cfg.optim.select,
                           class_weights=weights, precision=self.precision,
                           objective=objective(self.task, len(self.prep.labels), weights),
                           seed=cfg.optim.seed, checkpoint=self.rd.checkpoint, resume=cfg.runtime.resume,
                           signature=signature, progress=cfg.optim.strategy, handlers=self.handlers)

    def _groups(self) -> list[dict]:
        o = self.cfg.optim
        return param_groups(self.model, self.cfg.strategy, self.cfg.resolved_lr, unfreeze=o.unfreeze,
                            backbone_lr_mult=o.backbone_lr_mult, layer_decay=o.layer_decay)

    def _augment(self, seed: int) -> Augment | None:
        return Augment(self.cfg.optim.augment, seed=seed, hflip=self.cfg.optim.hflip) or None

    def _fit_loop(self) -> tuple[FitResult, torch.nn.Module, torch.Tensor]:
        cfg, prep, m = self.cfg, self.prep, self.prep.masks
        if cfg.strategy.head_first:
            self._linear_probe_head()
        settings = self._settings(int(m["train"].sum()))
        settings.augment = self._augment(cfg.optim.seed * 1000 + self.ctx.rank)
        groups = self._groups()
        if cfg.optim.compile:
            self.model.net = torch.compile(self.model.net)
        result = fit(self.model, groups, prep.images[m["train"]], prep.y[m["train"]], prep.images[m["val"]],
                     prep.y[m["val"]], settings, self.ctx)
        if cfg.optim.compile:
            self.model.net = self.model.net._orig_mod
        return result, self.model, prep.images

    def _linear_probe_head(self) -> None:
        """LP-FT's first stage: the head fitted (logistic regression, C on validation) on the frozen source's
        cached features, folded to take raw features; fine-tuning then starts from it."""
        cfg, m, y = self.cfg, self.prep.masks, self.prep.y
        head_groups(self.model, self.cfg.resolved_lr)  # freezes the backbone (BN eval) for features
        feats = self._features()
        mu, sd, f_train, f_val = standardize(feats["train"], feats["val"])
        if self.task in ("binary", "multiclass", "multilabel"):
            fit_head = fit_logistic_heads if self.task == "multilabel" else fit_logistic_head
            search = fit_head(self.model.head(), f_train, y[m["train"]], f_val, y[m["val"]], seed=cfg.optim.seed,
                              class_weight="balanced" if cfg.optim.class_weights == "balanced" else None)
        else:  # CORN: the head trained by the task's loss on the cached features
            result = self._train_head(f_train, y[m["train"]], f_val, y[m["val"]], progress=None)
            search = {"C": None, "val_auc": result.best_score}
        fold_standardization(self.model.head(), mu.to(self.ctx.device), sd.to(self.ctx.device))
        self.feature_seconds, self.lp_search = feats["seconds"], search
        log.info("LP-FT: head fitted on frozen features (validation AUC %.3f); fine-tuning everything from it",
                 search["val_auc"])

    def _train_head(self, f_train, y_train, f_val, y_val, progress: str | None = "head") -> FitResult:
        """The head alone on cached features, by AdamW and the task's loss."""
        settings = self._settings(len(f_train))
        settings.batch_size, settings.channels_last, settings.progress = max(self.cfg.optim.batch_size, 256), False, \
            progress
        settings.checkpoint, settings.handlers = None, []
        return fit(self.model.head(), head_groups(self.model, self.cfg.resolved_lr), f_train,
                   y_train, f_val, y_val, settings, DistContext(device=self.ctx.device))

    def _fit_head(self) -> tuple[FitResult, torch.nn.Module, torch.Tensor]:
        """Frozen backbone: features extracted once (cached), the head trained on them."""
        cfg, m, y = self.cfg, self.prep.masks, self.prep.y
        groups = self._groups()
        feats = self._features()
        if cfg.optim.feature_augment == 0 and cfg.optim.augment != "none":
            log.info("linear-probe trains the head on cached features, without augmentation; --feature-augment K "
                     "adds K augmented views of the train set (each costs one more backbone pass over it)")
        train_y = y[m["train"]].repeat(feats["views"], *([1] * (y.ndim - 1)))
        mu, sd, f_train, f_val = standardize(feats["train"], feats["val"])
        if cfg.optim.head == "logistic" and self.task == "ordinal":
            log.info("linear-probe for an ordinal task: the CORN head is trained by its own loss (AdamW) on the "
                     "cached features, not by logistic regression")
        if cfg.optim.head == "logistic" and self.task != "ordinal":
            t0 = time.perf_counter()
            fit_head = fit_logistic_heads if self.task == "multilabel" else fit_logistic_head  # one per finding
            search = fit_head(self.model.head(), f_train, train_y, f_val, y[m["val"]], seed=cfg.optim.seed,
                              class_weight="balanced" if cfg.optim.class_weights == "balanced" else None)
            result = FitResult(history=[{"epoch": 1, "C": search["C"], "val_auc": search["val_auc"]}], best_epoch=1,
                               best_score=search["val_auc"], seconds=time.perf_counter() - t0, epochs=0)
            log.info("logistic head: C=%s chosen on validation (AUC %.3f)", search["C"], search["val_auc"])
        else:
            settings = self._settings(len(f_train))
            settings.batch_size, settings.channels_last = max(cfg.optim.batch_size, 256), False
            result = fit(self.model.head(), groups, f_train, train_y, f_val, y[m["val"]], settings,
                         DistContext(device=self.ctx.device))
        fold_standardization(self.model.head(), mu.to(self.ctx.device), sd.to(self.ctx.device))
        self.feature_seconds = feats["seconds"]
        return result, self.model.head(), feats["all"]  # val/test from the cached features: no second pass

    def _features(self) -> dict:
        cfg, prep, m = self.cfg, self.prep, self.prep.masks
        t0 = time.perf_counter()
        cache = feature_cache_dir(cfg.data.cache_dir, cfg.data.no_cache)
        key = source_key_parts(self.spec, self.info, self.size, prep.read, cfg.optim.seed)
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

    # -------------------------------------------------------------------------------------- finish
    def _evaluate(self, module: torch.nn.Module, inputs: torch.Tensor) -> tuple[dict, dict, object, object]:
        """Calibrate and choose the threshold(s) on validation; evaluate val and test."""
        cfg, prep, labels, pos, task = self.cfg, self.prep, self.prep.labels, self.pos, self.task
        module.cpu()
        parts = {s: prep.masks[s] for s in ("val", "test")}
        logits = {s: predict_logits(module, inputs[mask].cpu()).numpy() for s, mask in parts.items()}
        ys = {s: prep.y[mask].numpy() for s, mask in parts.items()}
        temperature = fit_calibration(task, logits["val"], ys["val"]) if cfg.evaluation.calibrate == "temperature" \
            else 1.0
        probs = {s: probabilities(task, logits[s], temperature) for s in logits}
        threshold = choose_task_threshold(task, ys["val"], probs["val"], cfg.evaluation.threshold, pos)
        t = prep.table
        groups = {s: (t.loc[mask.numpy(), "patient_id"].to_numpy() if prep.manifest.has_patients else None)
                  for s, mask in parts.items()}
        metrics = {s: evaluate_task(task, ys[s], probs[s], labels, positive=pos, threshold=threshold,
                                    groups=groups[s], n_bootstrap=cfg.evaluation.bootstrap if s == "test" else 0,
                                    seed=cfg.optim.seed)
                   for s in logits}
        metrics["task"] = task
        return metrics, probs, temperature, threshold

    def _finish(self, result: FitResult, module, inputs, t_start: float) -> None:
        """Evaluate and write every file of the run into the staging folder."""
        cfg, spec, model, info, prep = self.cfg, self.spec, self.model, self.info, self.prep
        metrics, probs, temperature, threshold = self._evaluate(module, inputs)
        metrics.update({"train_seconds": round(result.seconds, 3),
                        "train_images_per_s": round(result.images_per_second, 2),
                        "total_seconds": round(time.perf_counter() - t_start, 3), "best_epoch": result.best_epoch,
                        "patience": result.patience, "epochs_run": len(result.history), "temperature": temperature,
                        "threshold": threshold, "seed": cfg.optim.seed, "strategy": cfg.optim.strategy,
                        "source": spec.name, "processes": self.ctx.world})
        if hasattr(self, "feature_seconds"):
            metrics["feature_seconds"] = round(self.feature_seconds, 3)
        if hasattr(self, "lp_search"):
            metrics["lp_head"] = {"C": self.lp_search["C"], "val_auc": self.lp_search["val_auc"]}
        out, labels = self.rd.staging, prep.labels
        meta = {"arch": spec.arch.split(".")[0], "source": spec.name, "labels": labels, "in_chans": info["in_chans"],
                "data_chans": model.data_chans, "image_size": self.size, "mean": model.mean.flatten().tolist(),
                "std": model.std.flatten().tolist(), "grey_mode": info["grey_mode"], "read": prep.read.key(),
                "temperature": temperature, "threshold": threshold,
                "positive_label": labels[self.pos] if self.pos is not None else None, "strategy": cfg.optim.strategy,
                "input": f"float32 (N, C, {', '.join(['S'] * cfg.model.spatial_dims)}) in [0, 1]; normalisation is "
                         "inside the model",
                "tta": cfg.evaluation.tta, "tta_hflip": self.hflip, "task": self.task,
                "input_dtype": prep.input_dtype,
                "spatial_dims": cfg.model.spatial_dims, "inflate": cfg.model.inflate if cfg.model.spatial_dims == 3
                else None}
        meta["weights_sha256"] = files.write_weights(out / "model.safetensors", model.state_dict())
        write_model_json(out / "model.json", meta)
        files.write_yaml(out / "config.yaml", {**cfg.to_dict(), "resolved": self._resolved(result, meta)})
        files.write_json(out / "metrics.json", metrics)
        files.write_csv(out / "history.csv", pd.DataFrame(result.history))
        self._write_tables(out, probs)
        self.rd.seal()  # the card and report read the run back, checked like any run
        if cfg.evaluation.subgroups:
            cols = list(cfg.evaluation.subgroups)
            write_subgroups(run := Run.load(out), run_subgroups(run, prep.table[["sample_id", *cols]], columns=cols))
            self.rd.seal()
        try:
            write_model_card(Run.load(out))
        except Exception as e:  # noqa: BLE001 - the run is written; a failed card must not lose it
            log.warning("model card not written (%s: %s); retry with 'medxfer report %s'", type(e).__name__, e,
                        cfg.runtime.out)
        if cfg.evaluation.report:
            try:
                write_report(Run.load(out), test_images=prep.images[prep.masks["test"]], title=cfg.runtime.out)
            except Exception as e:  # noqa: BLE001 - the run is written; a failed report must not lose it
                log.warning("report not written (%s: %s); retry with 'medxfer report %s'", type(e).__name__, e,
                            cfg.runtime.out)

    def _check_subgroups(self) -> None:
        cols = list(self.cfg.evaluation.subgroups or ())
        if not cols:
            return
        if self.task != "binary":
            raise MedxferError(f"--subgroups is for two-class tasks; this one is {self.task} "
                               f"({len(self.prep.labels)} {'findings' if self.task == 'multilabel' else 'classes'}).")
        have = [c for c in self.prep.table.columns if c not in ("sample_id", "label", "split", "path", "row")]
        missing = [c for c in cols if c not in self.prep.table.columns or c in ("sample_id", "path", "row")]
        if missing:
            raise MedxferError(f"--subgroups: the data has no column '{missing[0]}'. Columns it has: "
                               f"{', '.join(have) or 'none besides path and label'} (a CSV/Parquet manifest's extra "
                               "columns).")

    def _resolved(self, result: FitResult, meta: dict) -> dict:
        spec, info, prep, cfg = self.spec, self.info, self.prep, self.cfg
        return {"source": {"name": spec.name, "arch": spec.arch, "weights": spec.weights,
                           "weights_sha256": info["weights_sha256"], "domain": spec.domain,
                           "unexpected_keys": info.get("unexpected_keys", [])},
                "input": {"data_channels": self.model.data_chans, "model_channels": info["in_chans"],
                          "grey_mode": info["grey_mode"], "mean": meta["mean"], "std": meta["std"]},
                "data": {"origin": prep.manifest.origin, "labels": prep.labels, "counts": prep.manifest.counts(),
                         "notes": prep.manifest.notes, "splits": "given by the caller (cv folds)" if self.splits
                         is not None else None},
                "image_size": self.size, "lr": cfg.resolved_lr, "epochs": result.epochs or None,
                "patience": result.patience or None,
                "processes": self.ctx.world, "torch": torch.__version__}

    def _write_tables(self, out: Path, probs: dict) -> None:
        prep, labels, t = self.prep, self.prep.labels, self.prep.table
        split_cols = ["sample_id", "split", "label"] + (["patient_id"] if prep.manifest.has_patients else [])
        split_df = t[split_cols].assign(label=label_text(prep.manifest))
        files.write_csv(out / "split.csv", split_df)
        rows = []
        for s in ("val", "test"):
            sub = split_df[prep.masks[s].numpy()].reset_index(drop=True)
            df = pd.DataFrame(probs[s], columns=[f"prob_{c}" for c in labels])
            rows.append(pd.concat([sub[["split", "sample_id", "label"] + split_cols[3:]], df], axis=1))
        files.write_csv(out / "predictions.csv", pd.concat(rows, ignore_index=True))
        if prep.skipped:
            files.write_csv(out / "skipped.csv", pd.DataFrame([(s.sample_id, s.reason) for s in prep.skipped],
                                                              columns=["sample_id", "reason"]))
        if len(prep.duplicates):
            files.write_csv(out / "duplicates.csv", prep.duplicates)
        if self.cfg.data.keep_paths:
            paths = list(zip(t["sample_id"], t["path"])) if "path" in t else []
            paths += [(s.sample_id, s.path) for s in prep.skipped]
            files.write_csv(out / "paths.csv", pd.DataFrame(paths, columns=["sample_id", "path"], dtype=object))
            log.warning("paths.csv maps sample ids to files: it can hold patient names; keep it with the data, do not "
                        "share it")
