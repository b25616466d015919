"""Large manifests: the array-based split, path resolution and duplicate grouping keep the old answers.

The splits were made by scikit-learn's StratifiedGroupKFold and per-row loops before; the pinned cases
below were computed with that code and must not change (a changed split moves images between train and
test for users who re-run with the same seed).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medxfer.data.duplicates import find_cross_split_duplicates, handle_duplicates, same_hash
from medxfer.data.manifest import Manifest
from medxfer.data.multilabel_split import multilabel_split
from medxfer.data import sources
from medxfer.data.sources import load_manifest, resolve_files
from medxfer.data.splits import assign_splits, grouped_folds
from medxfer.errors import MedxferError

CODE = {"train": "T", "val": "V", "test": "X"}


def _pinned_manifest() -> Manifest:
    rows = []
    for i in range(30):
        p = i // 2 if i < 20 else i - 10  # 10 patients of two images, 10 of one
        rows.append({"sample_id": f"s{i:02d}", "label": (p * 7) % 3 % 2, "row": i, "patient_id": f"p{p:02d}"})
    return Manifest(pd.DataFrame(rows), ["neg", "pos"], "pinned")


def test_pinned_split_is_what_the_old_code_gave():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few images per class for 20 parts: scikit-learn's warning, kept
        split = assign_splits(_pinned_manifest(), seed=3).table["split"]
    assert "".join(CODE[s] for s in split) == "TTTTTTTTTTVVTTTTTTVVXVXTTTTTXT"


def test_pinned_multilabel_split_is_what_the_old_code_gave():
    y = np.array([[(i * k) % 5 == 0 for k in range(1, 4)] for i in range(30)], int)
    split = multilabel_split(y, groups=[f"p{i // 2}" for i in range(30)], seed=3)
    assert "".join(CODE[s] for s in split) == "TTTTTTVVTTVVXXTTTTTTTTTTXXTTTT"


def test_grouped_folds_equal_scikit_learn():
    from sklearn.model_selection import StratifiedGroupKFold

    rng = np.random.default_rng(1)
    for seed in range(40):
        n, k = int(rng.integers(40, 300)), int(rng.integers(2, 12))
        y = rng.integers(0, int(rng.integers(2, 5)), n)
        groups = np.array([f"p{v}" for v in rng.integers(0, n // 2, n)], dtype=object)
        expected = np.full(n, -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, (_, idx) in enumerate(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(y, y, groups)):
                expected[idx] = i
            assert np.array_equal(grouped_folds(y, groups, k, seed), expected)


def _generated(n=20_000, seed=0) -> Manifest:
    rng = np.random.default_rng(seed)
    patient = np.sort(rng.integers(0, n // 3, n))
    label = (rng.random(patient.max() + 1) < 0.3)[patient].astype(int)
    t = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "label": label, "row": np.arange(n),
                      "patient_id": [f"p{p}" for p in patient]})
    return Manifest(t, ["neg", "pos"], "generated")


def test_generated_split_keeps_patients_whole_and_classes_balanced():
    m = _generated()
    a = assign_splits(m, seed=0).table
    assert (a.groupby("patient_id")["split"].nunique() == 1).all()
    share = a["split"].value_counts(normalize=True)
    assert abs(share["train"] - 0.7) < 0.02 and abs(share["val"] - 0.15) < 0.02 and abs(share["test"] - 0.15) < 0.02
    pos = a.groupby("split")["label"].mean()
    assert (abs(pos - a["label"].mean()) < 0.02).all()
    assert a["split"].equals(assign_splits(m, seed=0).table["split"])  # the same for the same seed
    assert not a["split"].equals(assign_splits(m, seed=1).table["split"])


def test_generated_multilabel_split_keeps_patients_whole():
    rng = np.random.default_rng(0)
    n = 20_000
    patient = np.sort(rng.integers(0, n // 3, n))
    y = (rng.random((patient.max() + 1, 14)) < np.linspace(0.01, 0.3, 14))[patient].astype(int)
    split = multilabel_split(y, groups=patient, seed=0)
    per = pd.DataFrame({"p": patient, "s": split}).groupby("p")["s"].nunique()
    assert (per == 1).all()
    for name, share in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        assert abs((split == name).mean() - share) < 0.02
        rate = y[split == name].mean(0) / y.mean(0)
        assert (abs(rate - 1) < 0.25).all()  # every finding's prevalence kept in each split
    assert np.array_equal(split, multilabel_split(y, groups=patient, seed=0))


def test_planted_duplicates_across_splits_are_found(monkeypatch):
    a = assign_splits(_generated(), seed=0)
    split = a.table["split"].to_numpy()
    hashes = [f"{i:032x}" for i in range(len(split))]
    train, test, val = (np.flatnonzero(split == s) for s in ("train", "test", "val"))
    for j, (x, y) in enumerate(zip(train[:50], test[:50])):
        hashes[y] = hashes[x]
    hashes[val[0]] = hashes[train[0]]            # one group of three: train, val, test
    hashes[train[60]] = hashes[train[61]]        # a copy within train: not reported
    import medxfer.data.duplicates as dup
    monkeypatch.setattr(dup, "pixel_hashes", lambda images: hashes)
    groups = find_cross_split_duplicates(a, np.zeros((len(hashes), 1), np.uint8))
    assert len(groups) == 50 and groups[0]["count"] == 3 and groups[0]["splits"] == ["train", "val", "test"]
    keep, table = handle_duplicates(a, np.zeros((len(hashes), 1), np.uint8))
    assert (~keep).sum() == 51 and not keep[train[:50]].any() and keep[test[:50]].all()
    assert len(table) == 101


def test_same_hash_groups_in_first_appearance_order():
    assert same_hash(["a", "b", "a", "c", "b", "a"]) == [[0, 2, 5], [1, 4]]
    assert same_hash(["a", "b"]) == []


@pytest.mark.parametrize("list_rows", [1, 10_000])  # folders listed with scandir, or one lstat per row
def test_resolve_files_agrees_with_realpath_and_exists(tmp_path, monkeypatch, list_rows):
    monkeypatch.setattr(sources, "LIST_FOLDER_ROWS", list_rows)
    (tmp_path / "d").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "d" / "a.png")
    os.symlink(tmp_path / "d" / "a.png", tmp_path / "d" / "link.png")
    os.symlink(tmp_path / "d", tmp_path / "dirlink")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "d" / "broken.png")
    rel = ["d/a.png", "./d/a.png", "d/../d/a.png", "dirlink/a.png", "d/link.png", "d/broken.png", "d/none.png",
           "none/a.png", str(tmp_path / "d" / "a.png"), "d/a.png/", "d//a.png"]
    files, absent = resolve_files(tmp_path, rel)
    assert files == [os.path.realpath(tmp_path / p) for p in rel]
    assert absent.tolist() == [i for i, p in enumerate(rel) if not (tmp_path / p).resolve().exists()]


def test_absent_and_repeated_rows_keep_their_messages(tmp_path):
    for name in ("a", "b"):
        Image.new("L", (4, 4)).save(tmp_path / f"{name}.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "c.png")
    pd.DataFrame({"path": ["a.png", "c.png", "x.png"], "label": [0, 1, 1]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(MedxferError, match=r"^2 files listed in '.*m.csv' do not exist \(first: data row 2; 1 of them "
                                           r"broken or looping links\); paths are relative"):
        load_manifest(tmp_path / "m.csv")
    pd.DataFrame({"path": ["a.png", "b.png", "./a.png", "a.png"], "label": [0, 1, 1, 0]}).to_csv(tmp_path / "r.csv",
                                                                                                 index=False)
    with pytest.raises(MedxferError, match=r"lists 1 file twice \(2 repeated rows; first: data row 3 names the same "
                                           r"file as data row 1, another spelling"):
        load_manifest(tmp_path / "r.csv")


def test_labels_and_patients_read_as_before(tmp_path):
    for i in range(6):
        Image.new("L", (4, 4)).save(tmp_path / f"{i}.png")
    pd.DataFrame({"path": [f"{i}.png" for i in range(6)], "label": ["1", "1.0", "0", "0", "+1", "0"],
                  "patient_id": ["A", "A", " ", None, "7", "B"]}).to_csv(tmp_path / "m.csv", index=False)
    m = load_manifest(tmp_path / "m.csv")
    assert m.labels == ["0", "1"] and m.table["label"].tolist() == [1, 1, 0, 0, 1, 0]
    pid = m.table["patient_id"].tolist()
    assert pid[0] == pid[1] and pid[0].startswith("p-") and pd.isna(pid[2]) and pd.isna(pid[3]) and pid[4] != pid[5]
    pd.DataFrame({"path": ["0.png", "1.png"], "label": ["0.5", "1"]}).to_csv(tmp_path / "f.csv", index=False)
    with pytest.raises(MedxferError, match=r"label 0.5 in .* is a fraction"):
        load_manifest(tmp_path / "f.csv")
