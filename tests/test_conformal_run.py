"""Conformal prediction sets and the class prior, wired into a run: train calibrates a Mondrian
record on validation after the temperature (model.json 'conformal'), test's coverage per class is in
metrics.json, predict gives each image its set, and --adapt-prior re-weights a batch to its own class mix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medxfer import Predictor

from medxfer.errors import MedxferError
from medxfer.runs import ModelMeta, Run, seal
from medxfer.trust.conformal import prediction_sets, set_text
from tests.faults.conftest import cli

TINY = ("--source", "test_resnet", "--weights", "none", "--epochs", "1", "--image-size", "32", "--bootstrap", "0",
        "--no-report")


def _train(data: Path, out: Path, *extra) -> Path:
    code, text = cli("train", "--data", data, *TINY, *extra, "--out", out)
    assert code == 0, text
    return out


@pytest.fixture(scope="module")
def conformal_run(small_npz, tmp_path_factory) -> Path:
    return _train(small_npz, tmp_path_factory.mktemp("conformal") / "run")


def test_model_json_holds_the_record_and_the_prior(conformal_run):
    meta = json.loads((conformal_run / "model.json").read_text())
    record = meta["conformal"]
    assert record["alpha"] == 0.1 and record["method"] == "mondrian" and record["task"] == "binary"
    assert record["classes"] == meta["labels"] and len(record["thresholds"]) == 2
    assert record["n"] == [20, 20]  # one threshold per class, from that class's validation images
    assert all(t is None or 0 <= t <= 1 for t in record["thresholds"])
    assert meta["prior"] == pytest.approx([0.5, 0.5])
    assert Run.load(conformal_run).model.conformal == record


def test_the_record_is_the_validation_quantile(conformal_run):
    """Each class's threshold is the ceil((n+1)(1-alpha))-th smallest 1 - p(class) of its validation images."""
    run = Run.load(conformal_run)
    val = run.predictions[run.predictions["split"] == "val"]
    for k, name in enumerate(run.model.labels):
        scores = np.sort(1 - val.loc[val["label"] == name, f"prob_{name}"].to_numpy())
        rank = int(np.ceil((len(scores) + 1) * 0.9))
        assert run.model.conformal["thresholds"][k] == pytest.approx(scores[rank - 1], abs=1e-6)


def test_metrics_test_has_coverage_per_class_and_selective_rows(conformal_run):
    test = json.loads((conformal_run / "metrics.json").read_text())["test"]
    c = test["conformal"]
    assert c["alpha"] == 0.1 and c["method"] == "mondrian"
    for rows in (c["by_class"], c["marginal"]):
        assert [r["class"] for r in rows] == [*json.loads((conformal_run / "model.json").read_text())["labels"], "all"]
        for r in rows:
            assert r["n"] == 20 or r["class"] == "all"
            assert r["ci"][0] <= r["coverage"] <= r["ci"][1] and 1 <= r["mean_set_size"] <= 2
    run = Run.load(conformal_run)
    t = run.test_predictions
    sets = prediction_sets(t[[f"prob_{c}" for c in run.model.labels]].to_numpy(), run.model.conformal)
    y = t["label"].map(run.model.labels.index).to_numpy()
    assert c["by_class"][-1]["covered"] == int(sets[np.arange(len(y)), y].sum())
    s = test["selective"]
    assert [r["target"] for r in s["at_coverage"]] == [1.0, 0.9, 0.8, 0.5] and s["decision"] == "threshold"
    assert s["at_coverage"][0]["n_kept"] == 40 and 0 <= s["aurc"] <= 1


def test_conformal_0_records_none(small_npz, tmp_path):
    run = _train(small_npz, tmp_path / "off", "--conformal", "0")
    meta = json.loads((run / "model.json").read_text())
    assert meta["conformal"] is None and meta["prior"] == pytest.approx([0.5, 0.5])
    assert "conformal" not in json.loads((run / "metrics.json").read_text())["test"]


def test_an_edited_record_is_refused_on_load(conformal_run, tmp_path):
    run = Path(shutil.copytree(conformal_run, tmp_path / "run"))
    meta = json.loads((run / "model.json").read_text())
    meta["conformal"]["alpha"] = 2
    (run / "model.json").write_text(json.dumps(meta))
    seal(run)  # even a deliberate (re-sealed) edit is range-checked
    with pytest.raises(MedxferError, match=r"conformal\.alpha must be a number between 0 and 1") as e:
        Run.load(run)
    assert "\n" not in str(e.value) and "model.json" in str(e.value)


