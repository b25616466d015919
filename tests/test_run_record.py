"""A run's hash record (files.sha256) and the values read back from its files: every writer makes the record,
export amends it under the run's lock, and every reader goes through Run.load's checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medxfer.errors import MedxferError
from medxfer.runs import ModelMeta, Run, seal
from tests.faults.conftest import cli

BASE = {"arch": "test_resnet", "labels": ["a", "b"], "in_chans": 1, "data_chans": 1, "image_size": 32, "mean": [0.5],
        "std": [0.5], "task": "binary", "positive_label": "a", "threshold": 0.4, "temperature": 1.2, "tta": 4}


def _record(run: Path) -> dict:
    lines = (run / "files.sha256").read_text().splitlines()
    return {ln.split("  ", 1)[1]: ln.split("  ", 1)[0] for ln in lines}


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def test_train_records_every_file_the_answers_depend_on(run):
    names = set(_record(run))
    assert {"config.yaml", "model.json", "model.safetensors", "metrics.json", "predictions.csv", "split.csv",
            "history.csv"} <= names
    assert not names & {"report.html", "model_card.md", "train.log"}  # outputs made from the record, not inputs
    assert json.loads((run / "model.json").read_text())["hashes"] == "files.sha256"


@pytest.mark.parametrize("name", ["model.json", "metrics.json", "predictions.csv", "split.csv", "history.csv",
                                  "config.yaml"])
def test_any_edit_is_refused_by_run_load(run, name):
    path = run / name
    path.write_text(path.read_text().replace("0", "1", 1))
    with pytest.raises(MedxferError, match=name.replace(".", r"\.")):
        Run.load(run)


def test_a_table_added_after_the_run_is_refused(run):
    (run / "skipped.csv").write_text("sample_id,reason\ns-1,truncated\n")
    with pytest.raises(MedxferError, match="skipped.csv"):
        Run.load(run)


def test_a_damaged_record_is_one_line(run):
    (run / "files.sha256").write_text("not a record\n")
    with pytest.raises(MedxferError, match="files.sha256"):
        Run.load(run)


def test_sealing_again_accepts_a_deliberate_edit(run):
    (run / "metrics.json").write_text((run / "metrics.json").read_text().replace('"seed": 0', '"seed": 7'))
    seal(run)
    assert Run.load(run).metrics["seed"] == 7


def test_export_amends_the_record_and_keeps_it_checked(run):
    before = _record(run)
    code, text = cli("export", run)
    assert code == 0, text
    rec = _record(run)
    assert "model.onnx" in rec and rec["model.json"] != before["model.json"]
    assert {k: v for k, v in rec.items() if k not in ("model.json", "model.onnx")} == \
        {k: v for k, v in before.items() if k != "model.json"}
    Run.load(run)                                        # model.json's onnx_sha256 and the record agree
    code, text = cli("predict", run, _data(run), "--engine", "onnx", "--out", run.parent / "p.csv")
    assert code == 0, text


def test_export_does_not_bless_an_edit_made_before_it(run):
    meta = json.loads((run / "model.json").read_text())
    meta["threshold"] = 0.9
    (run / "model.json").write_text(json.dumps(meta))
    code, text = cli("export", run)
    assert code == 2 and "model.json" in text, text
    assert "model.onnx" not in _record(run) and not (run / "model.onnx").exists()


def test_an_ensemble_has_its_record(run, tmp_path):
    from medxfer.ensemble import build_ensemble

    other = Path(shutil.copytree(run, tmp_path / "other"))
    ens = build_ensemble([run, other], tmp_path / "ens", method="uniform", report=False, bootstrap=0)
    assert {"model.json", "model.safetensors", "metrics.json", "predictions.csv"} <= set(_record(ens.dir))
    (ens.dir / "metrics.json").write_text((ens.dir / "metrics.json").read_text().replace("0", "1", 1))
    with pytest.raises(MedxferError, match="metrics.json"):
        Run.load(ens.dir)


def _data(run: Path) -> str:
    return Run.load(run).config.data.path


# ------------------------------------------------------------------------------------ values read back
@pytest.mark.parametrize("edit, words", [
    ({"labels": ["a", "a"]}, "labels"),
    ({"labels": ["a", 3]}, "labels"),
    ({"labels": "ab"}, "labels"),
    ({"image_size": 0}, "image_size"),
    ({"image_size": 10**6}, "image_size"),
    ({"image_size": True}, "image_size"),
    ({"tta": -3}, "tta"),
    ({"tta": 1.5}, "tta"),
    ({"temperature": 0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": "inf"}, "temperature"),
    ({"threshold": 7.5}, "threshold"),
    ({"threshold": [0.5, 0.5]}, "threshold"),
    ({"positive_label": "c"}, "positive_label"),
    ({"task": "regression"}, "task"),
    ({"task": "binary", "labels": ["a", "b", "c"], "positive_label": None}, "task"),
    ({"spatial_dims": 4}, "spatial_dims"),
    ({"inflate": "x"}, "inflate"),
    ({"mean": [0.5, 0.5]}, "mean"),
    ({"std": [0.0]}, "std"),
    ({"in_chans": 0}, "in_chans"),
    ({"data_chans": "1"}, "data_chans"),
    ({"grey_mode": "average"}, "grey_mode"),
    ({"read": {"window": "sideways"}}, "read"),
    ({"read": ["auto"]}, "read"),
    ({"weights_sha256": "abc"}, "weights_sha256"),
    ({"input_dtype": "uint7"}, "input_dtype"),
    ({"input_dtype": 8}, "input_dtype"),
    ({"tta_hflip": "yes"}, "tta_hflip"),
])
def test_values_out_of_range_are_refused(edit, words):
    with pytest.raises(MedxferError, match=words) as e:
        ModelMeta.from_dict({**BASE, **edit}, "RUN/model.json")
    assert "RUN/model.json" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("edit", [
    {},
    {"input_dtype": "uint16"}, {"input_dtype": "float32"}, {"input_dtype": None},
    {"task": "multilabel", "threshold": [0.2, 0.7], "temperature": [1.0, 2.0], "positive_label": None},
    {"task": "multiclass", "labels": ["a", "b", "c"], "threshold": None, "positive_label": None},
    {"task": "ordinal", "labels": ["0", "1", "2"], "threshold": None, "positive_label": None},
    {"spatial_dims": 3, "inflate": "acs", "tta": 1},
    {"grey_mode": "replicate", "in_chans": 3, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.2, 0.2]},
    {"grey_mode": "rgb", "in_chans": 3, "data_chans": 3, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.2, 0.2]},
])
def test_values_in_range_are_kept(edit):
    meta = ModelMeta.from_dict({**BASE, **edit})
    assert meta.to_dict()["labels"] == {**BASE, **edit}["labels"]


def test_an_ensembles_members_are_checked():
    member = {"arch": "test_resnet", "in_chans": 1, "data_chans": 1, "image_size": 32, "mean": [0.5], "std": [0.5],
              "temperature": 1.0, "tta": 1, "weight": 1.0}
    ok = {**BASE, "arch": "ensemble", "members": [member]}
    assert ModelMeta.from_dict(ok).members == [member]
    for bad in ({"weight": 0}, {"temperature": 0}, {"image_size": -1}, {"tta": 0}):
        with pytest.raises(MedxferError, match="members"):
            ModelMeta.from_dict({**ok, "members": [{**member, **bad}]})
    with pytest.raises(MedxferError, match="members"):
        ModelMeta.from_dict({**ok, "members": []})
