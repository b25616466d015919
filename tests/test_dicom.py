"""DICOM reading (real pydicom-data fixtures + files written here) and the folder manifest."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from medxfer.data.dicom import dicom_folder_manifest  # noqa: E402
from medxfer.data.readers import ReadOptions, read_image  # noqa: E402
from medxfer.errors import BadFileError, MedxferError  # noqa: E402
from medxfer.privacy import DEFAULT_SALT, hash_id  # noqa: E402

SECRET_NAME = "Zyxwvut^Qwertyuiop"
SECRET_ID = "PID-XQ-998877"


def fixture(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available (pip install pydicom-data)")
    return str(path)


def linear_window(x, center, width):
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0, 1)


def write_dicom(path: Path, pixels: np.ndarray | None, *, photometric="MONOCHROME2",
                patient_name=SECRET_NAME, patient_id=SECRET_ID, **header) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19010203"
    ds.Modality = "OT"
    for key, value in header.items():
        setattr(ds, key, value)
    if pixels is not None:
        bits = 8 if pixels.dtype == np.uint8 else 16
        ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits)
    ds.save_as(path, enforce_file_format=True)
    return path


# -------------------------------------------------------------------------- real fixtures


def test_ct_small_rescale_then_minmax_and_preset():
    ds = pydicom.dcmread(fixture("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    out = read_image(fixture("CT_small.dcm"))
    np.testing.assert_allclose(out[0], (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6)
    lung = read_image(fixture("CT_small.dcm"), ReadOptions(window="lung"))
    np.testing.assert_allclose(lung[0], linear_window(hu, -600, 1500), atol=1e-6)
    custom = read_image(fixture("CT_small.dcm"), ReadOptions(window="40,400"))
    np.testing.assert_allclose(custom[0], linear_window(hu, 40, 400), atol=1e-6)


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_RLE.dcm"])
def test_mr_header_window(name):
    ds = pydicom.dcmread(fixture(name))
    expected = linear_window(ds.pixel_array.astype(np.float64), float(ds.WindowCenter),
                             float(ds.WindowWidth))
    out = read_image(fixture(name))
    assert out.shape == (1, 64, 64)
    np.testing.assert_allclose(out[0], expected, atol=1e-6)


def test_cr_monochrome1_window_then_invert():
    ds = pydicom.dcmread(fixture("RG1_UNCI.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    expected = 1 - linear_window(ds.pixel_array.astype(np.float64), float(ds.WindowCenter),
                                 float(ds.WindowWidth))
    out = read_image(fixture("RG1_UNCI.dcm"))
    assert out.shape == (1, 1955, 1841)
    np.testing.assert_allclose(out[0], expected, atol=1e-6)


def test_window_none_uses_intensity_rule():
    ds = pydicom.dcmread(fixture("MR_small.dcm"))
    px = ds.pixel_array.astype(np.float64)
    lo, hi = np.percentile(px, [1, 99])
    out = read_image(fixture("MR_small.dcm"), ReadOptions(window="none", intensity="p1-p99"))
    np.testing.assert_allclose(out[0], np.clip((px - lo) / (hi - lo), 0, 1), atol=1e-5)


def test_rgb_jpeg_dicom_three_channels():
    ds = pydicom.dcmread(fixture("SC_rgb_jpeg_dcmtk.dcm"))
    out = read_image(fixture("SC_rgb_jpeg_dcmtk.dcm"))
    assert out.shape == (3, 100, 100)
    np.testing.assert_allclose(out, np.moveaxis(ds.pixel_array, -1, 0) / 255.0, atol=1e-6)


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "JPEG-LL.dcm"])
def test_compressed_dicom(name):
    px = pydicom.dcmread(fixture(name)).pixel_array.astype(np.float64)
    out = read_image(fixture(name))
    np.testing.assert_allclose(out[0], (px - px.min()) / (px.max() - px.min()), atol=1e-6)


def test_missing_codec_names_pip_package(monkeypatch):
    from pydicom.pixels.decoders import JPEG2000Decoder

    monkeypatch.setattr(JPEG2000Decoder, "_available", {})
    with pytest.raises(BadFileError) as info:
        read_image(fixture("JPEG2000.dcm"))
    assert "pip install" in info.value.reason and "pylibjpeg-openjpeg" in info.value.reason


# -------------------------------------------------------------------------- files written here


def test_monochrome1_written_inverted(tmp_path):
    px = np.arange(0, 1000, 10, dtype=np.uint16).reshape(10, 10)
    path = write_dicom(tmp_path / "m1.dcm", px, photometric="MONOCHROME1")
    np.testing.assert_allclose(read_image(path)[0], 1 - px / 990.0, atol=1e-6)
    path = write_dicom(tmp_path / "m1w.dcm", px, photometric="MONOCHROME1",
                       WindowCenter=500, WindowWidth=400)
    np.testing.assert_allclose(read_image(path)[0], 1 - linear_window(px, 500, 400), atol=1e-6)


def test_voi_lut_sequence_scaled_by_lut_range(tmp_path):
    px = np.arange(100, dtype=np.uint16).reshape(10, 10) + 20  # 20..119; LUT covers 0..99
    path = write_dicom(tmp_path / "lut.dcm", px, WindowCenter=5000, WindowWidth=10)
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.LUTDescriptor = [100, 0, 16]
    item.add_new(0x00283006, "US", [int(v) for v in 1000 + (np.arange(100) ** 2 // 10)])
    ds.VOILUTSequence = [item]
    ds.save_as(path, enforce_file_format=True)
    lut = np.asarray(item.LUTData, np.float64)
    expected = (lut[np.clip(px, 0, 99)] - lut.min()) / (lut.max() - lut.min())
    np.testing.assert_allclose(read_image(path)[0], expected, atol=1e-6)
    np.testing.assert_allclose(read_image(path, ReadOptions(window="60,40"))[0],
                               linear_window(px, 60, 40), atol=1e-6)


def test_multiframe_frame_selection(tmp_path):
    frames = np.stack([np.full((6, 5), v, np.uint8) for v in (10, 20, 30, 40, 50)])
    frames[:, 0, 0] = 0  # not constant
    path = write_dicom(tmp_path / "mf.dcm", frames)
    assert int(pydicom.dcmread(path).NumberOfFrames) == 5
    assert read_image(path).shape == (1, 6, 5)
    assert read_image(path)[0, 1, 1] == pytest.approx(30 / 255)
    assert read_image(path, ReadOptions(frame="0"))[0, 1, 1] == pytest.approx(10 / 255)
    assert read_image(path, ReadOptions(frame="4"))[0, 1, 1] == pytest.approx(50 / 255)
    with pytest.raises(BadFileError, match="frame 5 requested"):
        read_image(path, ReadOptions(frame="5"))


def test_no_suffix_file_with_preamble(tmp_path):
    px = np.arange(64, dtype=np.uint8).reshape(8, 8)
    path = write_dicom(tmp_path / "IM0001", px)
    np.testing.assert_allclose(read_image(path)[0], px / 255.0, atol=1e-7)


def test_no_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "np.dcm", None)
    with pytest.raises(BadFileError, match="DICOM without pixel data"):
        read_image(path)


def test_truncated_empty_and_random_dicom(tmp_path):
    px = np.random.default_rng(0).integers(0, 4000, (64, 64)).astype(np.uint16)
    full = write_dicom(tmp_path / "full.dcm", px).read_bytes()
    (tmp_path / "trunc.dcm").write_bytes(full[: len(full) - 3000])
    (tmp_path / "head.dcm").write_bytes(full[:200])
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "rand.dcm").write_bytes(np.random.default_rng(1).bytes(4096))
    for name in ("trunc.dcm", "head.dcm", "empty.dcm", "rand.dcm"):
        with pytest.raises(BadFileError) as info:
            read_image(tmp_path / name)
        assert info.value.path == str(tmp_path / name)
        assert SECRET_NAME not in str(info.value) and SECRET_ID not in str(info.value)


# -------------------------------------------------------------------------- folder manifest


@pytest.fixture
def dicom_folder(tmp_path):
    root = tmp_path / "scans"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    px = np.arange(16, dtype=np.uint8).reshape(4, 4)
    write_dicom(root / "a" / "1.dcm", px)
    write_dicom(root / "a" / "IM2", px, patient_id="OTHER-1")
    write_dicom(root / "b" / "3.dcm", px, patient_id="OTHER-2")
    (root / "b" / "notes.txt").write_text("not dicom")
    return root


def test_manifest_by_path_with_split(dicom_folder, tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label,split\na/1.dcm,pneumonia,train\n./a/IM2,normal,val\nb/3.dcm,normal,test\n")
    df, skipped = dicom_folder_manifest(dicom_folder, csv)
    assert list(df.columns) == ["path", "label", "patient_id", "split"]
    assert len(df) == 3 and skipped.empty
    assert all(Path(p).is_absolute() for p in df["path"])
    row = df[df["path"].str.endswith("1.dcm")].iloc[0]
    assert row["label"] == "pneumonia" and row["split"] == "train"
    assert row["patient_id"] == hash_id(SECRET_ID, DEFAULT_SALT)


def test_manifest_by_uid_and_patient_id(dicom_folder, tmp_path):
    sop = str(pydicom.dcmread(dicom_folder / "b" / "3.dcm").SOPInstanceUID)
    csv = tmp_path / "uid.csv"
    csv.write_text(f"SOPInstanceUID,label\n{sop},x\n")
    df, skipped = dicom_folder_manifest(dicom_folder, csv, on_unlabelled="skip")
    assert df["label"].tolist() == ["x"] and len(skipped) == 2
    assert list(skipped.columns) == ["file", "reason"]
    csv.write_text(f"PatientID,label,patient_id\n{SECRET_ID},y,custom-7\nOTHER-1,z,\n")
    df, skipped = dicom_folder_manifest(dicom_folder, csv, on_unlabelled="skip", salt="s")
    assert sorted(df["label"]) == ["y", "z"]
    assert set(df["patient_id"]) == {hash_id("custom-7", "s"), hash_id("OTHER-1", "s")}


def test_manifest_without_csv_uses_subfolders(dicom_folder):
    df, _ = dicom_folder_manifest(dicom_folder, None)
    assert sorted(df["label"]) == ["a", "a", "b"]


def test_unlabelled_files_error_names_count_and_files(dicom_folder, tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\na/1.dcm,x\n")
    with pytest.raises(MedxferError) as info:
        dicom_folder_manifest(dicom_folder, csv)
    message = str(info.value)
    from medxfer.privacy import sample_id

    # pseudonymous ids, never the file names (they can hold patient names)
    assert message.startswith("2 DICOM files") and sample_id("a/IM2") in message and sample_id("b/3.dcm") in message
    assert "IM2" not in message and "3.dcm" not in message and "--on-unlabelled skip" in message


def test_manifest_csv_errors(dicom_folder, tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("path,labl\na/1.dcm,x\n")
    with pytest.raises(MedxferError, match="no 'label' column.*If 'labl' holds the labels, rename it to 'label'"):
        dicom_folder_manifest(dicom_folder, csv)
    csv.write_text("file,label\na/1.dcm,x\n")
    with pytest.raises(MedxferError, match="needs a key column"):
        dicom_folder_manifest(dicom_folder, csv)
    csv.write_text(f"PatientID,label\n{SECRET_ID},x\n{SECRET_ID},y\n")
    with pytest.raises(MedxferError, match="more than one label") as info:
        dicom_folder_manifest(dicom_folder, csv)
    assert SECRET_ID not in str(info.value)


def test_identifiers_never_leak(dicom_folder, tmp_path):
    """PatientName/PatientID/dates never appear in the manifest, warnings or error messages."""
    shutil.copy(fixture("CT_small.dcm"), dicom_folder / "b" / "ct.dcm")
    write_dicom(dicom_folder / "nopix.dcm", None)
    (dicom_folder / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 7)
    csv = tmp_path / "labels.csv"
    csv.write_text(f"PatientID,label\n{SECRET_ID},x\nnobody-matches,y\n")
    texts = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df, skipped = dicom_folder_manifest(dicom_folder, csv, on_unlabelled="skip")
        try:
            dicom_folder_manifest(dicom_folder, csv)
        except MedxferError as err:
            texts.append(str(err))
    texts += [str(w.message) for w in caught]
    for path in df["path"]:
        try:
            read_image(path)
        except BadFileError as err:
            texts.append(str(err))
    assert len(texts) >= 3  # an error, a warning, the pixel-less file
    texts += [df.to_csv(), skipped.to_csv(), repr(df)]
    for text in texts:
        for secret in (SECRET_NAME, SECRET_ID, "Zyxwvut", "19010203", "PID-XQ"):
            assert secret not in text, (secret, text)
    assert df["patient_id"].str.fullmatch(r"p-[0-9a-f]{12}").all()


def test_hash_id_properties(monkeypatch):
    assert hash_id("abc", "s1") == hash_id("abc ", "s1")
    assert hash_id("abc", "s1") != hash_id("abc", "s2")
    assert len(hash_id("abc", "s")) == 14 and hash_id("abc", "s").startswith("p-")
    monkeypatch.setenv("MEDXFER_SALT", "env-salt")
    assert hash_id("abc") == hash_id("abc", "env-salt")
    monkeypatch.delenv("MEDXFER_SALT")
    assert hash_id("abc") == hash_id("abc", DEFAULT_SALT)