@pytest.mark.parametrize("edit, words", [
    ({"alpha": 0}, "conformal.alpha"),
    ({"method": "pooled"}, "conformal.method"),
    ({"thresholds": [0.5, float("inf")]}, "conformal.thresholds"),
    ({"thresholds": [0.5]}, "conformal.thresholds"),
    ({"task": "multiclass"}, "conformal.task"),
    ({"classes": ["b", "a"]}, "conformal.classes"),
])
def test_record_values_out_of_range_are_refused(conformal_run, edit, words):
    meta = json.loads((conformal_run / "model.json").read_text())
    meta["conformal"].update(edit)
    with pytest.raises(MedxferError, match=words.replace(".", r"\.")):
        ModelMeta.from_dict(meta, "RUN/model.json")


@pytest.mark.parametrize("prior", [[0.5, 0.6], [1.0], [-0.5, 1.5], "half"])
def test_a_bad_prior_is_refused(conformal_run, prior):
    meta = json.loads((conformal_run / "model.json").read_text())
    with pytest.raises(MedxferError, match="prior"):
        ModelMeta.from_dict({**meta, "prior": prior}, "RUN/model.json")


def test_runs_of_earlier_releases_load_without_them(conformal_run):
    meta = json.loads((conformal_run / "model.json").read_text())
    old = ModelMeta.from_dict({k: v for k, v in meta.items() if k not in ("conformal", "prior")})
    assert old.conformal is None and old.prior is None


def test_set_text_of_the_record(conformal_run):
    record = Run.load(conformal_run).model.conformal
    sets = prediction_sets(np.array([[0.99, 0.01], [0.5, 0.5]]), record)
    assert set_text(sets, record["classes"])[0] == record["classes"][0]


# ------------------------------------------------------------------------------------------ predict
def test_predict_gives_each_image_its_set(conformal_run, small_npz, tmp_path):
    code, text = cli("predict", conformal_run, small_npz, "--out", tmp_path / "p.csv")
    assert code == 0, text
    df = pd.read_csv(tmp_path / "p.csv", dtype={"conformal_set": str})
    run = Run.load(conformal_run)
    labels = run.model.labels
    assert list(df.columns) == ["index", "sample_id", *(f"prob_{c}" for c in labels),
                                *(c for c in df.columns if c.startswith("threshold_")), "conformal_set", "predicted"]
    sets = prediction_sets(df[[f"prob_{c}" for c in labels]].to_numpy(), run.model.conformal)
    assert df["conformal_set"].tolist() == set_text(sets, labels)
    assert "-" not in set(df["conformal_set"])  # never empty: the most probable class at least


def test_predict_without_a_record_has_no_set_column(small_npz, tmp_path):
    run = _train(small_npz, tmp_path / "off", "--conformal", "0")
    df = Predictor(run).predict([small_npz])
    assert "conformal_set" not in df.columns and list(df.columns)[-1] == "predicted"


def _two_tones(path: Path) -> Path:
    """Class 0 dark, class 1 bright: a tiny linear probe separates them, so a batch's class mix is estimable."""
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", 80), ("val", 40), ("test", 40)):
        y = np.arange(n) % 2
        x = rng.normal(np.where(y == 1, 150, 90)[:, None, None], 30, (n, 28, 28))
        out[f"{split}_images"], out[f"{split}_labels"] = np.clip(x, 0, 255).astype(np.uint8), y[:, None]
    np.savez(path, **out)
    return path


def test_adapt_prior_moves_the_prevalence_towards_the_batchs_class(tmp_path):
    data = _two_tones(tmp_path / "tones.npz")
    run = _train(data, tmp_path / "run", "--strategy", "linear-probe", "--label-names", "dark,bright")
    src = np.load(data)
    bright = tmp_path / "bright.npz"
    keep = src["test_labels"][:, 0] == 1
    np.savez(bright, test_images=src["test_images"][keep], test_labels=src["test_labels"][keep])
    code, text = cli("predict", run, bright, "--adapt-prior", "--out", tmp_path / "p.csv")
    assert code == 0, text
    assert "estimated prevalence dark" in text and "EM converged" in text
    df = pd.read_csv(tmp_path / "p.csv")
    plain = Predictor(run).predict([bright])
    assert df["prob_bright"].mean() > plain["prob_bright"].mean()
    prevalence = float(df["prior_adapted"][0].split("bright=")[1][:5])
    assert prevalence > Run.load(run).model.prior[1] == 0.5
    assert (df["predicted"] == "bright").mean() >= (plain["predicted"] == "bright").mean()
    assert df["conformal_set"].tolist() == plain["conformal_set"].tolist()  # sets of the unadapted probabilities
    assert list(df.columns)[-2:] == ["prior_adapted", "predicted"]


