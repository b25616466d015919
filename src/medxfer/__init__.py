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
"""

from importlib.metadata import PackageNotFoundError, version

from medxfer.comparison import compare
from medxfer.config import TrainConfig
from medxfer.crossval import cross_validate as cv
from medxfer.errors import MedxferError
from medxfer.pipeline import train
from medxfer.predict import Predictor
from medxfer.pretrain import SSLConfig, pretrain_ssl, pretrain_supervised
from medxfer.runs import Run

try:
    __version__ = version("medxfer")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

load_run = Run.load

__all__ = ["MedxferError", "Predictor", "Run", "SSLConfig", "TrainConfig", "__version__", "compare", "cv", "load_run",
           "pretrain_ssl", "pretrain_supervised", "train"]
