"""Helpers for the fault suite: run the CLI in-process and capture its one-line errors."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest

from medxfer.cli import main

TINY = ["--source", "test_resnet", "--weights", "none", "--image-size", "32", "--bootstrap", "0", "--no-report",
        "--epochs", "1"]


def cli(*args) -> tuple[int, str]:
    """Run ``medxfer ARGS`` in-process; (exit code, what it printed to stdout and stderr)."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
        code = main([str(a) for a in args])
    return code, buf.getvalue()


def npz(path: Path, images: dict, labels: dict) -> Path:
    arrays = {}
    for split in images:
        arrays[f"{split}_images"] = images[split]
        arrays[f"{split}_labels"] = np.asarray(labels[split]).reshape(-1, 1)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="session")
def breast_small(small_npz) -> Path:
    return small_npz
