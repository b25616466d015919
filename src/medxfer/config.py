"""Run configuration: every option declared once, as a field of a frozen dataclass, with its type,
default, help and allowed values. The command line (train, cv, compare, pretrain, features) is
generated from these fields; config.yaml is their nested dict.

Usage::

    cfg = TrainConfig.create(data="data/breastmnist_28.npz", strategy="full", epochs=10)   # flat names
    cfg.optim.lr, cfg.data.path, cfg.model.source
    cfg = cfg.replace(seed=2, out="runs/b")                    # flat names again
    cfg = TrainConfig.load("runs/b/config.yaml")               # nested or flat; unknown keys -> did you mean

Flat names are the command-line names without dashes (``--label-names`` -> ``label_names``;
``--data`` -> ``data``); each belongs to one group: data, model, optim, evaluation, runtime.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from medxfer.data.intensity import parse_frame, parse_intensity, parse_slice, parse_window
from medxfer.data.presets import PRESETS
from medxfer.errors import MedxferError, did_you_mean
from medxfer.strategies import MIN_PATIENCE_STEPS, SELECT, get_strategy, help_text
from medxfer.strategies import NAMES as STRATEGY_NAMES

#: --tta when not given, for 2-D models: 4 views lowered the validation log-loss of the best recipe so far on
#: BreastMNIST (3 seeds, 0.2358 -> 0.2317) and PneumoniaMNIST (0.0740 -> 0.0632) in bench/ablation.py
DEFAULT_TTA_2D = 4

#: the augmentation presets, as medxfer.data.presets defines them (plain data: the options stay free of torch)
AUGMENT_PRESETS = tuple(PRESETS)
#: --augment auto: xray for grey 2-D images (the training job resolves it from the data and records the preset);
#: over light it lowered the validation log-loss on BreastMNIST (3 seeds, 0.268 -> 0.240) and PneumoniaMNIST
#: (0.089 -> 0.074), the two grey sets at hand; light for colour images and volumes, where it was not measured
AUGMENT_CHOICES = ("auto", *AUGMENT_PRESETS)


AUTO_PRESETS = ("xray", "light")  # what auto_augment can give


def auto_augment(channels: int, spatial_dims: int) -> str:
    """The preset --augment auto stands for: xray for grey (1-channel) 2-D images, light otherwise."""
    return "xray" if channels == 1 and spatial_dims == 2 else "light"


def option(default, help: str, *, flag: str | None = None, choices=None, show: str | None = None,
           low=None, high=None, low_open: bool = False, hidden: bool = False, factory=None):
    """A field of an options dataclass: its default and what ``--help`` says about it.

    ``flag``: the command-line name (default ``--field-name``); ``choices``: allowed values (a
    ``Literal`` annotation gives them too); ``show``: how ``--help`` shows a default of None (``"the
    source's"``); ``low``/``high``: bounds, inclusive unless ``low_open``; ``hidden``: not on the command
    line (set by the program, e.g. the number of processes under torchrun).
    """
    meta = dict(help=help, flag=flag, choices=choices, show=show, low=low, high=high, low_open=low_open,
                hidden=hidden)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class Options:
    """Shared behaviour of the option groups: type and range checks on construction."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            meta, flag = f.metadata, cli_name(f)
            if value is None:
                continue
            choices = meta.get("choices") or _literal(hints[f.name])
            typed = [c for c in (choices or ()) if not isinstance(c, str) and str(c) == str(value).strip()]
            if value not in (choices or ()) and typed:  # the command line gives text: '3' for the choice 3
                value = typed[0]
                object.__setattr__(self, f.name, value)
            if choices and value not in choices:
                raise MedxferError(f"The '{flag[2:]}' parameter must be one of {list(choices)}. Got {value!r} instead."
                                   f"{did_you_mean(str(value), [str(c) for c in choices])}")
            low, high = meta.get("low"), meta.get("high")
            if low is not None and (value < low or (meta.get("low_open") and value == low)):
                bound = f"above {low}" if meta.get("low_open") else f"at least {low}"
                raise MedxferError(f"The '{flag[2:]}' parameter must be {bound}"
                                   + (f" and at most {high}" if high is not None else "") + f". Got {value} instead.")
            if high is not None and value > high:
                raise MedxferError(f"The '{flag[2:]}' parameter must be at most {high}. Got {value} instead.")


def _literal(hint) -> tuple | None:
    for arg in (hint, *typing.get_args(hint)):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return None


def cli_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def flat_name(f: dataclasses.Field) -> str:
    return cli_name(f)[2:].replace("-", "_")


# --------------------------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class DataOptions(Options):
    """Data: where the images and labels are, how they are split and read."""

    path: str | None = option(None, "Images: a MedMNIST-style .npz, a folder of class folders (optionally under "
                              "train/val/test), a CSV/Parquet manifest (path,label[,patient_id,split]) or a DICOM "
                              "folder (with --labels).", flag="--data")
    labels: str | None = option(None, "Labels CSV for a DICOM folder, keyed by path, SOPInstanceUID, PatientID or "
                                "StudyInstanceUID (optional split, patient_id columns).")
    label_names: tuple[str, ...] | None = option(None, "Comma-separated class names in label-index order "
                                                 "(e.g. malignant,benign).", show="the labels as found")
    positive_label: str | None = option(None, "Two-class tasks: the positive class (sensitivity, threshold).",
                                        show="the second class")
    task: Literal["auto", "binary", "multiclass", "multilabel", "ordinal"] = option(
        "auto", "What the labels are: auto (multilabel when samples carry several findings, else binary or "
        "multiclass by the number of classes), or say so; ordinal: ordered grades (the order of --label-names), "
        "an ordinal (CORN) head.")
    label_columns: tuple[str, ...] | None = option(None, "Multi-label CSV/Parquet: the 0/1 columns, one per finding "
                                                   "(e.g. Effusion,Edema).", show="with --task multilabel: every "
                                                   "column but path, patient_id and split")
    no_finding: str | None = option(None, "Multi-label '|' label column: the value that means no finding (e.g. "
                                    "'No Finding').", show="none")
    split_by: str = option("auto", "Keep each group's images in one split: auto (patient_id when present), none, "
                           "or a manifest COLUMN.")
    split_seed: int | None = option(None, "Seed of the stratified 70/15/15 split medxfer makes when the data has "
                                    "none (compare: one split for every run).", show="--seed; compare: 0", low=0)
    duplicates: Literal["drop-from-train", "refuse", "allow"] = option(
        "drop-from-train", "Identical images in two splits: drop the copies from train (and from val when the copy "
        "is in test), refuse, or allow (warns). Listed in duplicates.csv.")
    on_bad_file: Literal["error", "skip"] = option("error", "An unreadable sample: stop naming it, or skip it and "
                                                   "list it in skipped.csv (predict: OUT_skipped.csv).")
    workers: int | None = option(None, "Processes that decode image files into the decoded store on disk (the "
                                 "output does not depend on it).", show="the usable cores", low=1)
    on_unlabelled: Literal["error", "skip"] = option("error", "DICOM folder: files that --labels does not label: "
                                                     "stop, or skip them.")
    label_fraction: float = option(1.0, "Train on this stratified fraction of the train labels (val and test "
                                   "untouched).", low=0.0, high=1.0, low_open=True)
    keep_paths: bool = option(False, "Write paths.csv mapping sample ids to files (predict: OUT_paths.csv; "
                              "explain: OUT/paths.csv). File names can hold patient names: keep it private.")
    window: str = option("auto", "Intensity window: auto (DICOM VOI LUT / window, else --intensity), none, C,W, "
                         "or lung | soft-tissue | bone | brain | mediastinum (CT, in HU).")
    frame: str = option("middle", "Multi-frame DICOM, multi-page TIFF, 4-D NIfTI: middle or an index.")
    slice: str = option("middle", "Volumes as 2-D: middle | 'index N' | mip | orthogonal (three mid-planes as "
                        "channels).")
    intensity: str = option("auto", "Scaling per image when no window applies: auto (uint8 / 255, else min-max), "
                            "minmax, or percentiles pA-pB such as p0.5-p99.5.")
    cache_dir: str | None = option(None, "Folder of the decode and feature caches.",
                                   show="$MEDXFER_CACHE_DIR or ~/.cache/medxfer")
    no_cache: bool = option(False, "Do not cache decoded images and features on disk.")

    def __post_init__(self):
        super().__post_init__()
        if self.label_names is not None:
            names = [str(n).strip() for n in self.label_names]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup or len(names) < 2 or not all(names):
                raise MedxferError("The 'label-names' parameter must be at least two distinct, non-empty names. Got "
                                   f"{','.join(map(str, self.label_names))!r} instead"
                                   + (f" ('{dup[0]}' twice)." if dup else "."))
        parse_window(self.window), parse_frame(self.frame), parse_slice(self.slice), parse_intensity(self.intensity)

    def read_key(self) -> dict:
        """The reader options (window, frame, slice, intensity) as stored in model.json."""
        return {"window": self.window, "frame": self.frame, "slice": self.slice, "intensity": self.intensity}


@dataclass(frozen=True)
class ModelOptions(Options):
    """The source model and the target's input."""

    source: str = option("auto", "Source model: a name from 'medxfer sources', a timm architecture (with "
                         "--weights), or a directory made by 'medxfer pretrain'. auto: efficientnet_lite0.in1k for "
                         "images; for volumes (--spatial-dims 3) a small ResNet (timm test_resnet) from scratch "
                         "(--strategy full or scratch; chosen on validation, README: 3-D volumes), or for a strategy "
                         "that keeps source weights the shipped test_resnet.pneumoniamnist, inflated.")
    weights: str | None = option(None, "Weights for a timm architecture: a FILE (.safetensors/.pth, read without "
                                 "running code), hub (online) or none (random init).", show="the source's own")
    image_size: int | None = option(None, "Input size in pixels (images are resized to it).",
                                    show="from the data: twice the native side, 64 to the source's size; volumes "
                                         "their native grid", low=8, high=2048)
    grey_mode: Literal["sum", "replicate"] = option("sum", "Grey images into an RGB source: sum the stem's RGB "
                                                    "weights into one channel, or replicate grey to 3 channels.")
    spatial_dims: int = option(2, "3: a true 3-D model for volumes (npz (N,D,H,W), NIfTI), resized to SxSxS with "
                               "--image-size S; the 2-D source is inflated to 3-D (--inflate). 2: volumes become 2-D "
                               "by --slice.", choices=(2, 3))
    inflate: Literal["i3d", "acs"] = option("i3d", "--spatial-dims 3: how 2-D kernels become 3-D: i3d (each kernel "
                                            "repeated over depth, divided by depth) or acs (axial/coronal/sagittal "
                                            "2-D kernels).")


@dataclass(frozen=True)
class OptimOptions(Options):
    """How the target model is trained."""

    strategy: str = option("full", "What trains. " + help_text() + ".", choices=STRATEGY_NAMES)
    unfreeze: int = option(1, "partial: how many of the last stages train.", low=1)
    epochs: int | None = option(None, "Maximum epochs (early stopping may end sooner).",
                                show="the strategy's, raised on small data to at least 600 steps (1200 scratch), "
                                     "at most 60", low=1)
    batch_size: int = option(64, "Images per optimiser step (per process under DDP); predict: per model call.",
                             low=1)
    lr: float | None = option(None, "Learning rate of the new head.", show="the strategy's: 1e-2 full, 1e-3 "
                              "partial and linear-probe, 2e-3 scratch", low=0.0, low_open=True)
    backbone_lr_mult: float = option(0.1, "full/partial: backbone learning rate = lr x this.", low=0.0,
                                     low_open=True)
    layer_decay: float | None = option(None, "full: layer-wise learning-rate decay instead of --backbone-lr-mult "
                                       "(each stage deeper x D).", low=0.0, high=1.0, low_open=True)
    weight_decay: float = option(0.05, "AdamW weight decay (never on biases and norm weights).", low=0.0)
    warmup_epochs: float = option(1.0, "Linear learning-rate warm-up, then cosine decay.", low=0.0)
    patience: int = option(10, "Early stopping: epochs without a better validation measure (--select; at least 60 "
                           "steps).", low=1)
    select: str = option(
        "calibrated-loss", "The best epoch (kept, and early stopping's measure): lowest validation NLL after the best "
        "temperature (calibrated-loss, the default: the run applies temperature scaling anyway, and an over-confident "
        "later epoch no longer loses to an early one that ranks worse); lowest raw validation NLL (loss); or highest "
        "validation AUC, which saturates on easy sets (PneumoniaMNIST 0.99+) and cannot rank epochs there. "
        "calibrated-loss lowered the validation log-loss against loss on BreastMNIST (6 seeds) and tied on "
        "PneumoniaMNIST.", choices=SELECT)
    average: Literal["none", "ema", "swa"] = option("none", "Weight averaging: an exponential moving average "
                                                    "(validated and saved), or SWA over the last quarter of the "
                                                    "epochs (saved; BatchNorm statistics recomputed).")
    ema_epochs: float = option(1.0, "--average ema: the average's horizon, in epochs.", low=0.0)
    class_weights: Literal["none", "balanced"] = option("none", "Weight the loss by inverse class frequency.")
    augment: str = option("auto", "Augmentation preset on the training batches: medical presets per modality "
                          "(geometry, gamma/contrast, MedMNIST-C-style noise, blur, JPEG, pixelate); no flips unless "
                          "the preset or --hflip allows them. auto: xray for grey 2-D images (it lowered the "
                          "validation log-loss over light on both grey sets measured), light otherwise.",
                          choices=AUGMENT_CHOICES)
    hflip: bool | None = option(None, "Allow horizontal flips (augmentation and TTA): only where left and right do "
                                "not matter.", show="the preset's")
    head: Literal["logistic", "linear"] = option("logistic", "linear-probe: scikit-learn logistic regression with C "
                                                 "chosen on validation, or an AdamW-trained linear head.")
    feature_augment: int = option(0, "linear-probe: also cache K augmented views of the train set (each costs one "
                                  "backbone pass over it).", low=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = option("auto", "Mixed precision (auto: bf16 on GPUs that "
                                                                "have it, else fp32).")
    compile: bool = option(False, "torch.compile the network.")
    seed: int = option(0, "Seed of the training (and of the split, unless --split-seed).", low=0)

    #: the options that say how the engine trains (medxfer.engine.trainer.FitSettings declares no defaults of its own)
    FIT = ("batch_size", "weight_decay", "warmup_epochs", "patience", "precision", "seed", "average", "ema_epochs",
           "select")

    def fit_settings(self, epochs: int, **engine):
        """The engine's ``FitSettings`` with these options' values (so their defaults are the ones declared
        here); ``engine``: its own fields (class weights, checkpoint, handlers...) and any value to override
        (a run's ``patience_for``, its resolved precision)."""
        from medxfer.engine.trainer import FitSettings

        return FitSettings(epochs=epochs, **{**{name: getattr(self, name) for name in self.FIT}, **engine})


@dataclass(frozen=True)
class EvalOptions(Options):
    """How the model is calibrated, thresholded and evaluated."""

    threshold: str = option("youden", "Operating point chosen on validation: youden | sensitivity=S | "
                            "specificity=S | a number in (0, 1).")
    calibrate: Literal["temperature", "none"] = option("temperature", "Temperature scaling fitted on validation.")
    bootstrap: int = option(2000, "Bootstrap resamples for the test CIs (patients resampled when known; 0: none).",
                            low=0)
    tta: int | None = option(None, "Test-time augmentation: average the logits over N fixed views (identity, zoom, "
                             "shifts; mirrored too with --hflip) in evaluation, predict, report, serve and the "
                             "exported model; 1: none.", show="4 for 2-D models, 1 for 3-D", low=1, high=12)
    conformal: float = option(0.1, "Conformal prediction sets: calibrated per class on validation so that a set "
                              "holds the true class with probability >= 1 - ALPHA (per class, for images like the "
                              "validation ones); 0: none.", low=0.0, high=0.5)
    report: bool = option(True, "Write report.html (plots, Grad-CAM gallery) at the end.")
    subgroups: tuple[str, ...] | None = option(None, "Comma-separated manifest columns (e.g. sex,age_band,site): "
                                               "AUC, sensitivity and specificity with CIs per group, flagged where "
                                               "a group's CI excludes the overall value.", show="none")

    def __post_init__(self):
        super().__post_init__()
        parse_threshold_rule(self.threshold)


@dataclass(frozen=True)
class RuntimeOptions(Options):
    """Where the run goes and how it runs."""

    out: str = option("runs/run", "Run directory to write (written as OUT.partial, then moved into place).")
    overwrite: bool = option(False, "Replace a finished run in --out (only once the new one is complete).")
    resume: bool = option(False, "Continue an interrupted run from OUT.partial/checkpoint.pt (same options and "
                          "data).")
    devices: int = option(1, "Processes to launch with torchrun (DDP: one per GPU, or CPU processes).", low=1)
    num_threads: int | None = option(None, "CPU threads for PyTorch.", show="PyTorch's", low=1)
    track: str | None = option(None, "Log the run to an experiment tracker: options, each epoch, final metrics with "
                               "CIs, report, model and ONNX (needs pip install 'medxfer[track]').", choices=("mlflow",),
                               show="off")
    tracking_uri: str | None = option(None, "Where --track logs: a folder, sqlite:///FILE or http://SERVER.",
                                      show="$MLFLOW_TRACKING_URI or ./mlruns")
    experiment: str = option("medxfer", "The tracker's experiment that holds the run.")


#: names of earlier versions -> today's
RENAMED = {"labels_csv": "labels"}
#: keys of earlier config.yaml files that today's runs record under 'resolved' (or no longer use)
LEGACY = {"epochs_max", "extra", "split_file", "allow_duplicates"}


# --------------------------------------------------------------------------------------------- configs
class Config:
    """A frozen dataclass of option groups (``GROUPS``: attribute -> options class), addressed by flat names."""

    GROUPS: typing.ClassVar[dict[str, type]] = {}

    @classmethod
    def flat_names(cls) -> dict[str, tuple[str, str]]:
        """flat name -> (group, field name)."""
        return {flat_name(f): (g, f.name) for g, opts in cls.GROUPS.items() for f in dataclasses.fields(opts)}

    @classmethod
    def create(cls, **flat):
        """A config from flat names (``data=``, ``strategy=``, ``lr=``...); the rest default."""
        return cls().replace(**flat)

    def replace(self, **flat):
        """A copy with the given flat names changed (each routed to its group)."""
        names, per_group = self.flat_names(), {}
        for key, value in flat.items():
            key = RENAMED.get(key, key)
            if key not in names:
                raise MedxferError(f"unknown option '{key}'.{did_you_mean(key, names)}")
            group, name = names[key]
            per_group.setdefault(group, {})[name] = _normalise(name, value)
        return dataclasses.replace(self, **{g: dataclasses.replace(getattr(self, g), **kw)
                                            for g, kw in per_group.items()})

    def flat(self) -> dict:
        """Every option by its flat name."""
        return {key: getattr(getattr(self, g), name) for key, (g, name) in self.flat_names().items()}

    def to_dict(self) -> dict:
        """Nested plain data (config.yaml): {group: {field: value}}."""
        return {g: {f.name: _plain(getattr(getattr(self, g), f.name)) for f in dataclasses.fields(opts)}
                for g, opts in self.GROUPS.items()}

    @classmethod
    def from_dict(cls, d: dict, where: str = "the config"):
        """From a nested dict (config.yaml) or a flat one (earlier runs, hand-written files).

        The ``resolved`` section and keys of earlier versions are ignored; unknown keys are refused with a
        did-you-mean."""
        if not isinstance(d, dict):
            raise MedxferError(f"{where} must hold a mapping of option names to values.")
        flat: dict = {}
        for key, value in d.items():
            if key in cls.GROUPS and isinstance(value, dict):
                known = {f.name: flat_name(f) for f in dataclasses.fields(cls.GROUPS[key])}
                for name, v in value.items():
                    if name not in known:
                        raise MedxferError(f"unknown config key '{key}.{name}' in {where}."
                                           f"{did_you_mean(name, known)} Allowed: {', '.join(sorted(known))}.")
                    flat[known[name]] = v
            elif key == "resolved" or key in LEGACY:
                if key == "allow_duplicates" and "duplicates" not in d:
                    flat["duplicates"] = "allow" if value else "refuse"
            elif key == "ema_epochs" and "average" not in d:  # before --average: ema_epochs > 0 meant an EMA
                if value:
                    flat.update(ema_epochs=value, average="ema")
            else:
                flat[key] = value
        names = cls.flat_names()
        unknown = [k for k in flat if RENAMED.get(k, k) not in names]
        if unknown:
            k = unknown[0]
            raise MedxferError(f"unknown config key '{k}' in {where}.{did_you_mean(k, names)} "
                               f"Allowed keys: {', '.join(sorted(names))}.")
        return cls.create(**flat)

    @classmethod
    def load(cls, path: str | Path):
        """Read a config.yaml (a run's, or hand-written; a top-level ``train:`` section is accepted)."""
        path = Path(path)
        if not path.is_file():
            raise MedxferError(f"config file '{path}' does not exist.")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise MedxferError(f"config file '{path}' is not valid YAML ({str(e).splitlines()[0]}).") from None
        if isinstance(d, dict) and isinstance(d.get("train"), dict):
            d = d["train"]
        return cls.from_dict(d, f"config file '{path}'")


@dataclass(frozen=True)
class TrainConfig(Config):
    """Everything a training run depends on, in five groups; see the module docstring."""

    GROUPS: typing.ClassVar[dict[str, type]] = {"data": DataOptions, "model": ModelOptions, "optim": OptimOptions,
                                                "evaluation": EvalOptions, "runtime": RuntimeOptions}
    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    evaluation: EvalOptions = field(default_factory=EvalOptions)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)

    # -------------------------------------------------------------------- what the options resolve to
    @property
    def strategy(self):
        return get_strategy(self.optim.strategy)

    @property
    def resolved_lr(self) -> float:
        return self.optim.lr or self.strategy.default_lr

    def epochs_for(self, n_train: int, world: int = 1) -> int:
        """``--epochs`` as given, else the strategy's data-aware default."""
        return self.optim.epochs or self.strategy.epochs_for(n_train, self.optim.batch_size, world)

    def patience_for(self, n_train: int, world: int = 1) -> int:
        """``--patience`` epochs, raised so that early stopping waits at least 60 optimiser steps."""
        steps = max(1, -(-n_train // (self.optim.batch_size * world)))
        return max(self.optim.patience, -(-MIN_PATIENCE_STEPS // steps))

    @property
    def resolved_tta(self) -> int:
        """``--tta`` as given, else :data:`DEFAULT_TTA_2D` views for 2-D models and 1 for 3-D (the views are 2-D)."""
        if self.evaluation.tta is not None:
            return self.evaluation.tta
        return 1 if self.model.spatial_dims == 3 else DEFAULT_TTA_2D

    @property
    def split_seed(self) -> int:
        return self.optim.seed if self.data.split_seed is None else self.data.split_seed

    def training_signature(self) -> dict:
        """What a resumed run must share with its checkpoint: the data, model and optim groups."""
        d = self.to_dict()
        for key in ("keep_paths", "cache_dir", "no_cache", "workers"):
            d["data"].pop(key)
        return {"data": d["data"], "model": d["model"], "optim": d["optim"]}


GROUPS = TrainConfig.GROUPS
FLAT = TrainConfig.flat_names()


def _normalise(name: str, value):
    if name in ("label_names", "subgroups", "label_columns") and value is not None:
        if isinstance(value, str):
            value = [s for s in (p.strip() for p in value.split(",")) if s]
        return tuple(str(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    return value


def _plain(value):
    if isinstance(value, tuple):
        return list(value)
    return value


_RULE_ERROR = ("The threshold rule must be youden, sensitivity=S, specificity=S or a number in "
               "(0, 1). Got {!r} instead.")


def parse_threshold_rule(text) -> str | float:
    """Validate a threshold rule; return "youden", "argmax", "sensitivity=S", "specificity=S"
    (S in (0, 1]) or a float in (0, 1). Anything else raises MedxferError."""
    if isinstance(text, (int, float)) and not isinstance(text, bool) or hasattr(text, "dtype"):
        value = float(text)
        if 0 < value < 1:
            return value
        raise MedxferError(_RULE_ERROR.format(str(text)))
    if not isinstance(text, str):
        raise MedxferError(_RULE_ERROR.format(str(text)))
    rule = text.strip().lower().replace(" ", "")
    if rule in ("youden", "argmax"):
        return rule
    for name in ("sensitivity", "specificity"):
        if rule.startswith(name + "="):
            try:
                s = float(rule[len(name) + 1:])
            except ValueError:
                break
            if 0 < s <= 1:
                return f"{name}={s}"
            break
    else:
        try:
            value = float(rule)
        except ValueError:
            value = math.nan
        if 0 < value < 1:
            return value
    raise MedxferError(_RULE_ERROR.format(text))
