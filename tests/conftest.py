"""Shared fixtures: small real data (BreastMNIST subsets) and tiny timm models keep tests fast."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ["COLUMNS"] = "120"  # rich and click wrap at the terminal's width: the same on every machine

ROOT = Path(__file__).resolve().parents[1]
BREAST = ROOT / "src" / "medxfer" / "datasets" / "breastmnist_28.npz"
PNEUMONIA = ROOT / "data" / "pneumoniamnist_28.npz"
ADRENAL = ROOT / "data" / "adrenalmnist3d_28.npz"


def subset_npz(path: Path, out: Path, n=(120, 40, 40)) -> Path:
    """First n images of each split (both classes present), MedMNIST layout."""
    src = np.load(path)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        x, y = src[f"{split}_images"], src[f"{split}_labels"]
        idx = np.concatenate([np.flatnonzero(y[:, 0] == c)[: k // 2] for c in (0, 1)])
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x[idx], y[idx]
    np.savez(out, **arrays)
    return out


def ordinal_npz(path: Path, grades: int = 4, size: int = 28, n=(240, 80, 120)) -> Path:
    """Ordered grades 0..grades-1: a bright disc whose radius grows with the grade, on noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    c = size // 2
    out = {}
    for split, k in zip(("train", "val", "test"), n):
        y = np.arange(k) % grades
        x = rng.normal(60, 20, (k, size, size))
        for i, g in enumerate(y):
            x[i][(yy - c) ** 2 + (xx - c) ** 2 < (3 + 2 * g + rng.normal(0, 1)) ** 2] += 120
        out[f"{split}_images"], out[f"{split}_labels"] = np.clip(x, 0, 255).astype(np.uint8), y
    np.savez(path, **out)
    return path


@pytest.fixture(scope="session")
def small_npz(tmp_path_factory) -> Path:
    return subset_npz(BREAST, tmp_path_factory.mktemp("data") / "breast_small.npz")


@pytest.fixture(scope="session")
def small_adrenal(tmp_path_factory) -> Path:
    """AdrenalMNIST3D volumes (28^3), balanced: 96 / 40 / 40."""
    return subset_npz(ADRENAL, tmp_path_factory.mktemp("vol") / "adrenal_small.npz", n=(96, 40, 40))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, small_npz) -> Path:
    """A finished run of a tiny random-init model (a few seconds), shared by read-only tests."""
    from medxfer.cli import main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    code = main(["train", "--data", str(small_npz), "--source", "test_resnet", "--weights", "none",
                 "--strategy", "full", "--epochs", "2", "--image-size", "32", "--bootstrap", "50",
                 "--label-names", "malignant,benign", "--positive-label", "malignant", "--out", str(out)])
    assert code == 0
    return out


def fake_run(run_dir, metrics: dict, predictions=None, split=None, labels=("benign", "malignant")):
    """A Run record made in memory (for tests of code that reads runs: compare, cv)."""
    from medxfer.config import TrainConfig
    from medxfer.runs import ModelMeta, Run

    meta = ModelMeta(arch="test_resnet", labels=list(labels), in_chans=1, data_chans=1, image_size=32, mean=[0.5],
                     std=[0.5])
    return Run(dir=Path(str(run_dir)), config=TrainConfig(), resolved={}, model=meta, metrics=metrics,
               predictions=predictions, split=split)
