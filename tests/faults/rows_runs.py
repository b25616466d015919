"""Fault table rows: a run's files: hashes, values read back, locks, --out."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from tests.faults.table import Case, train


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
]

