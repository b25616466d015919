"""Fault table rows: data discovery and reading: folder layouts, labels, names, npz shapes and bombs."""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import pandas as pd

from tests.faults.conftest import TINY
from tests.faults.table import Case, folder, png, train

NOT_UTF8 = b"img_\xff.png"                      # a name from an old NAS copy: not valid UTF-8


def _model(env, run="out") -> dict:
    return json.loads((env.tmp / run / "model.json").read_text())


def _labels(env, labels, run="out", positive=None) -> None:
    meta = _model(env, run)
    assert meta["labels"] == list(labels), meta["labels"]
    if positive is not None:
        assert meta["positive_label"] == positive, meta["positive_label"]


def _n_samples(env, n: int, run="out") -> None:
    assert len(pd.read_csv(env.tmp / run / "split.csv")) == n


def _beside_splits(env) -> Path:
    """train/ val/ test/ with a notebook's checkpoints, a macOS archive's folder and an old run beside them."""
    root = folder(env.tmp / "d", odd={".ipynb_checkpoints/a/0-checkpoint.png": png, "__MACOSX/train/a/._0.png": png})
    shutil.copytree(env.run, root / "runs" / "old")          # a finished run: its report's plots are PNGs
    return root


def _data_dot(env) -> list:
    """cd DATA && medxfer train --data . : the default --out runs/run is made inside the data before the scan."""
    root = _beside_splits(env)
    env.monkeypatch.chdir(root)
    return ["train", "--data", ".", *TINY]


def _manifest(env, labels, name="m.csv", paths=None) -> Path:
    paths = paths or [f"img/{i}.png" for i in range(len(labels))]
    for p in set(paths):
        png(env.tmp / os.path.normpath(p), seed=zlib.crc32(p.encode()))
    df = pd.DataFrame({"path": paths, "label": labels})
    if name.endswith(".parquet"):
        df.to_parquet(env.tmp / name)
    else:
        df.to_csv(env.tmp / name, index=False)
    return env.tmp / name


def _odd_name(env) -> Path:
    root = folder(env.tmp / "d")
    png(Path(os.fsdecode(os.fsencode(str(root / "train" / "a")) + b"/" + NOT_UTF8)), seed=99)
    return root


def _odd_name_predict(env) -> list:
    png(Path(os.fsdecode(os.fsencode(str(env.tmp / "in")) + b"/" + NOT_UTF8)), seed=99)
    png(env.tmp / "in" / "plain.png", seed=98)
    return ["predict", env.run, env.tmp / "in", "--out", env.tmp / "p.csv"]


def _predicted(env) -> None:
    p = pd.read_csv(env.tmp / "p.csv")
    assert len(p) == 2 and p["sample_id"].str.startswith("s-").all() and p["sample_id"].is_unique


def _broken_link(env, loop=False) -> Path:
    root = folder(env.tmp / "d")
    link = root / "train" / "a" / "9.png"
    os.symlink(link if loop else env.tmp / "gone.png", link)
    return root


def _skipped_one(env) -> None:
    assert len(pd.read_csv(env.tmp / "out" / "skipped.csv")) == 1


def _cache_in(env) -> Path:
    env.monkeypatch.setenv("MEDXFER_CACHE_DIR", str(env.tmp / "x" / "cache"))
    return env.data


CASES: list[Case] = [
    # ---------------------------------------------------------------------------- folder layouts
    Case("r2-split-folders-beside-junk-and-a-run", lambda e: train(e, _beside_splits(e)), code=0,
         says=(".ipynb_checkpoints (hidden)", "__MACOSX (system)", "runs (medxfer output)"),
         check=lambda e: (_labels(e, "ab"), _n_samples(e, 32))),
    Case("r2-data-dot-never-reads-its-own-run", _data_dot, code=0, files=("d/runs/run/model.json",),
         check=lambda e: (_labels(e, "ab", run="d/runs/run"), _n_samples(e, 32, run="d/runs/run"))),
    Case("r2-split-folders-beside-a-class-folder", lambda e: train(e, folder(e.tmp / "d", odd={"c/0.png": png})),
         says=("split folders (test, train, val)", "'c'", "CSV manifest"), absent=("out",)),
    # ---------------------------------------------------------------------------- labels
    Case("r2-signed-labels-positive-class", lambda e: train(e, _manifest(e, [-1, 1] * 20)), code=0,
         says=("-1 < 1", "positive class is the last, '1'"), check=lambda e: _labels(e, ["-1", "1"], positive="1")),
    Case("r2-signed-ordinal-grades", lambda e: train(e, _manifest(e, [-1, 0, 1] * 14), "--task", "ordinal"), code=0,
         says=("-1 < 0 < 1",), check=lambda e: _labels(e, ["-1", "0", "1"])),
    Case("r2-parquet-list-labels", lambda e: train(e, _manifest(e, [["a"], ["b"]] * 20, name="m.parquet")), code=0,
         says=("labels are lists",), check=lambda e: _labels(e, "ab")),
    # ---------------------------------------------------------------------------- names and links
    Case("r2-train-name-not-utf8", lambda e: train(e, _odd_name(e)), code=0, never=("img_",),
         check=lambda e: _n_samples(e, 33)),
    Case("r2-predict-name-not-utf8", _odd_name_predict, code=0, never=("img_",), check=_predicted),
    Case("r2-dangling-link-refused", lambda e: train(e, _broken_link(e)),
         says=("cannot read sample s-", "broken link"), never=("9.png", "gone.png"), absent=("out",)),
    Case("r2-dangling-link-skipped", lambda e: train(e, _broken_link(e), "--on-bad-file", "skip"), code=0,
         says=("1 broken link",), files=("out/skipped.csv",), check=_skipped_one),
    Case("r2-looping-link-skipped", lambda e: train(e, _broken_link(e, loop=True), "--on-bad-file", "skip"), code=0,
         says=("1 broken link",), check=_skipped_one),
    Case("r2-manifest-one-file-two-spellings",
         lambda e: train(e, _manifest(e, [0, 1] * 20 + [0], paths=[f"img/{i}.png" for i in range(40)]
                                      + ["./img/../img/0.png"])),
         says=("1 file twice", "data row 41", "data row 1"), never=("img/0.png",)),
    # ---------------------------------------------------------------------------- caches
    Case("r2-feature-cache-under-the-cache-folder",
         lambda e: train(e, _cache_in(e), "--strategy", "linear-probe"), code=0,
         files=("x/cache/features",), absent=("x/features",)),
]
