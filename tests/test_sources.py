"""Data sources: npz, class folders (8- and 16-bit PNG), CSV manifests; one-line CLI errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medxfer.cli import main
from medxfer.data.loading import load_images
from medxfer.data.sources import load_manifest
from medxfer.errors import MedxferError
from medxfer.privacy import hash_id, sample_id

TRAIN = ["--source", "test_resnet", "--weights", "none", "--epochs", "1", "--image-size", "16"]


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(["train", *args])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line(code, err, *texts):
    assert code == 2, err
    assert err.startswith("medxfer: ") and "\n" not in err and "Traceback" not in err, err
    for t in texts:
        assert t in err, err


def gradient16(h=20, w=24, top=4000) -> np.ndarray:
    return (np.linspace(0, top, w)[None, :].repeat(h, 0)).astype(np.uint16)


@pytest.fixture
def class_folders(tmp_path):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for cls, n in (("benign", 4), ("malignant", 3)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(root / cls / f"{i}.png")
    Image.fromarray(gradient16()).save(root / "malignant" / "x16.png")          # 16-bit grey PNG
    (root / "malignant" / "notes.txt").write_text("not an image")
    (root / "benign" / ".DS_Store").write_bytes(b"\0")
    return root


def test_npz_missing_keys_exit_2(tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.zeros(4))
    code, err = run_cli(capsys, "--data", str(tmp_path / "bad.npz"), *TRAIN)
    assert_one_line(code, err, "bad.npz", "needs train_images and train_labels", "or images and labels", "'x'")


def test_npz_not_an_archive_exit_2(tmp_path, capsys):
    (tmp_path / "x.npz").write_bytes(b"garbage")
    assert_one_line(*run_cli(capsys, "--data", str(tmp_path / "x.npz"), *TRAIN), "cannot read npz")


def test_class_folders_with_16_bit_png(class_folders):
    m = load_manifest(class_folders)
    t = m.table
    assert m.labels == ["benign", "malignant"] and len(t) == 8
    assert t["label"].tolist() == [0] * 4 + [1] * 4 and not m.has_splits
    assert any("ignored 1 files" in n for n in m.notes) and not any("notes.txt" in n for n in m.notes)
    loaded = load_images(m, 16)
    assert str(loaded.images.dtype) == "torch.uint8" and tuple(loaded.images.shape) == (8, 1, 16, 16)
    x16 = loaded.images[t.index[t["sample_id"] == sample_id("malignant/x16.png")][0], 0].numpy().astype(int)
    row = x16[8]
    assert row[0] < 20 and row[-1] > 235                 # full 16-bit range kept, not cast to 8 bit
    assert (np.diff(row) >= 0).all() and len(np.unique(row)) > 10


def test_class_folders_with_split_folders(tmp_path):
    rng = np.random.default_rng(1)
    for split in ("train", "val", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    m = load_manifest(tmp_path)
    assert m.has_splits and m.table["split"].value_counts().to_dict() == {"train": 4, "val": 4, "test": 4}


def test_csv_manifest_relative_paths_patients_splits(tmp_path):
    (tmp_path / "sub").mkdir()
    rng = np.random.default_rng(2)
    rows = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)).save(tmp_path / "sub" / f"{i}.png")
        rows.append({"path": f"sub/{i}.png", "label": ["cat", "dog"][i % 2], "patient_id": f"PAT-{i // 2}",
                     "split": ["train", "train", "val", "val", "test", "test"][i]})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    m = load_manifest(tmp_path / "labels.csv")
    t = m.table
    assert m.labels == ["cat", "dog"] and t["label"].tolist() == [0, 1] * 3
    assert t["path"].tolist() == [str((tmp_path / "sub" / f"{i}.png").resolve()) for i in range(6)]
    assert t["sample_id"].tolist() == [sample_id(f"sub/{i}.png") for i in range(6)]  # pseudonymous
    assert t["patient_id"].tolist() == [hash_id(f"PAT-{i // 2}") for i in range(6)]
    assert m.has_splits and m.has_patients and t["split"].tolist() == [r["split"] for r in rows]
    assert load_images(m, 8).images.shape[0] == 6


def test_csv_manifest_missing_file_and_column(tmp_path, capsys):
    pd.DataFrame({"path": ["nope.png"], "label": [0]}).to_csv(tmp_path / "a.csv", index=False)
    assert_one_line(*run_cli(capsys, "--data", str(tmp_path / "a.csv"), *TRAIN), "data row 1", "do not exist")
    pd.DataFrame({"file": ["x.png"], "label": [0]}).to_csv(tmp_path / "b.csv", index=False)
    assert_one_line(*run_cli(capsys, "--data", str(tmp_path / "b.csv"), *TRAIN), "lacks column(s) ['path']")


def test_one_class_exit_2(tmp_path, capsys):
    for i in range(4):
        Image.fromarray(np.full((8, 8), i * 40, np.uint8)).save(tmp_path / f"{i}.png")
    pd.DataFrame({"path": [f"{i}.png" for i in range(4)], "label": ["benign"] * 4}).to_csv(tmp_path / "m.csv",
                                                                                           index=False)
    assert_one_line(*run_cli(capsys, "--data", str(tmp_path / "m.csv"), *TRAIN), "one class only ('benign')")


def test_unknown_source_did_you_mean(class_folders, capsys):
    code, err = run_cli(capsys, "--data", str(class_folders), "--source", "efficientnet_lite0.in1kk",
                        "--out", str(class_folders.parent / "run"))
    assert_one_line(code, err, "unknown source 'efficientnet_lite0.in1kk'", "Did you mean")


def test_unknown_strategy_exit_2(class_folders, capsys):
    code, err = run_cli(capsys, "--data", str(class_folders), *TRAIN, "--strategy", "fine-tune")
    assert_one_line(code, err, "'strategy' parameter must be one of", "'linear-probe', 'partial', 'full', 'lp-ft', 'scratch'")


def test_missing_path_exit_2(tmp_path, capsys):
    code, err = run_cli(capsys, "--data", str(tmp_path / "nowhere"), *TRAIN)
    assert_one_line(code, err, "nowhere' does not exist")
    assert not (tmp_path / "runs").exists()


def test_unsupported_data_file_exit_2(tmp_path, capsys):
    (tmp_path / "x.zip").write_bytes(b"PK")
    assert_one_line(*run_cli(capsys, "--data", str(tmp_path / "x.zip"), *TRAIN), "has suffix '.zip'")


# ------------------------------------------------------------------ names that are not UTF-8, signed labels, manifests
def test_sample_id_of_a_file_name_that_is_not_utf8():
    import hashlib
    import os

    from medxfer.privacy import default_salt

    name = os.fsdecode(b"train/a/img_\xff.png")               # what os.listdir gives for such a name on Linux
    assert sample_id(name).startswith("s-") and sample_id(name) != sample_id(os.fsdecode(b"train/a/img_\xfe.png"))
    assert sample_id(os.fsencode(name)) == sample_id(name)    # the raw bytes of the name are what is hashed
    text = "train/a/Éva_1.png"                                  # valid UTF-8: the id stays what it always was
    old = "s-" + hashlib.sha256(f"{default_salt()}\x00sample\x00{text}".encode("utf-8")).hexdigest()[:16]
    assert sample_id(text) == old and sample_id(text.encode()) == old


def test_folder_with_a_file_name_that_is_not_utf8(tmp_path):
    import os

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    odd = os.fsdecode(os.fsencode(str(tmp_path / "a")) + b"/img_\xff.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(odd)
    m = load_manifest(tmp_path)
    assert len(m.table) == 5 and m.table["sample_id"].is_unique
    assert load_images(m, 8).images.shape[0] == 5


def test_signed_and_decimal_labels_sort_as_numbers():
    from medxfer.data.manifest import labels_from_values, multilabel_from_text

    y, names = labels_from_values(pd.Series([1, -1, -1, 1]), None, "x")
    assert names == ["-1", "1"] and y.tolist() == [1, 0, 0, 1]          # the positive class (the last) is 1
    assert labels_from_values(pd.Series(["1", "-1", "0", "0"]), None, "x")[1] == ["-1", "0", "1"]   # grades
    assert labels_from_values(pd.Series(["+2", "10", "-3.0", "2"]), None, "x")[1] == ["-3", "2", "10"]
    assert labels_from_values(pd.Series(["1_0", "10"]), None, "x")[1] == ["10", "1_0"]  # '1_0' is a name, not 10
    assert multilabel_from_text(pd.Series(["2.5|10", "-1", "b"]), None, None, "x")[1] == ["-1", "2.5", "10", "b"]


def test_the_class_order_of_numeric_labels_is_said(tmp_path):
    for i in range(4):
        Image.fromarray(np.full((8, 8), i * 40, np.uint8)).save(tmp_path / f"{i}.png")
    pd.DataFrame({"path": [f"{i}.png" for i in range(4)], "label": [1, -1, 1, -1]}).to_csv(tmp_path / "m.csv",
                                                                                            index=False)
    m = load_manifest(tmp_path / "m.csv")
    assert m.labels == ["-1", "1"] and any("-1 < 1" in n for n in m.notes)


def test_one_file_under_two_spellings_in_a_manifest_is_refused(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), i * 40, np.uint8)).save(tmp_path / "img" / f"{i}.png")
    paths = ["./img/0.png", "img/1.png", "img/2.png", "img/../img/0.png", "img/3.png"]
    pd.DataFrame({"path": paths, "label": [0, 1, 0, 0, 1]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(MedxferError, match=r"1 file twice.*data row 4 .*data row 1") as e:
        load_manifest(tmp_path / "m.csv")
    assert "img/0.png" not in str(e.value)                    # rows by number, never by path


def _parquet(tmp_path, labels) -> Path:
    rows = []
    for i, lab in enumerate(labels):
        Image.fromarray(np.full((8, 8), i * 20, np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"path": f"{i}.png", "label": lab})
    pd.DataFrame(rows).to_parquet(tmp_path / "m.parquet")
    return tmp_path / "m.parquet"


def test_parquet_list_labels_of_one_element_are_that_element(tmp_path):
    m = load_manifest(_parquet(tmp_path, [["benign"], ["malignant"], ["benign"], ["malignant"]]))
    assert m.labels == ["benign", "malignant"] and not m.multilabel
    assert m.table["label"].tolist() == [0, 1, 0, 1]


def test_parquet_list_labels_of_several_elements_are_findings(tmp_path):
    m = load_manifest(_parquet(tmp_path, [["Edema", "Effusion"], ["Edema"], ["Effusion"], ["Edema"]]))
    assert m.multilabel and m.labels == ["Edema", "Effusion"]
    assert m.targets().tolist() == [[1, 1], [1, 0], [0, 1], [1, 0]]


def test_parquet_empty_list_label_is_refused_like_an_empty_cell(tmp_path):
    with pytest.raises(MedxferError, match="empty label"):
        load_manifest(_parquet(tmp_path, [["Edema", "Effusion"], [], ["Effusion"], ["Edema"]]))


def test_csv_findings_separated_by_bars_are_multilabel(tmp_path):
    for i in range(4):
        Image.fromarray(np.full((8, 8), i * 40, np.uint8)).save(tmp_path / f"{i}.png")
    pd.DataFrame({"path": [f"{i}.png" for i in range(4)], "label": ["a", "b", "a|b", "b"]}).to_csv(tmp_path / "m.csv",
                                                                                                  index=False)
    m = load_manifest(tmp_path / "m.csv")                     # pandas 3 reads text as 'str', not object
    assert m.multilabel and m.labels == ["a", "b"]
