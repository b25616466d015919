"""Cross-validation: splits handed over as data, grouped stratified folds, per-fold runs and the mean +- sd."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import medxfer.cli as cli
from medxfer.config import TrainConfig
from medxfer.crossval import cross_validate, fold_split, make_folds, summarize_folds
from medxfer.data.prepare import apply_splits
from medxfer.data.sources import load_manifest
from medxfer.errors import MedxferError
from medxfer.privacy import hash_id
from tests.conftest import fake_run

pytestmark = pytest.mark.slow  # end to end: a few seconds to a minute each


@pytest.fixture
def patient_csv(tmp_path):
    """24 patients (labels per patient), 1-3 PNGs each, CSV manifest with raw patient ids."""
    rng = np.random.default_rng(0)
    rows = []
    for p in range(24):
        label = ["neg", "pos"][p % 2]
        for j in range(1 + p % 3):
            name = f"img_{p}_{j}.png"
            Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(tmp_path / name)
            rows.append({"path": name, "label": label, "patient_id": f"MRN-{p:03d}"})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    return tmp_path / "m.csv"


def test_apply_splits_replaces_given_splits(patient_csv):
    m = load_manifest(patient_csv)
    ids = m.table["sample_id"].tolist()
    roles = (["train", "val", "test"] * len(ids))[: len(ids)]
    out = apply_splits(m, dict(zip(ids[::-1], roles[::-1])))
    assert out.table["split"].tolist() == roles and m.table is not out.table
    assert out.notes[-1].startswith("splits from")


def test_apply_splits_refuses_partial_stale_or_bad_splits(patient_csv):
    m = load_manifest(patient_csv)
    ids = m.table["sample_id"].tolist()
    cases = {
        "missing": (dict.fromkeys(ids[1:], "train"), "give no split for 1 of"),
        "stale": ({**dict.fromkeys(ids, "train"), "other.png": "train"}, "list 1 samples that are not in the data"),
        "value": (dict.fromkeys(ids, "training"), "not allowed"),
    }
    for name, (splits, text) in cases.items():
        with pytest.raises(MedxferError, match=text):
            apply_splits(m, splits)


def test_fold_roles_each_sample_tested_and_validated_once():
    folds = np.repeat(np.arange(4), 5)
    roles = np.stack([fold_split(folds, i, 4) for i in range(4)])
    assert ((roles == "test").sum(0) == 1).all() and ((roles == "val").sum(0) == 1).all()
    assert (roles[0][folds == 1] == "val").all() and (roles[3][folds == 0] == "val").all()


def test_make_folds_errors(patient_csv):
    m = load_manifest(patient_csv)
    with pytest.raises(MedxferError, match="at least 2"):
        make_folds(m, 1)
    with pytest.raises(MedxferError, match="class .neg. has 24 images: too few for 30 folds"):
        make_folds(m, 30)


def test_cross_validate_folds_never_split_a_patient(patient_csv, tmp_path):
    seen = []

    def fake_train(cfg, splits):
        m = apply_splits(load_manifest(cfg.data.path), splits)
        seen.append(m.table.set_index("sample_id")["split"])
        assert (m.table.groupby("patient_id")["split"].nunique() == 1).all()
        auc = 0.7 + 0.1 * len(seen)
        return fake_run(cfg.runtime.out, {"best_epoch": 1, "train_seconds": 1.0, "val": {},
                                          "test": {"auc": auc, "auc_ci": [0.5, 0.9], "n": 10,
                                                   "argmax": {"f1": 0.5}, "threshold": None}})

    report = cross_validate(TrainConfig.create(data=str(patient_csv), strategy="full"), 4, tmp_path / "cv",
                            train_fn=fake_train)
    roles = pd.concat(seen, axis=1)
    assert ((roles == "test").sum(axis=1) == 1).all() and ((roles == "val").sum(axis=1) == 1).all()
    s = report["summary"]
    assert s["auc"]["n"] == 4 and s["auc"]["mean"] == pytest.approx(0.95) and s["auc"]["sd"] > 0
    assert "auc_ci" not in s and "n" not in s and s["argmax.f1"]["mean"] == 0.5
    assert "threshold" not in s  # undefined in every fold: no summary row of blanks
    saved = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert saved["grouped_by_patient"] and [f["run_dir"] for f in saved["per_fold"]] == \
        [str(tmp_path / "cv" / f"fold_{i}") for i in range(4)]
    folds = pd.read_csv(tmp_path / "cv" / "folds.csv")
    assert set(folds["fold"]) == {0, 1, 2, 3}
    text = "".join(p.read_text() for p in (tmp_path / "cv").rglob("*.csv"))
    assert "MRN-" not in text and "MRN-" not in (tmp_path / "cv" / "cv.json").read_text()
    assert hash_id("MRN-000") not in text  # folds.csv / split files hold sample ids only


def test_summarize_folds_none_and_nested():
    s = summarize_folds([{"auc": 0.8, "x": {"y": 0.2}}, {"auc": None, "x": {"y": 0.4}}])
    assert s["auc"] == {"mean": 0.8, "sd": None, "n": 1, "values": [0.8, None]}
    assert s["x.y"]["mean"] == pytest.approx(0.3)


def _synthetic_npz(path, n=30):
    rng = np.random.default_rng(0)
    imgs = np.concatenate([rng.integers(0, 120, (n, 16, 16)), rng.integers(100, 256, (n, 16, 16))]).astype(np.uint8)
    labels = np.repeat([0, 1], n)[:, None]
    np.savez(path, train_images=imgs, train_labels=labels)  # no val/test: partial splits
    return path


def test_cv_cli_end_to_end(tmp_path, capsys):
    data = _synthetic_npz(tmp_path / "d.npz")
    out = tmp_path / "cv"
    code = cli.main(["cv", "--data", str(data), "--folds", "3", "--source", "test_resnet", "--weights", "none",
                     "--strategy", "full", "--epochs", "1", "--image-size", "32", "--bootstrap", "10",
                     "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "cv.json").read_text())
    assert report["folds"] == 3 and report["summary"]["auc"]["n"] == 3
    folds = pd.read_csv(out / "folds.csv")
    for i in range(3):
        split = pd.read_csv(out / f"fold_{i}" / "split.csv")
        assert set(split.loc[split["split"] == "test", "sample_id"]) == set(folds.loc[folds["fold"] == i, "sample_id"])
        assert set(split.loc[split["split"] == "val", "sample_id"]) == \
            set(folds.loc[folds["fold"] == (i + 1) % 3, "sample_id"])
        assert (out / f"fold_{i}" / "model.safetensors").exists()
    assert "mean ± sd" in captured.out and "auc" in captured.out


@pytest.mark.parametrize("args, text", [
    (["--folds", "1"], "at least 2"),
    (["--bogus-option", "3"], "No such option"),
    (["--devices", "2"], "No such option: --devices"),
    (["--strategy", "ful"], "Did you mean 'full'"),
])
def test_cv_cli_errors_one_line(tmp_path, capsys, args, text):
    data = _synthetic_npz(tmp_path / "d.npz")
    code = cli.main(["cv", "--data", str(data), "--source", "test_resnet", "--weights", "none",
                     "--out", str(tmp_path / "cv"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and text in err and "\n" not in err and "Traceback" not in err
