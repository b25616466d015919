"""One writer of a finished run: every file ``Run.load`` (and ``load_model``) reads was written by
:mod:`medxfer.run_writer` and is covered by the run's ``files.sha256``, for runs made by train, ensemble,
auto (its best trial copied as the model) and export."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

from medxfer import files, run_writer, runs
from medxfer.runs import Run

TINY = dict(source="test_resnet", weights="none", epochs=1, image_size=32, bootstrap=0, report=False)


def _key(path) -> tuple[str, str]:
    """(run folder, file name), the staging folder taken for the run it becomes."""
    p = Path(path).absolute()
    return p.parent.name.removesuffix(".partial"), p.name


@pytest.fixture
def spy(monkeypatch):
    """Records who wrote each file (the calling module) and which files the run reader opened."""
    written: dict[tuple[str, str], str] = {}
    read: set[tuple[str, str]] = set()

    def writer(name):
        original = getattr(files, name)

        def wrapped(path, *a, **kw):
            caller = sys._getframe(1).f_globals["__name__"]
            if caller != files.__name__:  # the outermost call names the writer (write_csv goes through write_text)
                written[_key(path)] = caller
            return original(path, *a, **kw)
        monkeypatch.setattr(files, name, wrapped)

    for name in ("write_json", "write_yaml", "write_csv", "write_weights", "write_text"):
        writer(name)

    def reader(module, name):
        original = getattr(module, name)

        def wrapped(path, *a, **kw):
            read.add(_key(path))
            return original(path, *a, **kw)
        monkeypatch.setattr(module, name, wrapped)

    import safetensors.torch

    reader(safetensors.torch, "load_file")  # the kept test images (Run.check_images)
    reader(runs, "read_json")
    reader(runs, "read_yaml")
    original_load = runs.load_weights  # it takes the model first, the path second
    monkeypatch.setattr(runs, "load_weights", lambda model, path, *a, **kw: (read.add(_key(path)),
                                                                               original_load(model, path, *a, **kw))[1])
    original_csv = pd.read_csv
    monkeypatch.setattr(runs.pd, "read_csv", lambda path, *a, **kw: (read.add(_key(path)),
                                                                      original_csv(path, *a, **kw))[1])
    return written, read


def _check(run_dir: Path, spy, copied_from: Path | None = None) -> None:
    """``copied_from``: the run whose files run_writer.copy_run copied (checked against its record, byte for
    byte) before writing its own."""
    written, read = spy
    read.clear()
    run = Run.load(run_dir)
    run.load_model()
    assert run.check_images() is not None
    record = files.read_hashes(run_dir)
    opened = {name for folder, name in read if folder == run_dir.name}
    assert {"model.json", "config.yaml", "metrics.json", "predictions.csv", "model.safetensors",
            runs.CHECK_IMAGES} <= opened
    for name in opened:
        by = written.get((run_dir.name, name)) or (copied_from and written.get((copied_from.name, name)))
        assert by == "medxfer.run_writer", (run_dir, name, by)
        assert name in record, (run_dir, name)


def test_every_file_a_run_is_read_from_comes_from_the_one_writer(tmp_path, small_npz, spy):
    from medxfer.config import TrainConfig
    from medxfer.ensemble import build_ensemble
    from medxfer.export import export_run
    from medxfer.pipeline import train

    a = train(TrainConfig.create(data=str(small_npz), strategy="full", out=str(tmp_path / "a"), **TINY))
    b = train(TrainConfig.create(data=str(small_npz), strategy="linear-probe", out=str(tmp_path / "b"), **TINY))
    _check(a.dir, spy)
    _check(b.dir, spy)
    ens = build_ensemble([a.dir, b.dir], tmp_path / "ens", method="uniform", bootstrap=0, report=False)
    _check(ens.dir, spy)
    copied = run_writer.copy_run(a, tmp_path / "copy", metrics={**a.metrics, "note": "copied"},
                                 extra={"leaderboard": pd.DataFrame({"trial": [0]})})
    assert copied.metrics["note"] == "copied" and (copied.dir / "leaderboard.csv").is_file()
    _check(copied.dir, spy, copied_from=a.dir)
    export_run(a.dir, fmt="torchscript")
    _check(a.dir, spy)
    assert Run.load(a.dir).model.torchscript_sha256 == files.read_hashes(a.dir)["model.torchscript.pt"]


def test_model_json_is_the_build_record(tiny_run):
    """model.json holds every field of ModelMeta (one place to add one) and nothing the record does not know
    besides the hash-record mark."""
    import dataclasses
    import json

    from medxfer.runs import ModelMeta

    raw = json.loads((tiny_run / "model.json").read_text())
    fields = {f.name for f in dataclasses.fields(ModelMeta)} - {"extra"}
    assert set(raw) == fields | {"hashes"}


def test_export_checks_parity_from_the_run_directory_alone(tmp_path, small_npz):
    """The run keeps its first test images: export needs neither the data nor re-preparing it."""
    import shutil

    import torch

    from medxfer.config import TrainConfig
    from medxfer.export import export_run
    from medxfer.pipeline import train

    data = tmp_path / "data.npz"
    shutil.copy(small_npz, data)
    run = train(TrainConfig.create(data=str(data), strategy="full", out=str(tmp_path / "run"), **TINY))
    kept = run.check_images()
    n_test = int((run.predictions["split"] == "test").sum())
    assert kept.dtype == torch.uint8 and len(kept) == n_test and kept.shape[1:] == (1, 32, 32)
    data.unlink()  # the data are gone: the export still checks itself on the run's own test images
    report = export_run(run.dir, fmt="torchscript")
    assert report["checked_on"] == f"{n_test} test images kept with the run" and report["max_prob_diff"] < 1e-4
    from medxfer.evaluation.report import write_report

    page = write_report(run.dir).read_text()  # the Grad-CAM gallery from the kept images too
    assert "No Grad-CAM gallery" not in page and "Grad-CAM gallery" in page
