"""Run configuration: one frozen dataclass, saved resolved as ``config.yaml`` in the run directory.

Usage::

    cfg = TrainConfig(data="data/breastmnist_28.npz", strategy="full", epochs=10)
    cfg = load_config("run/config.yaml")          # unknown keys -> "did you mean"
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from medxfer.errors import MedxferError, did_you_mean

STRATEGIES = ("linear-probe", "partial", "full", "scratch")
DEFAULT_EPOCHS = {"linear-probe": 100, "partial": 10, "full": 10, "scratch": 20}
# Small data sets get more epochs: at least this many optimiser steps (capped at MAX_AUTO_EPOCHS)
MIN_STEPS = {"linear-probe": 0, "partial": 600, "full": 600, "scratch": 1200}
MAX_AUTO_EPOCHS = 60
# Early stopping waits at least this many optimiser steps without improvement: on a tiny train set
# (one step per epoch) 10 epochs of patience would stop a run before it has learned anything
MIN_PATIENCE_STEPS = 60
# full: head 1e-2, backbone 1e-3 (x backbone_lr_mult 0.1), chosen on validation AUC over head 1e-3
# (backbone 1e-4): BreastMNIST 3 seeds 0.917 vs 0.895, PneumoniaMNIST 0.996 vs 0.988 (64 px)
DEFAULT_LR = {"linear-probe": 1e-3, "partial": 1e-3, "full": 1e-2, "scratch": 2e-3}


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str = "runs/run"
    source: str = "efficientnet_lite0.in1k"
    weights: str | None = None
    strategy: str = "full"
    unfreeze: int = 1
    image_size: int | None = None        # None: the source's input size
    epochs: int | None = None            # None: per-strategy default
    batch_size: int = 64
    lr: float | None = None              # head learning rate; None: per-strategy default
    backbone_lr_mult: float = 0.1
    layer_decay: float | None = None
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    patience: int = 10
    ema_epochs: float = 0.0              # > 0: keep an EMA of the weights over about this many epochs
    class_weights: str = "none"          # none | balanced
    augment: str = "light"               # none | light | strong
    head: str = "logistic"               # linear-probe head: logistic (sklearn, C chosen on val) | linear (AdamW)
    feature_augment: int = 0             # linear-probe: K cached augmented views of the train set
    grey_mode: str = "sum"               # sum | replicate
    label_names: tuple[str, ...] | None = None
    positive_label: str | None = None
    seed: int = 0
    split_seed: int | None = None        # seed of the split when medxfer makes one (default: seed)
    split_file: str | None = None        # CSV sample_id,split that overrides the splits (used by cv)
    duplicates: str = "drop-from-train"  # drop-from-train | refuse | allow (images found in two splits)
    split_by: str | None = "auto"
    precision: str = "auto"              # auto | bf16 | fp16 | fp32
    compile: bool = False
    devices: int = 1
    num_threads: int | None = None
    on_bad_file: str = "error"           # error | skip
    labels_csv: str | None = None
    window: str = "auto"
    frame: str = "middle"
    slice: str = "middle"
    intensity: str = "auto"
    cache_dir: str | None = None
    no_cache: bool = False
    threshold: str = "youden"
    calibrate: str = "temperature"       # temperature | none
    bootstrap: int = 2000
    report: bool = True
    label_fraction: float = 1.0
    resume: bool = False                 # continue from OUT.partial/checkpoint.pt (written after every epoch)
    overwrite: bool = False              # replace a finished run in OUT (only once the new one is complete)
    keep_paths: bool = False             # write paths.csv (sample id -> file); file names can hold patient names
    on_unlabelled: str = "error"         # DICOM folder files without a label: error | skip
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise MedxferError(f"unknown strategy '{self.strategy}'.{did_you_mean(self.strategy, STRATEGIES)} "
                               f"Choose one of: {', '.join(STRATEGIES)}.")
        for name, allowed in (("class_weights", ("none", "balanced")), ("grey_mode", ("sum", "replicate")),
                              ("precision", ("auto", "bf16", "fp16", "fp32")), ("on_bad_file", ("error", "skip")),
                              ("calibrate", ("temperature", "none")), ("augment", ("none", "light", "strong")),
                              ("head", ("logistic", "linear")), ("on_unlabelled", ("error", "skip")),
                              ("duplicates", ("drop-from-train", "refuse", "allow"))):
            if getattr(self, name) not in allowed:
                raise MedxferError(f"The '{name.replace('_', '-')}' parameter must be one of {list(allowed)}. "
                                   f"Got '{getattr(self, name)}' instead.")
        for name in ("batch_size", "devices", "unfreeze", "patience"):
            if getattr(self, name) < 1:
                raise MedxferError(f"The '{name.replace('_', '-')}' parameter must be at least 1. "
                                   f"Got {getattr(self, name)} instead.")
        for name in ("bootstrap", "feature_augment"):
            if getattr(self, name) < 0:
                raise MedxferError(f"The '{name.replace('_', '-')}' parameter must be 0 or more. "
                                   f"Got {getattr(self, name)} instead.")
        if self.num_threads is not None and self.num_threads < 1:
            raise MedxferError(f"The 'num-threads' parameter must be at least 1. Got {self.num_threads} instead.")
        if self.label_names is not None:
            names = list(self.label_names)
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup or len(names) < 2 or any(not str(n).strip() for n in names):
                raise MedxferError("The 'label-names' parameter must be at least two distinct, non-empty names. "
                                   f"Got {','.join(map(str, names))!r} instead" + (f" ('{dup[0]}' twice)." if dup else "."))
        if self.epochs is not None and self.epochs < 1:
            raise MedxferError(f"The 'epochs' parameter must be at least 1. Got {self.epochs} instead.")
        if self.image_size is not None and not 8 <= self.image_size <= 2048:
            raise MedxferError(f"The 'image-size' parameter must be between 8 and 2048. Got {self.image_size} instead.")
        if not 0 < self.label_fraction <= 1:
            raise MedxferError(f"The 'label-fraction' parameter must be in (0, 1]. Got {self.label_fraction} instead.")

    @property
    def resolved_epochs(self) -> int:
        """Epochs as given, else the strategy's default (see :meth:`epochs_for` for the data-aware rule)."""
        return self.epochs or DEFAULT_EPOCHS[self.strategy]

    def epochs_for(self, n_train: int, world: int = 1) -> int:
        """Epochs as given; else the strategy's default, raised so that small data sets still get
        ``MIN_STEPS`` optimiser steps (early stopping on validation AUC ends runs that stop improving)."""
        if self.epochs:
            return self.epochs
        steps = max(1, -(-n_train // (self.batch_size * world)))
        wanted = -(-MIN_STEPS[self.strategy] // steps)
        return max(DEFAULT_EPOCHS[self.strategy], min(MAX_AUTO_EPOCHS, wanted))

    def patience_for(self, n_train: int, world: int = 1) -> int:
        """``patience`` epochs, raised so that early stopping waits at least ``MIN_PATIENCE_STEPS`` steps."""
        steps = max(1, -(-n_train // (self.batch_size * world)))
        return max(self.patience, -(-MIN_PATIENCE_STEPS // steps))

    @property
    def resolved_lr(self) -> float:
        return self.lr or DEFAULT_LR[self.strategy]

    def training_signature(self) -> dict:
        """The settings a resumed run must share with its checkpoint (not reporting or caching options)."""
        d = self.to_dict()
        for key in ("out", "resume", "report", "num_threads", "no_cache", "cache_dir", "bootstrap", "threshold",
                    "calibrate", "extra", "overwrite", "keep_paths"):
            d.pop(key, None)
        return d

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["label_names"] is not None:
            d["label_names"] = list(d["label_names"])
        return d


def config_from_dict(d: dict) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = [k for k in d if k not in names and k != "allow_duplicates"]
    if unknown:
        k = unknown[0]
        raise MedxferError(f"unknown config key '{k}'.{did_you_mean(k, names)} Allowed keys: {', '.join(sorted(names))}.")
    if "data" not in d:
        raise MedxferError("the config has no 'data' key: say where the images are.")
    d = dict(d)
    if "allow_duplicates" in d:  # before --duplicates: allow or refuse
        allow = d.pop("allow_duplicates")
        d.setdefault("duplicates", "allow" if allow else "refuse")
    if d.get("label_names") is not None:
        d["label_names"] = tuple(d["label_names"])
    return TrainConfig(**d)


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise MedxferError(f"config file '{path}' does not exist.")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise MedxferError(f"config file '{path}' is not valid YAML ({str(e).splitlines()[0]}).") from e
    if not isinstance(d, dict):
        raise MedxferError(f"config file '{path}' must hold a mapping of keys to values.")
    return config_from_dict(d.get("train", d))
