"""Faults that used to give a confident wrong answer with exit 0.

Each test here failed on f5fd6cd (the main before the fix) and passes after it.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from medxfer.data.loading import arrays_to_uint8
from tests.faults.conftest import TINY, cli, npz


def _train(data, out, *extra) -> None:
    code, text = cli("train", "--data", data, *TINY, "--out", out, *extra)
    assert code == 0, text


# 1. an exported ONNX model is tied to the weights it was made from ----------------------------------------
@pytest.mark.slow
def test_stale_onnx_model_is_refused(small_npz, tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    _train(small_npz, run, "--label-names", "malignant,benign")
    _train(small_npz, other, "--label-names", "malignant,benign", "--seed", "5")
    code, text = cli("export", run)
    assert code == 0, text
    shutil.copytree(other, run, dirs_exist_ok=True)  # what a retrain into the same folder leaves beside model.onnx
    code, text = cli("predict", run, small_npz, "--engine", "onnx", "--out", tmp_path / "p.csv")
    assert code == 2 and "model.onnx" in text and "export" in text, text
    assert not (tmp_path / "p.csv").exists()


# 2. intensity scaling is per image, the same in train and predict -----------------------------------------
def _float_npz(path, seed=0, n=(150, 40, 40)):
    rng = np.random.default_rng(seed)
    images, labels = {}, {}
    for split, k in zip(("train", "val", "test"), n):
        y = np.arange(k) % 2
        x = rng.normal(0, 1, (k, 28, 28)).astype(np.float32)
        x[y == 1, 8:20, 8:20] += 3
        x *= rng.uniform(0.1, 500, (k, 1, 1)).astype(np.float32)  # every image its own intensity range
        images[split], labels[split] = x, y
    return npz(path, images, labels)


def test_scaling_does_not_depend_on_batch_position(tmp_path):
    x = np.load(_float_npz(tmp_path / "f.npz"))["train_images"]
    whole = arrays_to_uint8(x, 28)
    alone = np.stack([arrays_to_uint8(x[i:i + 1], 28)[0] for i in range(0, len(x), 37)])
    assert np.array_equal(whole[::37].numpy(), alone)


def test_float_npz_predict_matches_training(tmp_path):
    data = _float_npz(tmp_path / "f.npz")
    run = tmp_path / "run"
    _train(data, run)
    code, text = cli("predict", run, data, "--out", tmp_path / "p.csv")
    assert code == 0, text
    got = pd.read_csv(tmp_path / "p.csv").set_index("sample_id")
    want = pd.read_csv(run / "predictions.csv").set_index("sample_id")
    cols = [c for c in want.columns if c.startswith("prob_")]
    assert np.abs(got.loc[want.index, cols].to_numpy() - want[cols].to_numpy()).max() < 1e-5


def test_intensity_option_applies_to_npz_arrays(tmp_path):
    from medxfer.data.readers import ReadOptions

    x = np.load(_float_npz(tmp_path / "f.npz"))["train_images"][:4]
    x[:, 0, 0] = 1e6  # one hot pixel: min-max squeezes the image, percentiles do not
    plain = arrays_to_uint8(x, 28, ReadOptions())
    clipped = arrays_to_uint8(x, 28, ReadOptions(intensity="p1-p99"))
    assert clipped.float().std() > 3 * plain.float().std()


# 3. non-finite pixels are refused by sample, or skipped and recorded ---------------------------------------
def test_nan_pixels_refused_or_skipped(tmp_path):
    data = _float_npz(tmp_path / "f.npz")
    arrays = dict(np.load(data))
    arrays["train_images"][3, 5, 5] = np.nan
    arrays["train_images"][7, 1, 1] = np.inf
    np.savez(data, **arrays)
    code, text = cli("train", "--data", data, *TINY, "--out", tmp_path / "r1")
    assert code == 2 and "train/000003" in text and "non-finite" in text, text
    code, text = cli("train", "--data", data, *TINY, "--out", tmp_path / "r2", "--on-bad-file", "skip")
    assert code == 0, text
    skipped = pd.read_csv(tmp_path / "r2" / "skipped.csv")
    assert sorted(skipped["sample_id"]) == ["train/000003", "train/000007"]
    split = pd.read_csv(tmp_path / "r2" / "split.csv")
    assert "train/000003" not in set(split["sample_id"]) and len(split) == 230 - 2


# 4. every class has training images; every evaluation split has two classes -------------------------------
def test_class_without_training_images_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {s: rng.integers(0, 255, (n, 28, 28), dtype=np.uint8) for s, n in (("train", 40), ("val", 20), ("test", 21))}
    labels = {"train": np.arange(40) % 2, "val": np.arange(20) % 2, "test": np.r_[np.arange(20) % 2, 2]}
    data = npz(tmp_path / "three.npz", imgs, labels)
    code, text = cli("train", "--data", data, *TINY, "--label-names", "a,b,c", "--out", tmp_path / "r")
    assert code == 2 and "'c'" in text and "train" in text, text


def test_class_folder_only_under_test_is_refused(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes in (("train", "ab"), ("val", "ab"), ("test", "abc")):
        for c in classes:
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(d / f"{i}.png")
    code, text = cli("train", "--data", tmp_path / "data", *TINY, "--out", tmp_path / "r")
    assert code == 2 and "'c'" in text and "no training images" in text, text


def test_single_class_test_split_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {s: rng.integers(0, 255, (20, 28, 28), dtype=np.uint8) for s in ("train", "val", "test")}
    labels = {"train": np.arange(20) % 2, "val": np.arange(20) % 2, "test": np.zeros(20, int)}
    code, text = cli("train", "--data", npz(tmp_path / "d.npz", imgs, labels), *TINY, "--out", tmp_path / "r")
    assert code == 2 and "test split" in text and "one class" in text, text


def test_float_and_integer_labels_are_one_class(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(p)
        split = "train" if i < 40 else "val" if i < 50 else "test"
        label = float(i % 2) if split == "train" else i % 2  # "1.0" in train, "1" elsewhere
        rows.append({"path": p.name, "label": label, "split": split})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    pd.read_csv(tmp_path / "m.csv")  # as a user would have it
    code, text = cli("train", "--data", tmp_path / "m.csv", *TINY, "--out", tmp_path / "r")
    assert code == 0, text
    assert yaml.safe_load((tmp_path / "r" / "model.json").read_text())["labels"] == ["0", "1"]


# 5. unknown split names are refused for every input ---------------------------------------------------------
def test_mistyped_split_in_dicom_labels_is_refused(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from tests.test_dicom_e2e import write_dicom

    rng = np.random.default_rng(0)
    rows = []
    (tmp_path / "scans").mkdir()
    for i in range(24):
        name = f"{i:03d}.dcm"
        write_dicom(tmp_path / "scans" / name, rng.integers(0, 4000, (20, 20)).astype(np.uint16), i)
        rows.append({"path": name, "label": i % 2, "split": ["train", "val", "Test"][i % 3]})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    assert pydicom is not None
    code, text = cli("train", "--data", tmp_path / "scans", "--labels", tmp_path / "labels.csv", *TINY,
                     "--out", tmp_path / "r")
    assert code == 2 and "'Test'" in text and "'test'" in text, text


# 6. compare chooses the strategy it tests against scratch on validation ----------------------------------
def test_compare_chooses_best_on_validation():
    from medxfer.comparison import paired_test
    from medxfer.evaluation.stats import summarize
    from tests.test_compare import _fake_runs

    y = np.array([0, 1] * 20)
    rng = np.random.default_rng(0)
    by = {s: _fake_runs([rng.random(40)], y) for s in ("full", "linear-probe", "scratch")}  # Run records
    summ = {"full": {"test_auc": summarize([0.95]), "val_auc": summarize([0.80])},
            "linear-probe": {"test_auc": summarize([0.85]), "val_auc": summarize([0.90])},
            "scratch": {"test_auc": summarize([0.80]), "val_auc": summarize([0.70])}}
    out = paired_test(by, summ, n_bootstrap=0)
    assert out["a"] == "linear-probe" and "validation" in out["a_chosen_as"]


# 7. resume refuses data that changed since the checkpoint ------------------------------------------------
def test_resume_refuses_changed_data(small_npz, tmp_path):
    from medxfer.config import TrainConfig
    from medxfer.pipeline import train
    from tests.test_resume import stop_after

    data = tmp_path / "d.npz"
    shutil.copy(small_npz, data)
    out = tmp_path / "run"
    cfg = TrainConfig.create(data=str(data), out=str(out), source="test_resnet", weights="none", epochs=3,
                             image_size=32, bootstrap=0, report=False)
    with stop_after(1):
        train(cfg)
    arrays = dict(np.load(data))
    for s in ("train", "val", "test"):
        arrays[f"{s}_labels"] = 1 - arrays[f"{s}_labels"]  # every label flipped
    np.savez(data, **arrays)
    code, text = cli("train", "--data", data, "--source", "test_resnet", "--weights", "none", "--epochs", "3",
                     "--image-size", "32", "--bootstrap", "0", "--no-report", "--out", out, "--resume")
    assert code == 2 and "data" in text and "changed" in text, text
