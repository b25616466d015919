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


def test_predictor_scales_float_arrays_per_image(predictor):
    x = np.random.default_rng(0).normal(size=(4, 28, 28)).astype(np.float32)
    scaled = x * np.array([1, 10, 100, 1000], np.float32)[:, None, None]  # per-image min-max: the same images
    np.testing.assert_allclose(predictor.probabilities(scaled), predictor.probabilities(x), atol=1e-6)


def test_predictor_refuses_odd_shapes(predictor):
    with pytest.raises(medxfer.MedxferError, match="give \\(H, W\\)"):
        predictor.probabilities(np.zeros((2, 3, 4, 5, 6)))
    with pytest.raises(medxfer.MedxferError, match="numbers"):
        predictor.probabilities(np.array([["a"]]))


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
