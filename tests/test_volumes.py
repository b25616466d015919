"""True 3-D volumes: reading whole, a 3-D run end to end (predict, NIfTI, ONNX, Grad-CAM), and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medxfer.cli import main
from medxfer.data.intensity import volume_to_2d
from medxfer.data.readers import ReadOptions
from medxfer.data.transforms import resize_to_uint8

TINY = ["--source", "test_resnet", "--weights", "none", "--image-size", "16", "--bootstrap", "50", "--no-report",
        "--num-threads", "1", "--spatial-dims", "3", "-q"]


def test_volumes_are_kept_whole_and_resized_in_3d():
    vol = np.random.default_rng(0).random((20, 24, 28)).astype(np.float32)
    whole = volume_to_2d(vol, ReadOptions(slice="volume"))
    assert whole.shape == (1, 20, 24, 28) and np.array_equal(whole[0], vol)
    out = resize_to_uint8(torch.from_numpy(whole[None]), 16)
    assert out.shape == (1, 1, 16, 16, 16) and out.dtype == torch.uint8
    const = resize_to_uint8(torch.full((1, 1, 8, 8, 8), 0.5), 16)   # upsampling keeps a constant volume
    assert (const == 128).all()


@pytest.fixture(scope="module")
def vol_run(small_adrenal, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vrun") / "run"
    assert main(["train", "--data", str(small_adrenal), "--epochs", "1", "--out", str(out), *TINY]) == 0
    return out


def test_a_3d_run_records_its_geometry_and_predicts_like_training(vol_run, small_adrenal):
    from medxfer.predict import Predictor

    meta = json.loads((vol_run / "model.json").read_text())
    assert meta["spatial_dims"] == 3 and meta["inflate"] == "i3d" and meta["read"]["slice"] == "volume"
    assert "(N, C, S, S, S)" in meta["input"]
    preds = pd.read_csv(vol_run / "predictions.csv")
    test = preds[preds["split"] == "test"]
    x = np.load(small_adrenal)["test_images"]
    p = Predictor(vol_run)
    probs = p.probabilities(x)
    np.testing.assert_allclose(probs, test[["prob_0", "prob_1"]].to_numpy(), atol=1e-5)


def test_a_nifti_volume_is_predicted_whole(vol_run, small_adrenal, tmp_path):
    nib = pytest.importorskip("nibabel")
    from medxfer.predict import Predictor

    vol = np.load(small_adrenal)["test_images"][0]   # (D, H, W) uint8, as the run trained on
    nib.save(nib.Nifti1Image(np.transpose(vol, (2, 1, 0)).copy(), np.eye(4)), tmp_path / "ct.nii.gz")
    df = Predictor(vol_run).predict([str(tmp_path / "ct.nii.gz")])
    assert len(df) == 1 and df[["prob_0", "prob_1"]].to_numpy().sum() == pytest.approx(1.0)
    assert "ct" not in df["sample_id"][0]                                 # pseudonymous id, not the file name


def test_a_volume_of_another_type_or_a_2d_npz_is_refused_by_a_3d_run(vol_run, small_npz, tmp_path, capsys):
    """The run trained on 8-bit volumes: a NIfTI of 0-255 floats is refused (never stretched), and so is an npz
    of 2-D images, each in one line (they were a confident answer and a traceback)."""
    nib = pytest.importorskip("nibabel")
    vol = np.random.default_rng(0).integers(0, 255, (8, 8, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "f.nii.gz")
    for target, message in ((tmp_path / "f.nii.gz", "trained on 8-bit images"), (small_npz, "are 2-D")):
        code = main(["predict", str(vol_run), str(target), "--out", str(tmp_path / "p.csv")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "p.csv").exists()


def test_3d_onnx_parity_and_grad_cam(vol_run, small_adrenal):
    from medxfer.evaluation.gradcam import explain_images, mid_planes, overlay
    from medxfer.predict import Predictor
    from medxfer.runs import Run

    assert main(["export", str(vol_run)]) == 0
    x = np.load(small_adrenal)["test_images"][:6]
    diff = np.abs(Predictor(vol_run, engine="onnx").probabilities(x) - Predictor(vol_run).probabilities(x)).max()
    assert diff < 1e-4
    run = Run.load(vol_run)
    images = Predictor(vol_run).images(x)
    maps = explain_images(run.load_model(tta=False), run.model, images)
    assert maps.shape == (6, 16, 16, 16) and 0 <= maps.min() and maps.max() <= 1 and maps.max() > 0
    tile = overlay(images[0].numpy(), maps[0])
    assert tile.shape == (16, 48, 3)                                      # axial | coronal | sagittal
    assert mid_planes(np.zeros((1, 16, 16, 16))).shape == (1, 16, 48)


def test_grad_cam_3d_points_at_the_evidence():
    """A blob at a known (depth, row, column): the map's peak must be there (no axis swapped or flipped)."""
    from medxfer.evaluation.gradcam import _volume_cams

    class Blobs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 4, 1, bias=False)
            torch.nn.init.constant_(self.conv.weight, 0.1)

        def forward(self, x):
            score = torch.relu(self.conv(x)).mean(dim=(1, 2, 3, 4))
            return torch.stack([-score, score], 1)

    m = Blobs()
    x = torch.zeros(2, 1, 12, 12, 12)
    x[0, 0, 2, 8, 4] = x[1, 0, 9, 1, 6] = 1.0
    cam = _volume_cams(m, m.conv, x, np.array([1, 1]), 2)
    assert np.unravel_index(cam[0].argmax(), cam[0].shape) == (2, 8, 4)
    assert np.unravel_index(cam[1].argmax(), cam[1].shape) == (9, 1, 6)
    assert cam[0, 2, 8, 4] == pytest.approx(1.0) and cam[0, 10, 1, 10] == pytest.approx(0.0)


