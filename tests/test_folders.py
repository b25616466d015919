"""Folder data sets: which folders are classes and which are splits, what is not data (hidden, system, medxfer's own
runs), and links that lead nowhere. Every folder left out is counted in the manifest's notes (the log)."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medxfer.data.cache import DecodeCache
from medxfer.data.loading import load_images
from medxfer.data.sources import load_manifest
from medxfer.errors import MedxferError


def png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8), dtype=np.uint8)).save(path)
    return path


def splits(root: Path, classes=("a", "b"), n=2) -> Path:
    for s in ("train", "val", "test"):
        for c in classes:
            for i in range(n):
                png(root / s / c / f"{i}.png", zlib.crc32(f"{s}{c}{i}".encode()))
    return root


def finished_run(folder: Path) -> Path:
    """What a finished medxfer run leaves: its record files and the report's plots (PNG images)."""
    for name in ("config.yaml", "model.json", "model.safetensors", "metrics.json", "predictions.csv", "split.csv"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("x")
    png(folder / "plots" / "roc.png")
    return folder


def notes(m) -> str:
    return " | ".join(m.notes)


@pytest.mark.parametrize("junk", [".ipynb_checkpoints", "__MACOSX", ".hidden", "@eaDir"])
def test_split_folders_stay_splits_beside_junk_folders(tmp_path, junk):
    root = splits(tmp_path / "d")
    png(root / junk / "a" / "0-checkpoint.png")
    m = load_manifest(root)
    assert m.has_splits and m.labels == ["a", "b"] and len(m.table) == 12
    assert junk in notes(m) and "ignored 1 folder" in notes(m)


def test_run_folders_in_the_data_are_never_classes(tmp_path):
    root = splits(tmp_path / "d")
    finished_run(root / "runs" / "run")
    png(root / "runs" / "run2.partial" / "plots" / "x.png")       # a run being written
    (root / "runs" / ".run2.lock").write_text("")
    png(root / "other" / "keep.partial" / "y.png")                 # a folder holding only run folders
    m = load_manifest(root)
    assert m.has_splits and m.labels == ["a", "b"] and len(m.table) == 12
    assert "runs" in notes(m) and "other" in notes(m) and "medxfer output" in notes(m)


def test_a_run_folder_beside_class_folders_is_not_a_class(tmp_path):
    root = tmp_path / "d"
    for c in ("benign", "malignant"):
        png(root / c / "0.png", seed=len(c))
    finished_run(root / "runs" / "run")
    (root / "ckpt").mkdir()
    (root / "ckpt" / "checkpoint.pt").write_bytes(b"x")           # an unfinished run's checkpoint
    png(root / "ckpt" / "plots" / "z.png")
    m = load_manifest(root)
    assert m.labels == ["benign", "malignant"] and len(m.table) == 2 and not m.has_splits


def test_split_folders_mixed_with_class_folders_are_refused_by_what_they_hold(tmp_path):
    root = splits(tmp_path / "d")
    png(root / "c" / "0.png")
    with pytest.raises(MedxferError, match=r"split folders \(test, train, val\).*class folders.*'c'") as e:
        load_manifest(root)
    assert "\n" not in str(e.value)
    other = tmp_path / "o"                        # the same names holding images, not class folders: classes
    for c in ("test", "control"):
        for i in range(2):
            png(other / c / f"{i}.png", seed=i)
    m = load_manifest(other)
    assert m.labels == ["control", "test"] and not m.has_splits and len(m.table) == 4


def test_split_folder_without_class_folders_is_refused(tmp_path):
    root = tmp_path / "d"
    for s in ("train", "val", "test"):
        png(root / s / "0.png")
    with pytest.raises(MedxferError, match="test, train, val hold images but no class folders"):
        load_manifest(root)


def test_images_outside_class_folders_are_counted(tmp_path):
    root = splits(tmp_path / "d")
    png(root / "stray.png")
    png(root / "train" / "stray.png")
    os.symlink(root / "nowhere", root / "lost.png")
    os.symlink(root / "loop", root / "loop")                   # a link that loops, beside the class folders
    m = load_manifest(root)
    assert len(m.table) == 12 and "2 images outside class folders" in notes(m)
    assert "2 broken links outside class folders" in notes(m)


def test_empty_folder_beside_split_folders_is_ignored_and_said(tmp_path):
    root = splits(tmp_path / "d")
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("x")
    m = load_manifest(root)
    assert m.has_splits and m.labels == ["a", "b"] and "notes" in notes(m)


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_broken_links_are_counted_and_read_as_bad_files(tmp_path, kind):
    root = splits(tmp_path / "d")
    link = root / "train" / "a" / "9.png"
    if kind == "dangling":
        os.symlink(tmp_path / "gone.png", link)
    else:
        os.symlink(link, link)
    m = load_manifest(root)
    assert len(m.table) == 13 and "1 broken link" in notes(m)
    with pytest.raises(MedxferError, match="cannot read sample s-"):
        load_images(m, 8, cache=DecodeCache(tmp_path / "cache"))
    loaded = load_images(m, 8, cache=DecodeCache(tmp_path / "cache"), on_bad_file="skip")
    assert len(loaded.skipped) == 1 and loaded.keep.sum() == 12
    assert load_images(m, 8, on_bad_file="skip").keep.sum() == 12            # --no-cache: the same


def test_linked_class_folder_is_read_and_a_looping_one_counted(tmp_path):
    root = splits(tmp_path / "d")
    extra = tmp_path / "elsewhere"
    png(extra / "5.png", seed=5)
    os.symlink(extra, root / "train" / "a" / "more")
    os.symlink(root / "train", root / "train" / "b" / "up")           # leads back to an ancestor
    m = load_manifest(root)
    assert len(m.table) == 13 and "looping" in notes(m)
