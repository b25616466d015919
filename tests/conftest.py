"""Shared fixtures: small real data (BreastMNIST subsets) and tiny timm models keep tests fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BREAST = ROOT / "src" / "medxfer" / "datasets" / "breastmnist_28.npz"
PNEUMONIA = ROOT / "data" / "pneumoniamnist_28.npz"


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


@pytest.fixture(scope="session")
def small_npz(tmp_path_factory) -> Path:
    return subset_npz(BREAST, tmp_path_factory.mktemp("data") / "breast_small.npz")


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
