"""Fault table rows: a run's files: hashes, values read back, locks, --out."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from tests.faults.table import Case, png, train


# ------------------------------------------------------------------------------------------- helpers
def _edit_json(env, name: str, edit) -> None:
    path = env.run / name
    d = json.loads(path.read_text())
    d = edit(d)
    path.write_text(json.dumps(d, indent=2))


def _keep_bytes(env, *paths: Path) -> None:
    env.extra["bytes"] = {p: p.read_bytes() for p in paths}


def _unchanged(env) -> None:
    for p, data in env.extra["bytes"].items():
        assert p.read_bytes() == data, p


def _set(**values):
    def edit(d):
        d.update(values)
        return d
    return edit


def _swap_labels(d):
    d["labels"] = d["labels"][::-1]
    return d


def _predict(env) -> list:
    return ["predict", env.run, env.data, "--out", env.tmp / "p.csv"]


def _edited(name: str, edit, cmd: str = "predict"):
    """A run of this release with one of its files edited afterwards (still valid JSON / CSV)."""
    def setup(env):
        if name.endswith(".json"):
            _edit_json(env, name, edit)
        else:
            edit(env.run / name)
        if cmd == "report":  # the report and the card stay as they were
            _keep_bytes(env, env.run / "report.html", env.run / "model_card.md")
        return _predict(env) if cmd == "predict" else [cmd, env.run]
    return setup


def _legacy(env) -> None:
    """The run as an earlier release wrote it: no hash record, no mention of one in model.json."""
    (env.run / "files.sha256").unlink(missing_ok=True)
    _edit_json(env, "model.json", lambda d: {k: v for k, v in d.items() if k != "hashes"})


def _legacy_edited(name: str, edit, cmd: str = "predict"):
    """A run of an earlier release (no hash record) whose file holds a value out of range: the range checks."""
    def setup(env):
        _legacy(env)
        _edit_json(env, name, edit)
        return _predict(env) if cmd == "predict" else [cmd, env.run]
    return setup


def _flip_a_probability(path: Path) -> None:
    df = pd.read_csv(path)
    col = [c for c in df.columns if c.startswith("prob_")]
    df.loc[0, col] = df.loc[0, col].to_numpy()[::-1]
    df.to_csv(path, index=False)


def _auc_up(d):
    d["test"]["auc"] = 0.99
    return d


def _no_record(env) -> list:
    (env.run / "files.sha256").unlink()
    return _predict(env)


def _legacy_loads(env) -> list:
    _legacy(env)
    return _predict(env)


def _legacy_foreign_weights(env) -> list:
    _legacy(env)
    _edit_json(env, "model.json", lambda d: {k: v for k, v in d.items() if k != "weights_sha256"})
    (env.run / "model.safetensors").write_bytes(b"\x00" * 64)
    return _predict(env)


# ------------------------------------------------------------------------------------- the lock
def _staging_of_another_writer(env) -> list:
    """Process A holds OUT's lock and writes OUT.partial; B is refused and must leave A's staging alone."""
    from filelock import FileLock

    out = env.tmp / "out"
    staging = env.tmp / "out.partial"
    staging.mkdir()
    (staging / "model.json").write_text("{}")            # A's files so far (no checkpoint yet)
    lock = FileLock(str(env.tmp / ".out.lock"))
    lock.acquire()
    env.extra["lock"] = lock
    return train(env, env.data, out=out)


# ------------------------------------------------------------------------------------------ --out
def _fifo(env) -> Path:
    path = env.tmp / "fifo.csv"
    os.mkfifo(path)
    return path


def _onto_input(env) -> list:
    data = env.tmp / "d.npz"
    data.write_bytes(env.data.read_bytes())
    _keep_bytes(env, data)
    return ["predict", env.run, data, "--out", data]


def _onto_image_in_input_folder(env) -> list:
    folder = env.tmp / "scans"
    image = png(folder / "a.png")
    png(folder / "b.png", seed=1)
    _keep_bytes(env, image)
    return ["predict", env.run, folder, "--out", image, "--overwrite"]


def _onto_run_file(name: str, cmd: str = "predict"):
    def setup(env):
        _keep_bytes(env, env.run / name)
        if cmd == "predict":
            return ["predict", env.run, env.data, "--out", env.run / name]
        return ["export", env.run, "--out", env.run / name]
    return setup


def _onto_foreign_file(*extra: str):
    def setup(env):
        notes = env.tmp / "notes.csv"
        notes.write_text("my,own\n1,2\n")
        if not extra:
            _keep_bytes(env, notes)
        return ["predict", env.run, env.data, "--out", notes, *extra]
    return setup


def _ours_is_overwritten(env) -> None:
    """What predict wrote itself is replaced by the next predict without --overwrite."""
    from tests.faults.conftest import cli

    for _ in range(2):
        code, text = cli("predict", env.run, env.data, "--out", env.tmp / "p.csv")
        assert code == 0, text
    df = pd.read_csv(env.tmp / "p.csv")
    assert list(df.columns[:2]) == ["index", "sample_id"] and len(df) > 0


def _overwritten(env) -> None:
    assert (env.tmp / "notes.csv").read_text().startswith("index,sample_id,")


def _features_onto_input(env) -> list:
    data = env.tmp / "d.npz"
    data.write_bytes(env.data.read_bytes())
    _keep_bytes(env, data)
    return ["features", env.run, "--data", data, "--out", data]


def _explain_into_run(env) -> list:
    return ["explain", env.run, png(env.tmp / "x.png", size=(28, 28)), "--out", env.run / "cams"]


CASES: list[Case] = [
    # ------------------------------------------------------------- 3. every file the answers depend on is hashed
    Case("r2-labels-swapped", _edited("model.json", _swap_labels), says=("model.json", "files.sha256"),
         absent=("p.csv",)),
    Case("r2-threshold-edited", _edited("model.json", _set(threshold=0.9)), says=("model.json", "files.sha256")),
    Case("r2-temperature-edited", _edited("model.json", _set(temperature=3.0)), says=("model.json",)),
    Case("r2-tta-edited", _edited("model.json", _set(tta=1)), says=("model.json",)),
    Case("r2-image-size-edited", _edited("model.json", _set(image_size=64)), says=("model.json",)),
    Case("r2-metrics-edited", _edited("metrics.json", _auc_up, "report"), says=("metrics.json", "files.sha256"),
         check=_unchanged),
    Case("r2-predictions-edited", _edited("predictions.csv", _flip_a_probability, "report"),
         says=("predictions.csv", "files.sha256"), check=_unchanged),
    Case("r2-split-edited", _edited("split.csv", lambda p: p.write_text(p.read_text().replace(",train,", ",test,", 1)),
                                    "report"), says=("split.csv",)),
    Case("r2-config-edited", _edited("config.yaml", lambda p: p.write_text(p.read_text().replace("seed: 0",
                                                                                                 "seed: 1"))),
         says=("config.yaml",)),
    Case("r2-record-removed", _no_record, says=("files.sha256", "missing")),
    Case("r2-earlier-release-loads-with-a-warning", _legacy_loads, code=0, says=("warning:", "earlier release"),
         files=("p.csv",)),
    Case("r2-earlier-release-foreign-weights", _legacy_foreign_weights, says=("earlier release", "model.safetensors")),
    # ------------------------------------------------------------- 3 and 7. values read back are range-checked
    Case("r2-old-labels-repeated", _legacy_edited("model.json", _set(labels=["a", "a"])), says=("labels must be", "'a'")),
    Case("r2-old-labels-empty", _legacy_edited("model.json", _set(labels=["malignant", ""])), says=("labels must be",)),
    Case("r2-old-threshold-above-1", _legacy_edited("model.json", _set(threshold=7.5)), says=("threshold must be", "7.5")),
    Case("r2-old-temperature-0", _legacy_edited("model.json", _set(temperature=0)), says=("temperature must be", "got 0")),
    Case("r2-old-temperature-nan", _legacy_edited("model.json", _set(temperature=float("nan"))),
         says=("model.json", "temperature must be")),
    Case("r2-old-tta-negative", _legacy_edited("model.json", _set(tta=-3)), says=("tta must be", "-3")),
    Case("r2-old-image-size-0", _legacy_edited("model.json", _set(image_size=0)), says=("image_size must be", "got 0")),
    Case("r2-old-image-size-text", _legacy_edited("model.json", _set(image_size="32")), says=("image_size must be",)),
    Case("r2-old-positive-label-unknown", _legacy_edited("model.json", _set(positive_label="cancer")),
         says=("positive_label must be", "'cancer'")),
    Case("r2-old-task-unknown", _legacy_edited("model.json", _set(task="regression")), says=("task must be", "'regression'")),
    Case("r2-old-spatial-dims-4", _legacy_edited("model.json", _set(spatial_dims=4)), says=("spatial_dims must be 2 or 3",)),
    Case("r2-old-mean-length", _legacy_edited("model.json", _set(mean=[0.5, 0.5, 0.5])), says=("mean must be a list",)),
    Case("r2-old-std-zero", _legacy_edited("model.json", _set(std=[0.0])), says=("std must be a list", "above 0")),
    Case("r2-old-input-dtype-unknown", _legacy_edited("model.json", _set(input_dtype="complex-ish")),
         says=("input_dtype must be",)),
    Case("r2-old-read-unknown-key", _legacy_edited("model.json", _set(read={"gamma": "2"})), says=("model.json", "'gamma'")),
    Case("r2-old-metrics-a-list", _legacy_edited("metrics.json", lambda d: [d], "report"),
         says=("metrics.json", "must hold")),
    Case("r2-old-metrics-without-test", _legacy_edited("metrics.json", lambda d: {"val": d["val"]}, "report"),
         says=("metrics.json", "'test'")),
    # ------------------------------------------------------------- 5. a refused writer leaves the owner's staging
    Case("r2-refused-writer-keeps-the-owners-staging", _staging_of_another_writer, says=("another medxfer process",),
         files=("out.partial/model.json",)),
    # ------------------------------------------------------------- 6. --out never overwrites what it must not
    Case("r2-predict-out-onto-its-input", _onto_input, says=("one of the inputs",), check=_unchanged),
    Case("r2-predict-out-onto-an-image-of-an-input-folder", _onto_image_in_input_folder, says=("one of the inputs",),
         check=_unchanged),
    Case("r2-predict-out-onto-the-runs-predictions", _onto_run_file("predictions.csv"), says=("run directory",),
         check=_unchanged),
    Case("r2-predict-out-onto-a-fifo", lambda e: ["predict", e.run, e.data, "--out", _fifo(e)],
         says=("not a regular file",), check=lambda e: _is_fifo(e.tmp / "fifo.csv")),
    Case("r2-predict-out-onto-a-foreign-file", _onto_foreign_file(), says=("--overwrite",),
         check=lambda e: (_unchanged(e), _ours_is_overwritten(e))),
    Case("r2-predict-out-onto-a-foreign-file-overwrite", _onto_foreign_file("--overwrite"), code=0, check=_overwritten),
    Case("r2-export-out-onto-the-weights", _onto_run_file("model.safetensors", "export"), says=("run directory",),
         check=_unchanged),
    Case("r2-features-out-onto-its-input", _features_onto_input, says=("one of the inputs",), check=_unchanged),
    Case("r2-explain-out-into-the-run", _explain_into_run, says=("run directory",), absent=("run/cams",)),
]


def _is_fifo(path: Path) -> None:
    import stat

    assert stat.S_ISFIFO(os.stat(path).st_mode)
