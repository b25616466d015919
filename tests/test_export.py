"""``medxfer export``: ONNX with the preprocessing contract, parity with PyTorch, dynamic batch, predict --engine onnx."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from medxfer.cli import main

pytestmark = pytest.mark.slow  # end to end: a few seconds to a minute each

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_run):
    """A copy of the shared tiny run (it is read-only for other tests), exported to ONNX once."""
    from medxfer.export import export_run

    run = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(tiny_run, run)
    report = export_run(run, fmt="onnx")
    assert report["max_prob_diff"] < 1e-4 and report["n_images"] == 40 and report["same_argmax"] == 1.0
    assert report["path"] == str(run / "model.onnx")
    return run


def test_export_writes_onnx_with_contract(exported):
    import json

    from medxfer.engine.inference import read_onnx_metadata

    path = exported / "model.onnx"
    assert path.is_file() and path.stat().st_size > 10_000
    assert not list(exported.glob(".model.onnx.*"))  # no temporary left behind
    meta = read_onnx_metadata(path)
    model_json = json.loads((exported / "model.json").read_text())
    for key in ("labels", "image_size", "data_chans", "mean", "std", "temperature", "threshold",
                "positive_label", "read"):
        assert meta[key] == model_json[key], key
    assert meta["labels"] == ["malignant", "benign"] and meta["image_size"] == 32


def test_parity_and_dynamic_batch(exported):
    import torch

    from medxfer.engine.inference import OnnxRunner
    from medxfer.export import run_test_images
    from medxfer.runs import Run

    run = Run.load(exported)
    model = run.load_model()
    images, where = run_test_images(run)
    assert "test images" in where and len(images) == 40
    runner = OnnxRunner(exported / "model.onnx")
    assert runner.metadata["labels"] == run.model.labels
    assert runner.metadata["weights_sha256"] == run.model.weights_sha256  # tied to the weights it was made from
    for n in (1, 7):
        x = images[:n].float().div(255)
        with torch.no_grad():
            ref = model(x).numpy()
        got = runner(x.numpy())
        assert got.shape == (n, 2)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_predict_onnx_matches_torch(exported, small_npz, tmp_path):
    import pandas as pd

    a, b = tmp_path / "torch.csv", tmp_path / "onnx.csv"
    assert main(["predict", str(exported), str(small_npz), "--out", str(a)]) == 0
    assert main(["predict", str(exported), str(small_npz), "--out", str(b), "--engine", "onnx"]) == 0
    ta, tb = pd.read_csv(a), pd.read_csv(b)
    assert len(ta) == 200 and list(ta.columns) == list(tb.columns)
    probs = [c for c in ta.columns if c.startswith("prob_")]
    assert np.abs(ta[probs].to_numpy() - tb[probs].to_numpy()).max() < 1e-4
    assert (ta["sample_id"] == tb["sample_id"]).all()


def test_export_cli_check_data_prints_parity(exported, small_npz, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(exported), "--out", str(out), "--check-data", str(small_npz)]) == 0
    text = capsys.readouterr().out.replace("\n", " ")
    assert out.is_file() and "200 images from" in text and "max |prob diff|" in text and f"wrote {out}" in text


def test_torchscript_export(exported, tmp_path):
    from medxfer.export import export_run

    report = export_run(exported, fmt="torchscript", out=tmp_path / "m.pt")
    assert (tmp_path / "m.pt").is_file() and report["max_prob_diff"] < 1e-4


def test_export_without_run_dir_is_one_line_exit_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medxfer: ") and "not a finished run directory" in err and "Traceback" not in err


def test_export_bad_format_exit_2(exported, capsys):
    assert main(["export", str(exported), "--format", "tflite"]) == 2
    assert "'format' parameter" in capsys.readouterr().err


def test_predict_onnx_without_export_exit_2(tiny_run, small_npz, tmp_path, capsys):
    if (tiny_run / "model.onnx").exists():
        pytest.skip("another test exported into the shared run")
    assert main(["predict", str(tiny_run), str(small_npz), "--out", str(tmp_path / "p.csv"), "--engine", "onnx"]) == 2
    assert "medxfer export" in capsys.readouterr().err


def test_the_onnx_engine_takes_the_threads_it_is_given(tiny_run, tmp_path):
    """``predict --num-threads N --engine onnx`` limits ONNX Runtime's pool, not only PyTorch's."""
    import shutil

    import torch

    from medxfer.cli import main
    from medxfer.predict import Predictor

    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    assert main(["export", str(run)]) == 0
    assert Predictor(run, engine="onnx", threads=1).runner.session.get_session_options().intra_op_num_threads == 1
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:   # what the command wrapper does for --num-threads 1
        assert Predictor(run, engine="onnx").runner.session.get_session_options().intra_op_num_threads == 1
    finally:
        torch.set_num_threads(before)
