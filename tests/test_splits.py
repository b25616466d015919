"""Patient-aware splits: leakage in given splits refused (keys hashed), grouped stratified k-fold."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medxfer.cli import main
from medxfer.data.manifest import Manifest
from medxfer.data.sources import load_manifest
from medxfer.data.splits import assign_splits, kfold
from medxfer.errors import MedxferError
from medxfer.privacy import hash_id

RAW = "MRN-SMITH-{:04d}"


def patients_manifest(n_patients=60, seed=0, pos_rate=0.3, hashed=True):
    """Patient-level labels, 1-6 images per patient, patient ids hashed as the sources do."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = int(rng.random() < pos_rate)
        for j in range(int(rng.integers(1, 7))):
            pid = RAW.format(p)
            rows.append({"sample_id": f"img_{p}_{j}", "label": label, "row": len(rows),
                         "patient_id": hash_id(pid) if hashed else pid})
    return Manifest(pd.DataFrame(rows), ["neg", "pos"], "test")


def leaky_csv(tmp_path, n_leaked=2):
    """A CSV manifest whose split column puts ``n_leaked`` patients in two splits."""
    rows = []
    for p in range(12):
        split = ["train", "train", "val", "test"][p % 4]
        for j in range(3):
            s = "test" if (p < n_leaked and j == 2 and split != "test") else split
            rows.append({"path": f"p{p}_{j}.png", "label": p % 2, "patient_id": RAW.format(p), "split": s})
    from PIL import Image

    for r in rows:
        Image.fromarray(np.full((8, 8), 10 * len(r["path"]), np.uint8)).save(tmp_path / r["path"])
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    return tmp_path / "m.csv"


def test_leaky_given_splits_refused_with_count_and_hashed_keys(tmp_path):
    m = load_manifest(leaky_csv(tmp_path))
    with pytest.raises(MedxferError) as info:
        assign_splits(m)
    msg = str(info.value)
    assert msg.startswith("2 patients appear in more than one split (first, hashed: p-")
    assert "MRN" not in msg and "SMITH" not in msg
    assert RAW.format(0) not in msg and RAW.format(1) not in msg


def test_leak_message_shows_the_ids_written_in_split_csv(tmp_path):
    """The hashed key in the message must be the patient_id the user sees in split.csv."""
    m = load_manifest(leaky_csv(tmp_path))
    with pytest.raises(MedxferError) as info:
        assign_splits(m)
    assert hash_id(RAW.format(0)) in str(info.value)


def test_leaky_splits_exit_2_one_line_via_cli(tmp_path, capsys):
    code = main(["train", "--data", str(leaky_csv(tmp_path)), "--source", "test_resnet", "--weights", "none",
                 "--epochs", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert err.startswith("medxfer: 2 patients appear in more than one split") and "MRN" not in err
    assert not (tmp_path / "run").exists()


def test_split_by_none_skips_the_patient_check(tmp_path):
    m = load_manifest(leaky_csv(tmp_path))
    assert assign_splits(m, split_by="none") is m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kfold_groups_patients_and_stratifies(seed):
    m = patients_manifest(80, seed=seed)
    t = m.table.assign(fold=kfold(m, k=5, seed=seed))
    assert set(t["fold"]) == {0, 1, 2, 3, 4}
    assert (t.groupby("patient_id")["fold"].nunique() == 1).all()
    overall = t["label"].mean()
    per_fold = t.groupby("fold")["label"].mean()
    assert (per_fold - overall).abs().max() < 0.1, per_fold.to_dict()
    sizes = t["fold"].value_counts()
    assert sizes.min() > 0.5 * len(t) / 5


def test_kfold_without_patients_is_exactly_stratified():
    y = np.array([0] * 30 + [1] * 70)
    m = Manifest(pd.DataFrame({"sample_id": [str(i) for i in range(100)], "label": y, "row": range(100)}),
                 ["a", "b"], "test")
    fold = kfold(m, k=5, seed=0)
    for f in range(5):
        assert np.bincount(y[fold == f]).tolist() == [6, 14]


def test_kfold_refuses_fewer_patients_than_folds_and_k_below_2():
    m = patients_manifest(4)
    with pytest.raises(MedxferError, match="only 4 patients"):
        kfold(m, k=5)
    with pytest.raises(MedxferError, match="at least 2"):
        kfold(m, k=1)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_assign_splits_never_leaks_patients(seed):
    m = patients_manifest(60, seed=seed)
    t = assign_splits(m, seed=seed).table
    assert set(t["split"]) == {"train", "val", "test"}
    assert (t.groupby("patient_id")["split"].nunique() == 1).all()
    frac = t["split"].value_counts(normalize=True)
    assert 0.55 < frac["train"] < 0.85 and 0.05 < frac["test"] < 0.3 and 0.05 < frac["val"] < 0.3
    # both classes in every split
    assert (t.groupby("split")["label"].nunique() == 2).all()


def test_assign_splits_keeps_clean_given_splits():
    m = patients_manifest(30)
    pids = sorted(m.table["patient_id"].unique())
    role = {p: ["train", "train", "val", "test"][i % 4] for i, p in enumerate(pids)}
    m.table["split"] = m.table["patient_id"].map(role)
    assert assign_splits(m) is m


# ------------------------------------------------------------------- known gaps (lead to-dos)


def test_rows_without_patient_id_are_their_own_group():
    m = patients_manifest(40)
    m.table.loc[m.table.index % 3 == 0, "patient_id"] = None
    t = assign_splits(m).table
    assert set(t["split"]) == {"train", "val", "test"}
    assert t.loc[t["patient_id"].isna(), "split"].nunique() == 3      # not lumped into one "None" patient


def test_small_patient_grouped_split():
    m = patients_manifest(12, pos_rate=0.5)
    t = assign_splits(m).table
    assert set(t["split"]) == {"train", "val", "test"}
    assert (t.groupby("patient_id")["split"].nunique() == 1).all()


def test_small_dataset_splits_or_says_why():
    m = Manifest(pd.DataFrame({"sample_id": [str(i) for i in range(30)], "label": [0, 1] * 15,
                               "row": range(30)}), ["a", "b"], "test")
    try:
        t = assign_splits(m).table
    except MedxferError:
        return
    assert set(t["split"]) == {"train", "val", "test"}


def test_small_class_mostly_in_train():
    y = np.array([0] * 10 + [1] * 90)
    m = Manifest(pd.DataFrame({"sample_id": [str(i) for i in range(100)], "label": y, "row": range(100)}),
                 ["a", "b"], "test")
    t = assign_splits(m).table
    assert (t[t["label"] == 0]["split"] == "train").sum() >= 6
