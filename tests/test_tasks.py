"""Multi-label and ordinal tasks end to end: label parsing, splits, training, metrics, predict, ONNX, report, serve."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from conftest import ordinal_npz
from medxfer.cli import main
from medxfer.data.manifest import MAX_LABELS
from medxfer.data.sources import load_manifest
from medxfer.data.splits import assign_splits
from medxfer.errors import MedxferError

CXR = Path(__file__).resolve().parents[1] / "data" / "cxr14_nih1000_64.npz"
TINY = ["--source", "test_resnet", "--weights", "none", "--image-size", "32", "--bootstrap", "100", "--no-report",
        "--num-threads", "1", "--augment", "none", "-q"]


# ------------------------------------------------------------------------------------------ parsing
def _pngs(root: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(root / name)
        names.append(name)
    return names


def test_cxr14_file_is_read_as_it_is():
    m = load_manifest(CXR)
    d = np.load(CXR)
    assert m.multilabel and m.labels == [str(s) for s in d["label_names"]]
    np.testing.assert_array_equal(m.targets(), d["labels"].astype(np.float32))
    assert m.table["patient_id"].nunique() == len(np.unique(d["patient_id"]))
    assert not any(str(p) in set(m.table["patient_id"]) for p in d["patient_id"])  # hashed, never raw


def test_label_columns_and_bar_separated_findings_agree(tmp_path):
    names = _pngs(tmp_path, 6)
    y = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]])
    cols = pd.DataFrame(y, columns=["Effusion", "Edema", "Mass"]).assign(path=names)
    cols.to_csv(tmp_path / "cols.csv", index=False)
    text = ["|".join(c for c, v in zip(["Effusion", "Edema", "Mass"], row) if v) or "No Finding" for row in y]
    pd.DataFrame({"path": names, "label": text}).to_csv(tmp_path / "bars.csv", index=False)
    a = load_manifest(tmp_path / "cols.csv", label_columns=["Effusion", "Edema", "Mass"])
    b = load_manifest(tmp_path / "bars.csv", no_finding="No Finding", label_names=["Effusion", "Edema", "Mass"])
    c = load_manifest(tmp_path / "cols.csv", task="multilabel")  # every column but path/patient_id/split
    for m in (a, b, c):
        assert m.multilabel and m.labels == ["Effusion", "Edema", "Mass"]
        np.testing.assert_array_equal(m.targets(), y)


@pytest.mark.parametrize("case, message", [
    ("width", "has 3 columns, --label-names gives 4"),
    ("value", "must be 0 or 1; row 2, column 3 (counting from 1) holds 2"),
    ("mixed", "'No Finding' must stand alone"),
    ("unknown", "not among the label names"),
    ("task", "--task multiclass, but"),
    ("ordinal2", "--task ordinal needs at least three ordered grades"),
    ("notmulti", "--task multilabel, but"),
])
def test_mis_shaped_labels_are_refused_with_one_clear_line(tmp_path, case, message):
    names = _pngs(tmp_path, 4)
    y = np.array([[1, 0, 0], [0, 1, 2 if case == "value" else 1], [0, 0, 0], [1, 1, 0]])
    pd.DataFrame(y, columns=list("abc")).assign(path=names).to_csv(tmp_path / "m.csv", index=False)
    bars = ["a", "No Finding|b" if case == "mixed" else "b", "zzz" if case == "unknown" else "c", "a|b"]
    pd.DataFrame({"path": names, "label": bars}).to_csv(tmp_path / "bars.csv", index=False)
    pd.DataFrame({"path": names, "label": ["x", "y", "x", "y"]}).to_csv(tmp_path / "single.csv", index=False)
    calls = {"width": lambda: load_manifest(tmp_path / "m.csv", label_columns=list("abc"), label_names=list("abcd")),
             "value": lambda: load_manifest(tmp_path / "m.csv", label_columns=list("abc")),
             "mixed": lambda: load_manifest(tmp_path / "bars.csv", no_finding="No Finding"),
             "unknown": lambda: load_manifest(tmp_path / "bars.csv", label_names=list("abc")),
             "task": lambda: load_manifest(tmp_path / "m.csv", label_columns=list("abc"), task="multiclass"),
             "ordinal2": lambda: load_manifest(tmp_path / "single.csv", task="ordinal"),
             "notmulti": lambda: load_manifest(tmp_path / "single.npz", task="multilabel")}
    np.savez(tmp_path / "single.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 0, 1]))
    with pytest.raises(MedxferError, match=re.escape(message)):
        calls[case]()


def test_npz_label_width_mismatch_names_both_numbers(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.eye(4, 13, dtype=np.uint8),
             label_names=np.array([f"f{i}" for i in range(14)]))
    with pytest.raises(MedxferError, match="labels has 13 columns, --label-names gives 14"):
        load_manifest(tmp_path / "x.npz")
    assert MAX_LABELS >= 14


def test_multilabel_split_keeps_every_patient_in_one_split_and_spreads_findings():
    m = assign_splits(load_manifest(CXR), seed=0)
    per_patient = m.table.groupby("patient_id")["split"].nunique()
    assert (per_patient == 1).all()
    y, split = m.targets(), m.table["split"].to_numpy()
    common = [k for k, n in enumerate(y.sum(0)) if n >= 80]  # the frequent findings reach every split
    for k in common:
        assert all(y[split == s, k].sum() > 0 for s in ("train", "val", "test"))


# ------------------------------------------------------------------------------------------ multi-label run
@pytest.fixture(scope="module")
def ml_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ml") / "run"
    assert main(["train", "--data", str(CXR), "--epochs", "2", "--out", str(out), *TINY]) == 0
    return out


def test_multilabel_metrics_match_scikit_learn_on_the_predictions(ml_run):
    m = json.loads((ml_run / "metrics.json").read_text())
    model = json.loads((ml_run / "model.json").read_text())
    assert m["task"] == model["task"] == "multilabel" and len(model["temperature"]) == 14
    preds = pd.read_csv(ml_run / "predictions.csv", keep_default_na=False)
    test = preds[preds["split"] == "test"]
    labels = model["labels"]
    y = np.array([[name in str(v).split("|") for name in labels] for v in test["label"]], float)
    aucs = []
    for k, name in enumerate(labels):
        r = m["test"]["per_label"][name]
        if 0 < y[:, k].sum() < len(y):
            auc = roc_auc_score(y[:, k], test[f"prob_{name}"])
            assert r["auc"] == pytest.approx(auc, abs=1e-9)
            aucs.append(auc)
            lo, hi = r["auc_ci"]
            assert lo <= r["auc"] <= hi
        else:
            assert r["auc"] is None and not r["evaluable"]
    assert m["test"]["auc"] == pytest.approx(np.mean(aucs)) == pytest.approx(m["test"]["macro_auc"])
    cfg = (ml_run / "config.yaml").read_text()
    assert "task: auto" in cfg and "task: multilabel" not in cfg  # the option as given; model.json has the task


def test_multilabel_predict_onnx_and_report(ml_run, tmp_path):
    from medxfer.evaluation.report import write_report
    from medxfer.predict import Predictor

    d = np.load(CXR)
    png = tmp_path / "x.png"
    Image.fromarray(d["images"][3]).save(png)
    out_csv = tmp_path / "p.csv"
    assert main(["predict", str(ml_run), str(png), "--out", str(out_csv)]) == 0
    df = pd.read_csv(out_csv, keep_default_na=False)
    labels = json.loads((ml_run / "model.json").read_text())["labels"]
    thr = json.loads((ml_run / "model.json").read_text())["threshold"]
    probs = df[[f"prob_{c}" for c in labels]].to_numpy()[0]
    assert df["predicted"][0] == "|".join(c for c, p, t in zip(labels, probs, thr) if p >= t)
    assert main(["export", str(ml_run)]) == 0
    onnx = Predictor(ml_run, engine="onnx").probabilities(d["images"][:16])
    torch_p = Predictor(ml_run).probabilities(d["images"][:16])
    assert np.abs(onnx - torch_p).max() < 1e-4                           # parity per finding
    assert not np.allclose(torch_p.sum(1), 1.0)                          # sigmoids, not a softmax
    html = write_report(ml_run, gradcam=False).read_text()
    assert "Per finding" in html and "ROC per finding on the test split" in html and "too rare to evaluate" in html
    card = (ml_run / "model_card.md").read_text()
    assert "multi-label classification of 14 findings" in card and "| Hernia | 0 |" in card


def test_multilabel_serve_returns_every_finding(ml_run):
    from starlette.testclient import TestClient

    from medxfer.serve.app import ServeConfig, create_app

    d = np.load(CXR)
    import io
    buf = io.BytesIO()
    Image.fromarray(d["images"][5]).save(buf, format="PNG")
    with TestClient(create_app(ServeConfig(run_dir=str(ml_run)))) as client:
        r = client.post("/v1/predict", files={"files": ("a.png", buf.getvalue(), "image/png")})
        assert r.status_code == 200, r.text
        item = r.json()["predictions"][0]
        thr = json.loads((ml_run / "model.json").read_text())["threshold"]
        labels = r.json()["labels"]
        assert item["findings"] == [c for c, t in zip(labels, thr) if item["probabilities"][c] >= t]
        assert r.json()["decision_rule"].startswith("threshold per finding")


# ------------------------------------------------------------------------------------------ ordinal
def test_ordinal_run_reports_kappa_and_mae_that_match_scikit_learn(tmp_path):
    from medxfer.evaluation.ordinal import predict_grade
    from medxfer.predict import Predictor

    data = ordinal_npz(tmp_path / "grades.npz")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--task", "ordinal", "--label-names", "none,mild,moderate,severe",
                 "--epochs", "20", "--out", str(out), *TINY]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "ordinal" and json.loads((out / "model.json").read_text())["task"] == "ordinal"
    preds = pd.read_csv(out / "predictions.csv")
    test = preds[preds["split"] == "test"]
    names = ["none", "mild", "moderate", "severe"]
    y = test["label"].map(names.index).to_numpy()
    probs = test[[f"prob_{c}" for c in names]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    pred = predict_grade(probs)
    assert m["test"]["qwk"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic", labels=range(4)))
    assert m["test"]["mae"] == pytest.approx(np.abs(y - pred).mean())
    assert m["test"]["qwk"] > 0.5                                         # the grades were learned
    lo, hi = m["test"]["qwk_ci"]
    assert lo <= m["test"]["qwk"] <= hi
    x = np.load(data)["test_images"][:8]
    p = Predictor(out)
    assert p.predict(list(x))["predicted"].tolist() == [names[g] for g in predict_grade(p.probabilities(x))]


def test_multilabel_compare_pairs_macro_auc_against_scratch(tmp_path):
    from medxfer.evaluation.tasks import label_matrix
    from medxfer.evaluation.tasks import macro_auc

    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(CXR), "--strategies", "linear-probe,scratch", "--seeds", "0",
                 "--epochs", "1", "--out", str(out), *[a for a in TINY if a != "-q"], "--bootstrap", "100", "-q"]) == 0
    pt = json.loads((out / "comparison.json").read_text())["paired_test"]
    assert pt["metric"] == "macro AUC" and pt["b"] == "scratch"
    runs = {s: pd.read_csv(next((out / s).glob("seed*")) / "predictions.csv", keep_default_na=False) for s in
            ("linear-probe", "scratch")}
    labels = json.loads((next((out / "scratch").glob("seed*")) / "model.json").read_text())["labels"]
    test = {s: df[df["split"] == "test"].sort_values("sample_id") for s, df in runs.items()}
    y = label_matrix(test["scratch"]["label"].tolist(), labels)
    diff = (macro_auc(y, test[pt["a"]][[f"prob_{c}" for c in labels]].to_numpy())
            - macro_auc(y, test["scratch"][[f"prob_{c}" for c in labels]].to_numpy()))
    assert pt["paired_bootstrap"]["diff"] == pytest.approx(diff, abs=1e-9)
