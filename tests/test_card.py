"""The model card: sections, numbers as in metrics.json, limitations from the data, no sample or patient ids."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from medxfer import files
from medxfer.evaluation.card import CARD_FILE, card_text, limitations, write_model_card
from medxfer.evaluation.subgroups import run_subgroups, write_subgroups
from medxfer.privacy import hash_id, sample_id
from medxfer.runs import Run, seal
from tests.conftest import BREAST

SECTIONS = ("## Model details", "## Intended use and out-of-scope use", "### Intended use", "### Out-of-scope use",
            "## Training data", "## Evaluation", "## Limitations and known failure cases")


def quick_run(data: Path, out: Path, *extra: str) -> Path:
    """A finished run of a tiny random-init model in a few seconds (no report: that is what costs time)."""
    from medxfer.cli import main

    assert main(["train", "--data", str(data), "--source", "test_resnet", "--weights", "none", "--epochs", "2",
                 "--image-size", "32", "--bootstrap", "50", "--no-report", "--label-names", "malignant,benign",
                 "--positive-label", "malignant", "--augment", "none", "--num-threads", "1", "--out", str(out), "-q",
                 *extra]) == 0
    return out




def _edit_metrics(run_dir: Path, **test) -> None:
    m = files.read_json(run_dir / "metrics.json")
    m["test"].update(test)
    files.write_json(run_dir / "metrics.json", m)
    seal(run_dir)  # a run written with these results


@pytest.fixture(scope="module")
def patient_run(tmp_path_factory) -> tuple[Path, Path, pd.DataFrame]:
    """A run from a CSV manifest of PNGs named like patients, with raw patient ids and a site column."""
    root = tmp_path_factory.mktemp("patients")
    src = np.load(BREAST)
    rows, k = [], 0
    for split, n in (("train", 64), ("val", 24), ("test", 24)):
        x, y = src[f"{split}_images"], src[f"{split}_labels"][:, 0]
        idx = np.concatenate([np.flatnonzero(y == c)[: n // 2] for c in (0, 1)])
        for j, i in enumerate(idx):
            patient = k + j // 2                      # two images per patient, one label, one split
            name = f"Doe_Jane_{split}_{j:03d}.png"
            Image.fromarray(x[i]).save(root / name)
            rows.append({"path": name, "label": ["malignant", "benign"][int(y[i])], "split": split,
                         "patient_id": f"MRN-{patient:05d}", "site": "AB"[j % 2]})
        k += n
    table = pd.DataFrame(rows)
    table.to_csv(root / "manifest.csv", index=False)
    return quick_run(root / "manifest.csv", root / "run"), root, table


@pytest.fixture
def run_copy(patient_run, tmp_path) -> Path:
    return Path(shutil.copytree(patient_run[0], tmp_path / "run"))


def test_card_has_every_section_and_the_numbers_of_metrics_json(run_copy):
    run = Run.load(run_copy)
    path = write_model_card(run)
    assert path == run_copy / CARD_FILE
    text = path.read_text()
    assert text == card_text(run)
    for heading in SECTIONS:
        assert heading in text
    test, val = run.metrics["test"], run.metrics["val"]
    lo, hi = test["auc_ci"]
    assert f"| AUC | {test['auc']:.3f} (95% CI {lo:.3f}–{hi:.3f}) | {val['auc']:.3f} |" in text
    for key, name in (("sensitivity", "sensitivity"), ("specificity", "specificity"), ("ppv", "PPV"),
                      ("npv", "NPV"), ("balanced_accuracy", "balanced accuracy")):
        lo, hi = test[f"{key}_ci"]
        assert f"| {name} | {test[key]:.3f} (95% CI {lo:.3f}–{hi:.3f}) |" in text
    assert f"threshold **{run.metrics['threshold']:.3f}** on P(malignant)" in text
    assert f"threshold rule `{run.config.evaluation.threshold}`" in text
    assert f"T = {run.metrics['temperature']:.3f}" in text and f"test ECE {test['ece']:.3f}" in text
    assert f"test Brier score {test['brier']:.3f}" in text
    assert "binary classification: malignant (positive) vs benign" in text
    assert f"`{run.model.weights_sha256[:16]}…`" in text and "random initialisation" in text
    assert f"{run.metrics['test']['n_bootstrap']} resamples by patient" in text
    counts = run.resolved["data"]["counts"]
    for split, c in counts.items():
        per = c["per_class"]
        assert f"| {split} | {per['malignant']} | {per['benign']} | {c['n']} | {c['patients']} |" in text
    assert "| **Software** | medxfer " in text
    assert f"| **Seed** | {run.metrics['seed']} |" in text


def test_card_never_names_samples_patients_or_files(patient_run):
    out, root, table = patient_run
    run = Run.load(out)
    text = card_text(run)
    assert "| patients |" in text and "each patient's images stay in one split" in text
    ids = set(run.predictions["sample_id"]) | set(run.split["sample_id"])
    pats = set(run.predictions["patient_id"]) | set(run.split["patient_id"]) | set(table["patient_id"])
    assert pats and all(p.startswith("p-") for p in run.predictions["patient_id"])
    for ident in ids | pats | {hash_id(p) for p in table["patient_id"]}:
        assert ident not in text
    assert "Doe" not in text and "Jane" not in text and str(root) not in text
    assert "`manifest.csv`" in text  # the manifest's name only, as config.yaml already records
    # a recorded note that names a sample is scrubbed
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    leaked = run.split["sample_id"].iloc[0]
    cfg["resolved"]["data"]["notes"] = [f"ignored sample {leaked} while reading"]
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    seal(out)
    text = card_text(Run.load(out))
    assert leaked not in text and "[identifier removed]" in text


def test_limitations_follow_the_data(run_copy):
    run = Run.load(run_copy)
    text = "\n".join(limitations(run))
    assert "Small test set" in text and "width" in text          # 40 test images: a wide AUC interval
    assert "Low resolution: images were resized to 32×32 px" in text
    assert "Internal validation only" in text and "Patients unknown" not in text
    assert "Calibration error" not in text and "Skipped files" not in text
    ece = run.metrics["test"]["ece"]
    assert ("Calibration error" in text) == (ece > 0.1)

    _edit_metrics(run_copy, auc_ci=[0.90, 0.95], ece=0.25)
    pd.DataFrame({"sample_id": ["s-0123456789abcdef"], "reason": ["truncated"]}).to_csv(
        run_copy / "skipped.csv", index=False)
    seal(run_copy)
    run = Run.load(run_copy)
    text = "\n".join(limitations(run))
    assert "Small test set" not in text
    assert "Calibration error: test ECE 0.250 > 0.1" in text
    assert "Skipped files: 1 samples" in text
    card = card_text(run)
    assert "Calibration error" in card and "s-0123456789abcdef" not in card

    _edit_metrics(run_copy, ece=0.02)
    cfg = yaml.safe_load((run_copy / "config.yaml").read_text())
    for c in cfg["resolved"]["data"]["counts"].values():
        del c["patients"]
    (run_copy / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    seal(run_copy)
    text = "\n".join(limitations(Run.load(run_copy)))
    assert "Calibration error" not in text and "Patients unknown" in text


def test_imbalance_rare_classes_and_duplicates(run_copy):
    cfg = yaml.safe_load((run_copy / "config.yaml").read_text())
    counts = cfg["resolved"]["data"]["counts"]
    counts["train"]["per_class"] = {"malignant": 12, "benign": 300}
    (run_copy / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    pd.DataFrame({"group": [0, 0], "sample_id": ["train/000001", "test/000002"], "split": ["train", "test"],
                  "label": ["benign", "benign"], "match": ["pixels"] * 2,
                  "action": ["dropped from train", "kept"]}).to_csv(run_copy / "duplicates.csv", index=False)
    seal(run_copy)  # a run written with these counts and duplicates
    run = Run.load(run_copy)
    text = "\n".join(limitations(run))
    assert "Class imbalance: benign outnumbers malignant 25.0 to 1" in text
    assert "Rare class malignant" in text and "Rare class benign" not in text
    assert "Duplicates: 1 group of identical images" in text
    card = card_text(run)
    assert "1 copies were dropped from train/val" in card
    assert "train/000001" not in card and "test/000002" not in card


def test_card_shows_subgroups_and_flags(patient_run, tmp_path):
    out, _, table = patient_run
    run_dir = Path(shutil.copytree(out, tmp_path / "run"))
    run = Run.load(run_dir)
    frame = table.assign(sample_id=[sample_id(p) for p in table["path"]])
    sg = run_subgroups(run, frame, columns=["site"], n_bootstrap=50)
    assert set(sg["site"]) == {"A", "B"}
    # a flagged group, made by hand: its marks reach the table and the limitations
    sg["site"]["B"].update(flag=True, flagged={"auc": "below"})
    text = card_text(run, sg)
    assert "## Subgroup results" in text and "### site" in text
    assert "| ⚠ B |" in text and "**AUC below overall**" in text
    assert "Subgroup site = B: AUC below overall" in text
    assert "| A |" in text
    # saved with the run, the card finds it alone
    write_subgroups(run, sg)
    seal(run_dir)  # the results are part of the run's record
    assert "Subgroup site = B" in card_text(Run.load(run_dir))


def test_train_cli_writes_subgroups_card_and_tracks_to_mlflow(patient_run, tmp_path, monkeypatch):
    """End to end through the CLI: --subgroups reaches metrics.json, the card and the report; --track logs it."""
    mlflow = pytest.importorskip("mlflow")
    from medxfer.evaluation.report import write_report

    _, root, table = patient_run
    store = tmp_path / "mlruns"
    out = quick_run(root / "manifest.csv", tmp_path / "run", "--subgroups", "site", "--track", "mlflow",
                    "--tracking-uri", str(store), "--experiment", "cards")
    run = Run.load(out)
    sg = run.metrics["subgroups"]["site"]
    n_test = {s: int(((table["split"] == "test") & (table["site"] == s)).sum()) for s in "AB"}
    assert {k: sg[k]["n"] for k in "AB"} == n_test
    assert all(0.0 <= sg[k]["auc"] <= 1.0 and len(sg[k]["auc_ci"]) == 2 for k in "AB")
    card = (out / CARD_FILE).read_text()
    assert "### site" in card and "| A |" in card
    report = write_report(run, gradcam=False).read_text()
    assert "href='model_card.md'" in report and "Subgroups" in report
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.tracking.MlflowClient(store.resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("cards").experiment_id])
    assert len(runs) == 1
    row = runs[0]
    assert row.info.status == "FINISHED" and row.data.params["optim.strategy"] == "full"
    assert row.data.metrics["test/auc"] == pytest.approx(run.metrics["test"]["auc"])


def test_an_unknown_subgroup_column_is_refused_before_training(patient_run, tmp_path, capsys):
    from medxfer.cli import main

    _, root, _ = patient_run
    code = main(["train", "--data", str(root / "manifest.csv"), "--source", "test_resnet", "--weights", "none",
                 "--subgroups", "sex", "--out", str(tmp_path / "run"), "-q"])
    err = capsys.readouterr().err
    assert code != 0 and "no column 'sex'" in err and "site" in err
    assert not (tmp_path / "run").exists()