def test_adapt_prior_needs_the_runs_prior(conformal_run, small_npz, tmp_path):
    run = Path(shutil.copytree(conformal_run, tmp_path / "run"))
    meta = json.loads((run / "model.json").read_text())
    meta["prior"] = None
    (run / "model.json").write_text(json.dumps(meta))
    seal(run)
    with pytest.raises(MedxferError, match="does not record .* train it again"):
        Predictor(run).predict([small_npz], adapt_prior=True)


# ------------------------------------------------------------------------------------- card and report
def test_the_card_says_what_the_sets_promise_and_their_coverage(conformal_run):
    card = (conformal_run / "model_card.md").read_text()
    section = card.split("## Prediction sets (conformal)")[1].split("\n## ")[0]
    assert "probability at least 0.90" in section and "exchangeable" in section and "does not hold" in section
    rows = json.loads((conformal_run / "metrics.json").read_text())["test"]["conformal"]["by_class"]
    assert f"{rows[0]['coverage']:.3f} ({rows[0]['ci'][0]:.3f}–{rows[0]['ci'][1]:.3f})" in section


def test_the_report_shows_the_coverage_table(conformal_run, tmp_path):
    from medxfer.evaluation.report import write_report

    run = Path(shutil.copytree(conformal_run, tmp_path / "run"))
    page = write_report(run, gradcam=False).read_text()
    assert "When not to trust a prediction" in page and "pooled threshold: coverage" in page
    assert "Referring the least certain cases" in page


# ------------------------------------------------------------------------------------- other tasks
@pytest.mark.parametrize("task", ["ordinal", "multilabel"])
def test_ordinal_and_multilabel_runs_have_their_sets(task, tmp_path):
    from conftest import ROOT, ordinal_npz

    if task == "ordinal":
        data, extra = ordinal_npz(tmp_path / "grades.npz"), ("--task", "ordinal")
    else:
        data, extra = ROOT / "data" / "cxr14_nih1000_64.npz", ()
    run = _train(data, tmp_path / "run", *extra, "--augment", "none")
    loaded = Run.load(run)
    record = loaded.model.conformal
    assert record["task"] == task and record["classes"] == loaded.model.labels
    test = json.loads((run / "metrics.json").read_text())["test"]
    assert test["conformal"]["by_class"][-1]["class"] == "all"
    assert (loaded.model.prior is None) == (task == "multilabel")
    assert ("selective" in test) == (task != "multilabel")
    arrays = np.load(data)
    x = arrays["test_images" if "test_images" in arrays.files else "images"][:8]
    df = Predictor(run).predict(x)
    sets = prediction_sets(df[[f"prob_{c}" for c in loaded.model.labels]].to_numpy(), record)
    assert df["conformal_set"].tolist() == set_text(sets, loaded.model.labels)
    if task == "ordinal":  # a contiguous range of grades
        assert all(np.ptp(np.flatnonzero(s)) + 1 == s.sum() for s in sets)


def test_an_ensemble_gets_its_own_record_from_its_calibrated_validation(conformal_run, small_npz, tmp_path):
    """An ensemble is calibrated again on validation (its own temperature), so its sets come from a record of
    its own probabilities, at the members' --conformal alpha."""
    other = _train(small_npz, tmp_path / "other", "--seed", "1")
    code, text = cli("ensemble", conformal_run, other, "--out", tmp_path / "ens", "--no-report")
    assert code == 0, text
    ens = Run.load(tmp_path / "ens")
    assert ens.model.conformal is not None and ens.model.conformal["alpha"] == 0.1
    assert ens.model.prior is not None and abs(sum(ens.model.prior) - 1) < 1e-9
    assert ens.model.conformal["thresholds"] != Run.load(conformal_run).model.conformal["thresholds"]
    assert "conformal" in ens.metrics["test"]
