"""The fault table's machinery: a case is an input or a fault, the command it is given to, the exit
code, fragments the message must (and must not) hold, and the files that must (or must not) exist
afterwards. ``test_matrix.py`` runs every row; rows live beside it by topic (``rows_*.py``).
"""

from __future__ import annotations

import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from tests.faults.conftest import TINY, cli

PATIENT = "Doe_Jane_19700101"          # a patient name in a file name must never reach an output


@dataclass
class Case:
    id: str
    setup: Callable                    # (Env) -> argv
    code: int = 2
    says: tuple[str, ...] = ()         # every fragment appears in the output
    never: tuple[str, ...] = ()        # no fragment appears in the output
    files: tuple[str, ...] = ()        # exist afterwards (relative to the case's folder)
    absent: tuple[str, ...] = ()       # do not exist afterwards
    check: Callable | None = None      # (Env) -> None, more assertions


@dataclass
class Env:
    tmp: Path
    run: Path                          # a copy of a finished tiny run, per case
    data: Path                         # small BreastMNIST npz
    monkeypatch: pytest.MonkeyPatch
    extra: dict = field(default_factory=dict)


def png(path: Path, size=(16, 16), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(path)
    return path


def folder(root: Path, n=8, odd: dict | None = None) -> Path:
    """root/{train,val,test}/{a,b}/i.png, plus ``odd`` files {relative path: writer}."""
    for s, k in (("train", n), ("val", 4), ("test", 4)):
        for c in "ab":
            for i in range(k):
                png(root / s / c / f"{i}.png", seed=zlib.crc32(f"{s}/{c}/{i}".encode()))
    for rel, write in (odd or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write(root / rel)
    return root


def train(env, data, *extra, out=None):
    return ["train", "--data", data, *TINY, "--out", out or env.tmp / "out", *extra]


def run_case(case: Case, tmp_path: Path, tiny_run: Path, small_npz: Path, monkeypatch) -> None:
    """Run one row: a fresh copy of the tiny run, a private cache, the command, then every assertion."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    env = Env(tmp_path, run, small_npz, monkeypatch)
    monkeypatch.setenv("MEDXFER_CACHE_DIR", str(tmp_path / "cache"))
    argv = case.setup(env)
    try:
        code, text = cli(*argv)
    finally:
        if "lock" in env.extra:
            env.extra["lock"].release()
    assert code == case.code, text
    assert "Traceback" not in text, text
    if code == 2:  # one line (after any progress shown before the fault)
        lines = text.strip().splitlines()
        assert lines[-1].startswith("medxfer: ") and sum(ln.startswith("medxfer: ") for ln in lines) == 1, text
    for frag in case.says:
        assert frag in text, (frag, text)
    for frag in case.never:
        assert frag not in text, (frag, text)
    for rel in case.files:
        assert (tmp_path / rel).exists(), rel
    for rel in case.absent:
        assert not (tmp_path / rel).exists(), rel
    if case.check is not None:
        case.check(env)
