"""medxfer: transfer learning for medical image classification.

A **source** model (ImageNet, a medical data set, self-supervised pretraining) -> a **target** model
with an adapted stem and a new head -> **adapted** to your images with a strategy, evaluated the way a
clinical study would, explained and shipped.

Usage::

    import medxfer

    run = medxfer.train("data/breastmnist_28.npz", strategy="linear-probe", image_size=64, out="runs/lp")
    run.metrics["test"]["auc"], run.metrics["test"]["auc_ci"]
    p = medxfer.Predictor("runs/lp")
    p.predict(["scan1.png", "scans/"])          # a table: index, sample_id, prob_<class>..., predicted
    p.probabilities(images)                     # numpy / torch arrays or PIL images, preprocessed as `medxfer predict`

    cfg = medxfer.TrainConfig.create(data="labels.csv", strategy="full", epochs=10)
    medxfer.cv(cfg, folds=5, out="runs/cv")
    medxfer.compare(cfg, ["linear-probe", "full", "scratch"], seeds=[0, 1, 2], out="runs/cmp")

The names below are imported when first used (module ``__getattr__``), so that ``import medxfer.config``
and ``medxfer --help`` do not pay for PyTorch.
"""

from __future__ import annotations

import typing

#: public name -> (module, attribute)
_LAZY = {"compare": ("medxfer.comparison", "compare"), "TrainConfig": ("medxfer.config", "TrainConfig"),
         "cv": ("medxfer.crossval", "cross_validate"), "MedxferError": ("medxfer.errors", "MedxferError"),
         "train": ("medxfer.pipeline", "train"), "Predictor": ("medxfer.predict", "Predictor"),
         "SSLConfig": ("medxfer.pretrain", "SSLConfig"), "pretrain_ssl": ("medxfer.pretrain", "pretrain_ssl"),
         "pretrain_supervised": ("medxfer.pretrain", "pretrain_supervised"), "Run": ("medxfer.runs", "Run")}

__all__ = ["MedxferError", "Predictor", "Run", "SSLConfig", "TrainConfig", "__version__", "compare", "cv", "load_run",
           "pretrain_ssl", "pretrain_supervised", "train"]

if typing.TYPE_CHECKING:  # what the names are, for type checkers and editors
    from medxfer.comparison import compare
    from medxfer.config import TrainConfig
    from medxfer.crossval import cross_validate as cv
    from medxfer.errors import MedxferError
    from medxfer.pipeline import train
    from medxfer.predict import Predictor
    from medxfer.pretrain import SSLConfig, pretrain_ssl, pretrain_supervised
    from medxfer.runs import Run

    __version__: str
    load_run = Run.load


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medxfer")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0.0.0+unknown"


def __getattr__(name: str):
    import importlib

    if name == "__version__":
        value = _version()
    elif name == "load_run":
        value = importlib.import_module("medxfer.runs").Run.load
    elif name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
    else:
        raise AttributeError(f"module 'medxfer' has no attribute {name!r}")
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