def test_a_2d_source_made_by_pretrain_is_inflated_into_a_3d_run(small_npz, small_adrenal, tmp_path):
    """The 3-D recipe for small volumes: a small 2-D source trained on a medical set, inflated by i3d."""
    from safetensors.torch import load_file

    from medxfer.models.adapt import build_model
    from medxfer.models.catalog import resolve_source

    src = tmp_path / "src"
    assert main(["pretrain", "supervised", "--data", str(small_npz), "--source", "test_resnet", "--weights", "none",
                 "--image-size", "16", "--epochs", "1", "--num-threads", "1", "--no-report", "--out", str(src),
                 "-q"]) == 0
    w2d = load_file(str(src / "model.safetensors"))["conv1.0.weight"]           # (16, 1, 3, 3), trained
    model, info = build_model(resolve_source(str(src)), 2, 1, spatial_dims=3, inflate="i3d")
    w3d = model.net.conv1[0].weight                                             # (16, 1, 3, 3, 3)
    assert info["loaded_keys"] > 0 and w3d.shape == (16, 1, 3, 3, 3)
    torch.testing.assert_close(w3d.sum(2), w2d)                                 # repeated over depth / 3
    out = tmp_path / "run"
    assert main(["train", "--data", str(small_adrenal), "--source", str(src), "--epochs", "1", "--out", str(out),
                 *[a for a in TINY if a not in ("test_resnet", "none", "--source", "--weights")]]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["source"] == "src" and meta["spatial_dims"] == 3 and meta["arch"] == "test_resnet"


def test_a_3d_source_made_by_pretrain_on_volumes_is_a_source_for_volumes(small_npz, small_adrenal, tmp_path,
                                                                         capsys):
    from safetensors.torch import load_file

    from medxfer.models.adapt import build_model
    from medxfer.models.catalog import resolve_source

    src = tmp_path / "src3d"
    assert main(["pretrain", "supervised", "--data", str(small_adrenal), "--epochs", "1", "--out", str(src),
                 *[a for a in TINY if a != "--no-report"], "--no-report"]) == 0
    meta = json.loads((src / "source.json").read_text())
    assert meta["spatial_dims"] == 3 and meta["inflate"] == "i3d"
    w = load_file(str(src / "model.safetensors"))["conv1.0.weight"]
    model, info = build_model(resolve_source(str(src)), 2, 1, spatial_dims=3, inflate="i3d")
    assert w.dim() == 5 and torch.equal(model.net.conv1[0].weight, w) and info["loaded_keys"] > 0
    out = tmp_path / "run"
    assert main(["train", "--data", str(small_adrenal), "--source", str(src), "--epochs", "1", "--out", str(out),
                 *[a for a in TINY if a not in ("test_resnet", "none", "--source", "--weights")]]) == 0
    assert json.loads((out / "model.json").read_text())["source"] == "src3d"
    for args, message in ((["--data", str(small_npz)], "is a 3-D source"),
                          (["--data", str(small_adrenal), "--spatial-dims", "3", "--inflate", "acs"],
                           "pass --inflate i3d")):
        code = main(["train", *args, "--source", str(src), "--image-size", "16", "--epochs", "1",
                     "--out", str(tmp_path / "r"), "-q"])
        assert code == 2 and message in capsys.readouterr().err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, message", [
    (["--spatial-dims", "3", "--data", "SMALL2D"], "a 3-D model (--spatial-dims 3) takes volumes"),
    (["--slice", "volume", "--data", "ADRENAL"], "train them with --spatial-dims 3"),
    (["--spatial-dims", "3", "--tta", "4", "--data", "ADRENAL"], "--tta views are 2-D"),
])
def test_3d_mismatches_are_refused_with_one_line(small_npz, small_adrenal, tmp_path, capsys, args, message):
    args = [str(small_npz) if a == "SMALL2D" else str(small_adrenal) if a == "ADRENAL" else a for a in args]
    code = main(["train", *args, "--source", "test_resnet", "--weights", "none", "--epochs", "1",
                 "--image-size", "16", "--out", str(tmp_path / "r"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------ DICOM series
def _write_series(folder: Path, vol_hu: np.ndarray, uid: str, shuffle_seed: int = 0) -> None:
    """A CT series of axial slices (int16 stored, slope 1, intercept -1024), written in a shuffled order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(shuffle_seed).permutation(len(vol_hu))
    for n, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID, uid
        ds.PatientName, ds.PatientID, ds.Modality = "Doe^Jane", "MRN-0042", "CT"
        ds.Rows, ds.Columns = vol_hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, float(2.5 * k)]
        ds.InstanceNumber = int(n + 1)           # file order, not anatomy: sorting must use the position
        ds.PixelData = (vol_hu[k] + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"slice_{n:03d}.dcm", enforce_file_format=True)


def test_a_dicom_series_folder_is_one_volume_sorted_by_position(tmp_path):
    pytest.importorskip("pydicom")
    from medxfer.data.readers import read_image

    vol = np.zeros((6, 8, 8), np.float32)
    for k in range(6):
        vol[k] = -1000 + 300 * k                 # each slice its own HU value, rising with position
    _write_series(tmp_path / "series", vol, "1.2.3.4")
    out = read_image(tmp_path / "series", ReadOptions(slice="volume", window="-200,1400"))
    assert out.shape == (1, 6, 8, 8)
    means = out[0].mean(axis=(1, 2))
    assert np.all(np.diff(means) > 0)            # sorted by ImagePositionPatient, not by file or InstanceNumber
    linear = (vol[:, 0, 0] - (-200 - 0.5)) / (1400 - 1) + 0.5   # DICOM's LINEAR window (PS3.3 C.11.2.1.2)
    np.testing.assert_allclose(means, np.clip(linear, 0, 1), atol=1e-5)


def test_series_folders_train_and_predict_without_leaking_names(tmp_path, capsys):
    pytest.importorskip("pydicom")
    from medxfer.predict import Predictor

    rng = np.random.default_rng(1)
    rows = []
    for i in range(24):
        label = i % 2
        vol = rng.normal(-500, 50, (6, 8, 8)).astype(np.float32)
        vol[2:4, 2:6, 2:6] += 600 * label        # a bright lesion in the positives
        _write_series(tmp_path / f"Doe_Jane_{i:02d}", vol, f"1.2.3.{i}", shuffle_seed=i)
        rows.append({"path": f"Doe_Jane_{i:02d}", "label": ["normal", "mass"][label],
                     "split": ["train", "train", "val", "test"][(i // 2) % 4]})
    pd.DataFrame(rows).to_csv(tmp_path / "series.csv", index=False)
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "series.csv"), "--epochs", "2", "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    df = Predictor(out).predict([str(tmp_path / "Doe_Jane_03")])
    assert len(df) == 1 and not df["sample_id"][0].startswith("Doe")
    for f in ("predictions.csv", "split.csv", "metrics.json", "model_card.md", "train.log"):
        text = (out / f).read_text()
        assert "Doe" not in text and "MRN-0042" not in text and "Jane" not in text


def test_cached_features_are_not_shared_between_inflation_modes(small_adrenal, tmp_path):
    """i3d and acs turn the same 2-D weights into different 3-D networks: a linear probe with one must not
    reuse the other's cached features (it did: both runs gave identical probabilities)."""
    probs = {}
    for mode in ("i3d", "acs"):
        out = tmp_path / mode
        assert main(["train", "--data", str(small_adrenal), "--strategy", "linear-probe", "--inflate", mode,
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--seed", "0", *TINY]) == 0
        probs[mode] = pd.read_csv(out / "predictions.csv").filter(like="prob").to_numpy()
        assert json.loads((out / "model.json").read_text())["inflate"] == mode
    assert probs["i3d"].shape == probs["acs"].shape and not np.allclose(probs["i3d"], probs["acs"])


def test_compare_views_puts_slice_and_3d_on_one_split(small_adrenal, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--data", str(small_adrenal), "--views", "slice,3d", "--strategies", "linear-probe,scratch",
            "--seeds", "0", "--epochs", "1", *[a for a in TINY if a not in ("--spatial-dims", "3")], "--out", str(out)]
    assert main(args) == 0
    result = json.loads((out / "comparison.json").read_text())
    rows = ["linear-probe [slice]", "scratch [slice]", "linear-probe [3d]", "scratch [3d]"]
    assert result["settings"]["rows"] == rows and result["settings"]["views"] == ["slice", "3d"]
    for row in rows:
        run = Path(result["strategies"][row]["runs"][0])
        meta = json.loads((run / "model.json").read_text())
        assert meta["spatial_dims"] == (3 if row.endswith("[3d]") else 2), row
    best = result["paired_test"]["a"]
    assert best.startswith("linear-probe [") and result["paired_test"]["b"] == "scratch [" + best.split(" [")[1]
    capsys.readouterr()
    assert main([*args[:-2], "--slice", "orthogonal", "--out", str(tmp_path / "x")]) == 2
    assert "leave out --slice" in capsys.readouterr().err
    assert main([a if a != "slice,3d" else "slice,4d" for a in args]) == 2
    assert "unknown view '4d'" in capsys.readouterr().err
