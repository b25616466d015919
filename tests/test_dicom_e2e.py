"""A folder of synthetic DICOM files + labels CSV, trained end to end through the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # end to end: a few seconds to a minute each

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

import medxfer.data.readers  # noqa: E402
from medxfer.cli import main  # noqa: E402
from medxfer.privacy import hash_id, sample_id  # noqa: E402

N_PATIENTS, PER_PATIENT = 10, 3
RAW_ID = "MRN-DOE-{:03d}"
RAW_NAME = "Doeqwerty^Janexyz{:03d}"
SPLIT_OF = {p: ("test" if p in (0, 1) else "val" if p in (2, 3) else "train") for p in range(N_PATIENTS)}


def write_dicom(path: Path, pixels: np.ndarray, patient: int) -> str:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = RAW_ID.format(patient), RAW_NAME.format(patient)
    ds.Modality = "OT"
    ds.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=12)
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def image(label: int, rng) -> np.ndarray:
    """Class 0: a dark square top-left; class 1: a bright disc centre (12-bit, noisy)."""
    x = rng.integers(200, 600, (40, 40)).astype(np.uint16)
    yy, xx = np.mgrid[:40, :40]
    if label:
        x[(yy - 20) ** 2 + (xx - 20) ** 2 < 80] = 3500
    else:
        x[2:14, 2:14] = 3000
    return x


@pytest.fixture(scope="module")
def dicom_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom")
    folder = root / "scans"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for p in range(N_PATIENTS):
        label = p % 2
        for j in range(PER_PATIENT):
            sub = folder / f"series{p % 3}"
            sub.mkdir(exist_ok=True)
            uid = write_dicom(sub / f"img{p:02d}{j}.dcm", image(label, rng), p)
            rows.append({"SOPInstanceUID": uid, "label": ["normal", "lesion"][label], "split": SPLIT_OF[p]})
    labels = root / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return folder, labels


def train_args(folder, labels, out, cache, *extra):
    return ["train", "--data", str(folder), "--labels", str(labels), "--source", "test_resnet", "--weights", "none",
            "--strategy", "full", "--epochs", "1", "--image-size", "32", "--bootstrap", "20", "--batch-size", "8",
            "--cache-dir", str(cache), "--out", str(out), *extra]


def no_raw_identifiers(run_dir: Path):
    for f in run_dir.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for p in range(N_PATIENTS):
                for raw in (RAW_ID.format(p), RAW_NAME.format(p), "Doeqwerty", "MRN-DOE"):
                    assert raw.encode() not in data, f"{raw} in {f.name}"


def test_dicom_folder_trains_end_to_end(dicom_data, tmp_path, monkeypatch, capsys):
    folder, labels = dicom_data
    cache = tmp_path / "cache"
    out = tmp_path / "run"
    assert main(train_args(folder, labels, out, cache)) == 0, capsys.readouterr().err
    for name in ("config.yaml", "model.json", "model.safetensors", "metrics.json", "history.csv",
                 "predictions.csv", "split.csv"):
        assert (out / name).is_file(), name
    assert not (out / "skipped.csv").exists()
    split = pd.read_csv(out / "split.csv")
    assert len(split) == N_PATIENTS * PER_PATIENT
    expected = {hash_id(RAW_ID.format(p)) for p in range(N_PATIENTS)}
    assert set(split["patient_id"]) == expected
    assert (split.groupby("patient_id")["split"].nunique() == 1).all()
    assert split["split"].value_counts().to_dict() == {"train": 18, "val": 6, "test": 6}
    preds = pd.read_csv(out / "predictions.csv")
    assert set(preds["patient_id"]) <= expected and set(preds["split"]) == {"val", "test"}
    assert {"prob_normal", "prob_lesion"} <= set(preds.columns)
    no_raw_identifiers(out)
    err = capsys.readouterr().err
    assert "MRN-DOE" not in err and "Doeqwerty" not in err
    entries = [p for p in cache.rglob("*.npy") if "stores" not in p.parts]   # one per file, beside the store
    assert len(entries) == N_PATIENTS * PER_PATIENT
    assert len(list((cache / "stores").glob("*.npy"))) == 1                 # the decoded store of this run

    # second run: every image from the decode cache, no file decoded
    def no_decoding(*a, **k):
        raise AssertionError("decoded a file although the cache holds it")

    monkeypatch.setattr(medxfer.data.readers, "read_image", no_decoding)
    assert main(train_args(folder, labels, tmp_path / "run2", cache)) == 0, capsys.readouterr().err
    assert len(list(cache.rglob("*.npy"))) == len(entries) + 1              # nothing decoded, nothing added
    assert (pd.read_csv(tmp_path / "run2" / "split.csv")["sample_id"] == split["sample_id"]).all()


@pytest.fixture
def with_corrupt(dicom_data, tmp_path):
    """A copy of the data with one truncated DICOM (header fine, pixel data cut)."""
    import shutil

    folder, labels = dicom_data
    copy = tmp_path / "scans"
    shutil.copytree(folder, copy)
    victim = sorted(copy.rglob("*.dcm"))[4]
    victim.write_bytes(victim.read_bytes()[:-2000])
    return copy, labels, victim


def test_corrupt_file_skipped_and_listed(with_corrupt, tmp_path, capsys):
    folder, labels, victim = with_corrupt
    out = tmp_path / "run"
    assert main(train_args(folder, labels, out, tmp_path / "cache", "--on-bad-file", "skip")) == 0, \
        capsys.readouterr().err
    skipped = pd.read_csv(out / "skipped.csv")
    rel = victim.relative_to(folder).as_posix()
    assert len(skipped) == 1 and skipped["sample_id"][0] == sample_id(rel) and list(skipped) == ["sample_id", "reason"]
    assert isinstance(skipped["reason"][0], str) and skipped["reason"][0]
    assert len(pd.read_csv(out / "split.csv")) == N_PATIENTS * PER_PATIENT - 1
    assert "skipped 1 unreadable samples" in capsys.readouterr().err
    no_raw_identifiers(out)


def test_corrupt_file_without_skip_exit_2_one_line(with_corrupt, tmp_path, capsys):
    folder, labels, victim = with_corrupt
    code = main(train_args(folder, labels, tmp_path / "run", tmp_path / "cache"))
    out = capsys.readouterr().err.strip()
    err = out.splitlines()[-1]   # the log lines said before the fault (the memory plan) may precede it
    assert code == 2 and sum(ln.startswith("medxfer: ") for ln in out.splitlines()) == 1 and "Traceback" not in out
    rel = victim.relative_to(folder).as_posix()
    assert err.startswith(f"medxfer: cannot read sample {sample_id(rel)}") and "--on-bad-file skip" in err
    assert victim.name not in out and "MRN-DOE" not in out and "Doeqwerty" not in out
    assert victim.name not in err and "MRN-DOE" not in err and "Doeqwerty" not in err
    assert not (tmp_path / "run").exists()
