"""``medxfer audit`` end to end on the bundled BreastMNIST: the conflicting train/test duplicate is found,
the suspects are written by sample id (never a file name), and bad options are one line."""

import csv
import json
from pathlib import Path

import pytest

import medxfer
from medxfer.cli import main

BREAST = Path(medxfer.__file__).parent / "datasets" / "breastmnist_28.npz"


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    code = main(["audit", "--data", str(BREAST), "--out", str(tmp / "out"), "--image-size", "32",
                 "--source", "test_resnet.pneumoniamnist", "--cache-dir", str(tmp / "cache"), "--quiet"])
    return code, tmp / "out"


def test_audit_finds_the_conflicting_duplicate_and_writes_suspects(audited, capsys):
    code, out = audited
    assert code == 0
    with open(out / "duplicate_conflicts.csv") as f:
        dups = list(csv.DictReader(f))
    assert [(d["sample_id"], d["split"], d["label"]) for d in dups] == [("train/000115", "train", "0"),
                                                                           ("test/000076", "test", "1")]
    with open(out / "label_issues.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == ["rank", "sample_id", "split", "given_label", "suspected_label",
                                      "self_confidence", "suspected_probability"]
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    assert all(r["split"] == "train" and r["given_label"] != r["suspected_label"] for r in rows)
    conf = [float(r["self_confidence"]) for r in rows]
    assert conf == sorted(conf) and conf[0] < 0.5
    record = json.loads((out / "audit.json").read_text())
    assert record["n_audited"] == 546 and record["suspected"] == len(rows)
    assert record["duplicate_conflicts"][0]["labels"] == ["0", "1"]
    for name in ("label_issues.csv", "duplicate_conflicts.csv", "audit.json"):
        assert "breastmnist" not in (out / name).read_text()     # no file names in outputs


def test_audit_refuses_to_overwrite_foreign_files_and_bad_splits(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "label_issues.csv").write_text("mine\n")
    assert main(["audit", "--data", str(BREAST), "--out", str(out), "--source", "test_resnet.pneumoniamnist"]) == 2
    assert "label_issues.csv" in capsys.readouterr().err
    assert main(["audit", "--data", str(BREAST), "--out", str(tmp_path / "o"), "--splits", "trian"]) == 2
    err = capsys.readouterr().err
    assert "--splits" in err and "train" in err
