"""The public Python API: `import medxfer` gives what the README shows, and Predictor takes every input form
with exactly the preprocessing of `medxfer predict`."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import medxfer
from medxfer.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_public_names():
    for name in ("TrainConfig", "train", "load_run", "Predictor", "compare", "cv", "pretrain_supervised",
                 "pretrain_ssl", "__version__"):
        assert hasattr(medxfer, name), name
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", medxfer.__version__)


@pytest.mark.slow
def test_the_readme_notebook_example_runs(tmp_path, monkeypatch, capsys):
    """The README's example, run as it is written (from a folder holding the bundled data)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- notebook example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "the README lost its notebook example"
    data = tmp_path / "src" / "medxfer" / "datasets"
    data.mkdir(parents=True)
    shutil.copy(ROOT / "src" / "medxfer" / "datasets" / "breastmnist_28.npz", data)
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert (tmp_path / "runs" / "notebook" / "model.safetensors").is_file()
    assert "prob_malignant" in printed and "predicted" in printed


@pytest.fixture(scope="module")
def predictor(tiny_run):
    return medxfer.Predictor(tiny_run)


def test_predictor_takes_every_array_form(predictor, small_npz, tmp_path):
    x = np.load(small_npz)["test_images"][:5]                       # (N, H, W) uint8, 28 px; the run uses 32 px
    ref = predictor.predict([small_npz])
    ref = ref[ref["sample_id"].str.startswith("test/")].head(5)[[f"prob_{c}" for c in predictor.labels]].to_numpy()
    forms = {"(N,H,W)": x, "(N,1,H,W)": x[:, None], "(N,H,W,1)": x[..., None], "torch": torch.from_numpy(x),
             "list of PIL": [Image.fromarray(i) for i in x]}
    for name, form in forms.items():
        np.testing.assert_allclose(predictor.probabilities(form), ref, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(predictor.probabilities(x[0]), ref[:1], atol=1e-6)  # (H, W): one image
    for i, img in enumerate(x):  # files give the same as arrays
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    files = sorted(tmp_path.glob("*.png"))
    np.testing.assert_allclose(predictor.probabilities(files), ref[[int(f.stem) for f in files]], atol=1e-6)


def test_a_run_records_the_type_of_its_training_images(predictor):
    assert predictor.meta.input_dtype == "uint8"                      # bundled BreastMNIST: 8-bit


def test_floats_in_0_1_give_the_probabilities_of_the_uint8_images(predictor, small_npz):
    x = np.load(small_npz)["test_images"][:16]
    want = predictor.probabilities(x)
    as_to_tensor = torch.from_numpy(x).float().div(255)[:, None]       # what torchvision's ToTensor gives
    np.testing.assert_allclose(predictor.probabilities(as_to_tensor), want, atol=1e-6)
    np.testing.assert_allclose(predictor.probabilities(x / 255.0), want, atol=1e-6)    # float64 too


def test_floats_outside_0_1_and_wider_integers_are_refused(predictor, small_npz):
    x = np.load(small_npz)["test_images"][:4]
    for bad in (x.astype(np.float32), (x / 255.0 - 0.5) / 0.25):      # 0-255 floats; normalised images
        with pytest.raises(medxfer.MedxferError) as info:
            predictor.probabilities(bad)
        msg = str(info.value)
        assert "8-bit" in msg and "[0, 1] (x / 255)" in msg and "uint8" in msg and "\n" not in msg
    with pytest.raises(medxfer.MedxferError, match="type uint16.*8-bit"):
        predictor.probabilities(x.astype(np.uint16) * 200)
    with pytest.raises(medxfer.MedxferError, match="I;16.*8-bit|uint16.*8-bit"):
        predictor.probabilities(Image.fromarray(x[0].astype(np.uint16) * 200))


def test_a_run_trained_on_floats_scales_every_input_per_image(small_npz, tmp_path):
    """Training images that are floats were min-max scaled each: the run scales every input so, uint8 included."""
    npz = np.load(small_npz)
    images = np.concatenate([npz[f"{s}_images"] for s in ("train", "val", "test")]).astype(np.float32) / 255
    labels = np.concatenate([npz[f"{s}_labels"][:, 0] for s in ("train", "val", "test")])
    run = medxfer.train((images, labels), source="test_resnet", weights="none", strategy="linear-probe",
                        image_size=32, bootstrap=0, report=False, tta=1, out=str(tmp_path / "floats"))
    p = medxfer.Predictor(run.dir)
    assert p.meta.input_dtype == "float32"
    x = np.random.default_rng(0).normal(size=(4, 28, 28)).astype(np.float32)
    scaled = x * np.array([1, 10, 100, 1000], np.float32)[:, None, None]
    np.testing.assert_allclose(p.probabilities(scaled), p.probabilities(x), atol=1e-6)
    u8 = np.random.default_rng(1).integers(40, 90, (4, 28, 28)).astype(np.uint8)   # a narrow range
    np.testing.assert_allclose(p.probabilities(u8), p.probabilities(u8.astype(np.float32) * 3 + 7), atol=1e-6)


def test_predictor_refuses_odd_shapes(predictor):
    with pytest.raises(medxfer.MedxferError, match="give \\(H, W\\)"):
        predictor.probabilities(np.zeros((2, 3, 4, 5, 6)))
    with pytest.raises(medxfer.MedxferError, match="numbers"):
        predictor.probabilities(np.array([["a"]]))


@pytest.mark.slow
def test_train_accepts_arrays_and_dataframes(small_npz, tmp_path):
    npz = np.load(small_npz)
    images = np.concatenate([npz[f"{s}_images"] for s in ("train", "val", "test")])
    labels = np.concatenate([npz[f"{s}_labels"][:, 0] for s in ("train", "val", "test")])
    run = medxfer.train((images, labels), source="test_resnet", weights="none", strategy="linear-probe",
                        image_size=32, bootstrap=0, report=False, out=str(tmp_path / "arrays"))
    assert run.metrics["test"]["n"] > 0 and (tmp_path / "arrays" / "split.csv").is_file()
    for i, img in enumerate(images[:80]):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    df = pd.DataFrame({"path": [str(tmp_path / f"{i}.png") for i in range(80)], "label": labels[:80]})
    run = medxfer.train(df, source="test_resnet", weights="none", strategy="linear-probe", image_size=32,
                        bootstrap=0, report=False, out=str(tmp_path / "frame"))
    assert run.resolved["data"]["origin"] == "dataframe" and len(run.split) == 80
    assert main(["predict", str(tmp_path / "frame"), str(tmp_path / "0.png"), "--out", str(tmp_path / "p.csv")]) == 0


def test_a_dataframes_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    """A DataFrame has no folder: its paths are relative to the working directory (or absolute); errors name
    the DataFrame and its rows, never the temporary table it is read through; types are kept."""
    from medxfer.data.sources import from_frame
    from medxfer.errors import MedxferError
    from medxfer.privacy import hash_id, sample_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    given = [f"imgs/{i}.png" for i in range(4)]
    df = pd.DataFrame({"path": given, "label": ["a", "b", "a", "b"], "patient_id": ["007", "7", "007", "08"]})
    m = from_frame(df)
    assert m.table["sample_id"].tolist() == [sample_id(p) for p in given]  # named as a manifest names its rows
    assert m.table["path"].tolist() == [str(tmp_path / p) for p in given]
    assert m.table["patient_id"].tolist() == [hash_id(p) for p in ("007", "7", "007", "08")]  # '007' is not '7'
    df.loc[2, "path"] = "imgs/missing.png"
    with pytest.raises(MedxferError) as e:
        medxfer.train(df, source="test_resnet", weights="none", out=str(tmp_path / "run"))
    msg = str(e.value)
    assert "row 3" in msg and "relative to the working directory" in msg and "\n" not in msg
    assert "manifest" not in msg and ".csv" not in msg and ".parquet" not in msg
    with pytest.raises(MedxferError, match="the DataFrame lists 1 file twice") as e:
        from_frame(pd.DataFrame({"path": given[:2] + [given[0]], "label": ["a", "b", "a"]}))
    assert "manifest" not in str(e.value)
