"""Tests for ``medxfer compare``: strategies x seeds on one split, summaries, paired test, resume."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medxfer.cli import main
from medxfer.comparison import parse_fractions, parse_seeds, parse_strategies
from medxfer.errors import MedxferError
from medxfer.evaluation.stats import delong_test, summarize
from tests.conftest import fake_run

pytestmark = pytest.mark.slow  # end to end: a few seconds to a minute each

BREAST = Path(__file__).resolve().parents[1] / "src" / "medxfer" / "datasets" / "breastmnist_28.npz"
STRATS = ["linear-probe", "scratch"]
SEEDS = [0, 1]


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    """--num-threads 1 keeps these runs quick on a busy machine; give the next tests their threads back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def unsplit_npz(tmp_path_factory) -> Path:
    """120 BreastMNIST images with train keys only: medxfer makes the split (with the split seed)."""
    src = np.load(BREAST)
    x, y = src["train_images"], src["train_labels"]
    idx = np.concatenate([np.flatnonzero(y[:, 0] == c)[:60] for c in (0, 1)])
    path = tmp_path_factory.mktemp("data") / "breast_unsplit.npz"
    np.savez(path, train_images=x[idx], train_labels=y[idx])
    return path


def _args(data, out, *extra):
    return ["compare", "--data", str(data), "--source", "test_resnet", "--weights", "none", "--image-size", "32",
            "--epochs", "1", "--bootstrap", "50", "--label-names", "malignant,benign", "--positive-label",
            "malignant", "--strategies", ",".join(STRATS), "--seeds", ",".join(map(str, SEEDS)), "--quiet",
            "--num-threads", "1",
            "--cache-dir", str(Path(out).parent / "cache" / "decode"), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, unsplit_npz):
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    code = main(_args(unsplit_npz, out, "--label-fractions", "0.25,1.0", "--split-seed", "3"))
    assert code == 0
    return out, json.loads((out / "comparison.json").read_text())


def test_runs_and_summaries_match_metrics(comparison):
    out, res = comparison
    assert list(res["strategies"]) == STRATS
    for s in STRATS:
        summ = res["strategies"][s]
        metrics = [json.loads((out / s / f"seed{k}" / "metrics.json").read_text()) for k in SEEDS]
        assert [m["seed"] for m in metrics] == SEEDS and {m["strategy"] for m in metrics} == {s}
        for key, m_key in (("test_auc", "auc"), ("balanced_accuracy", "balanced_accuracy"),
                           ("sensitivity", "sensitivity"), ("specificity", "specificity")):
            vals = [m["test"][m_key] for m in metrics]
            assert summ[key]["values"] == pytest.approx(vals)
            assert summ[key]["mean"] == pytest.approx(np.mean(vals))
            assert summ[key]["sd"] == pytest.approx(np.std(vals, ddof=1))
            assert summ[key]["n"] == len(SEEDS)
        assert summ["train_seconds"]["values"] == pytest.approx([m["train_seconds"] for m in metrics])
        assert summ["runs"] == [str(out / s / f"seed{k}") for k in SEEDS]
    st = res["settings"]
    assert st["strategies"] == STRATS and st["seeds"] == SEEDS and st["split_seed"] == 3
    assert st["source"] == "test_resnet" and st["image_size"] == 32 and st["positive_label"] == "malignant"
    assert st["label_fractions"] == [0.25, 1.0]
    assert st["split"] == "made by medxfer with split seed 3"
    assert st["epochs"] == {"linear-probe": None, "scratch": 1}  # the logistic head has no epochs
    assert st["n_test"] == json.loads((out / "scratch" / "seed0" / "metrics.json").read_text())["test"]["n"]


def test_every_run_used_the_same_split(comparison):
    out, _ = comparison
    splits = [pd.read_csv(out / s / f"seed{k}" / "split.csv") for s in STRATS for k in SEEDS]
    for other in splits[1:]:
        pd.testing.assert_frame_equal(other, splits[0])
    # seed 3 made this split, not the training seeds (0 and 1): configs say so
    import yaml

    cfgs = [yaml.safe_load((out / s / f"seed{k}" / "config.yaml").read_text()) for s in STRATS for k in SEEDS]
    assert {c["data"]["split_seed"] for c in cfgs} == {3} and sorted({c["optim"]["seed"] for c in cfgs}) == SEEDS
    # label-fraction runs: fewer train images, the same val and test images
    evals = splits[0][splits[0]["split"] != "train"].reset_index(drop=True)
    for s in STRATS:
        for k in SEEDS:
            f = pd.read_csv(out / s / "frac0.25" / f"seed{k}" / "split.csv")
            assert (f["split"] == "train").sum() < (splits[0]["split"] == "train").sum()
            pd.testing.assert_frame_equal(f[f["split"] != "train"].reset_index(drop=True), evals)


def test_paired_test_uses_seed_averaged_test_probabilities(comparison):
    out, res = comparison
    pt = res["paired_test"]
    best = max((s for s in STRATS if s != "scratch"), key=lambda s: res["strategies"][s]["test_auc"]["mean"])
    assert pt["a"] == best and pt["b"] == "scratch" and pt["positive_label"] == "malignant"

    def averaged(s):
        frames = [pd.read_csv(out / s / f"seed{k}" / "predictions.csv", dtype={"sample_id": str}) for k in SEEDS]
        frames = [f[f["split"] == "test"].set_index("sample_id").sort_index() for f in frames]
        return frames[0]["label"] == "malignant", np.mean([f["prob_malignant"] for f in frames], axis=0)

    y, a = averaged(best)
    _, b = averaged("scratch")
    assert pt["n_test"] == len(y)
    expect = delong_test(y.to_numpy(), a, b)
    for key in ("auc_a", "auc_b", "diff", "p_value"):
        assert pt["delong"][key] == pytest.approx(expect[key])
    for key in ("auc_a", "auc_b", "diff", "ci_diff", "p_value", "n_bootstrap"):
        assert key in pt["paired_bootstrap"]
    assert pt["paired_bootstrap"]["diff"] == pytest.approx(expect["diff"])
    assert pt["significant"] == (pt["delong"]["p_value"] < 0.05)
    words = pt["conclusion"]
    assert words.startswith(("no significant difference", f"{best} beats scratch", f"scratch beats {best}"))
    assert "AUC diff" in words and "95% CI" in words and re.search(r"p[=<]\d", words)


def test_learning_curve(comparison):
    out, res = comparison
    curve = res["learning_curve"]
    assert set(curve) == set(STRATS)
    for s in STRATS:
        assert list(curve[s]) == ["0.25", "1"]
        full = curve[s]["1"]
        assert full["values"] == pytest.approx(res["strategies"][s]["test_auc"]["values"])  # 1.0 reuses the runs
        quarter = [json.loads((out / s / "frac0.25" / f"seed{k}" / "metrics.json").read_text())["test"]["auc"]
                   for k in SEEDS]
        assert curve[s]["0.25"]["mean"] == pytest.approx(summarize(quarter)["mean"])
        assert curve[s]["0.25"]["n_train"][0] < full["n_train"][0]


def test_html_is_self_contained(comparison):
    out, res = comparison
    page = (out / "comparison.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script src" not in page and "<link" not in page
    images = re.findall(r"src=['\"]data:image/png;base64,([A-Za-z0-9+/=]+)['\"]", page)
    assert len(images) == 2  # AUC per strategy + learning curve
    for img in images:
        assert base64.b64decode(img, validate=True).startswith(b"\x89PNG\r\n\x1a\n")
    assert len(re.findall(r"<img ", page)) == 2
    for s in STRATS:
        assert f"<td>{s}</td>" in page or f"<td class=num>{s}</td>" in page or f">{s}</td>" in page
    m = res["strategies"]["scratch"]["test_auc"]
    assert f"{m['mean']:.3f} ± {m['sd']:.3f}" in page
    import html

    assert html.escape(res["paired_test"]["conclusion"]) in page


def test_resume_skips_finished_runs(comparison, unsplit_npz, capsys):
    out, res = comparison
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/**/metrics.json")}
    assert len(stamps) == 2 * len(STRATS) * len(SEEDS)
    capsys.readouterr()
    code = main(_args(unsplit_npz, out, "--label-fractions", "0.25,1.0", "--split-seed", "3"))
    assert code == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/**/metrics.json")} == stamps
    again = json.loads((out / "comparison.json").read_text())
    assert again["strategies"]["scratch"]["test_auc"] == res["strategies"]["scratch"]["test_auc"]
    assert all(all(r) for r in (again["strategies"][s]["reused"] for s in STRATS))
    captured = capsys.readouterr()
    # the rich table on stdout
    assert "strategy" in captured.out and "test AUC" in captured.out and "linear-probe" in captured.out


def test_resume_retrains_when_config_differs(tmp_path, unsplit_npz, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--data", str(unsplit_npz), "--source", "test_resnet", "--weights", "none",
            "--image-size", "32", "--epochs", "1", "--bootstrap", "20", "--strategies", "linear-probe", "--seeds", "0",
            "--num-threads", "1", "--cache-dir", str(tmp_path / "cache" / "decode"), "--out", str(out)]
    assert main(args) == 0
    metrics = out / "linear-probe" / "seed0" / "metrics.json"
    first = metrics.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert metrics.stat().st_mtime_ns == first
    assert "not retrained" in capsys.readouterr().err
    assert main(args + ["--epochs", "2"]) == 0  # the later option wins
    err = capsys.readouterr().err
    assert "retraining" in err and "epochs" in err
    assert metrics.stat().st_mtime_ns != first
    res = json.loads((out / "comparison.json").read_text())
    assert res["settings"]["train_config"]["optim"]["epochs"] == 2
    assert res["settings"]["epochs"] == {"linear-probe": None}  # the logistic head has no epochs
    assert res["paired_test"]["skipped"].startswith("no 'scratch' baseline")


@pytest.mark.parametrize("option, value, message", [
    ("--strategies", "linear-probe,fine-tune", "unknown strategy 'fine-tune'"),
    ("--strategies", "full,full", "'full' more than once"),
    ("--strategies", "full,,scratch", "without empty entries"),
    ("--seeds", "0,x", "integers >= 0, like 0,1,2. Got 'x'"),
    ("--seeds", "0,-1", "Got '-1'"),
    ("--seeds", "1,1", "more than once"),
    ("--label-fractions", "0.1,2", "fractions in (0, 1]"),
    ("--label-fractions", "0,1", "Got '0'"),
    ("--label-fractions", "a", "Got 'a'"),
    ("--label-fraction", "0.1,1", "No such option: --label-fraction"),  # one fraction for one run: train's
    ("--split-seed", "-1", "The 'split-seed' parameter must be at least 0. Got -1 instead."),
])
def test_invalid_lists_one_clear_line(tmp_path, unsplit_npz, capsys, option, value, message):
    code = main(["compare", "--data", str(unsplit_npz), "--source", "test_resnet", "--weights", "none",
                 "--out", str(tmp_path / "x"), option, value])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medxfer: ") and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "x").exists()


def test_parsers():
    assert parse_strategies("linear-probe, scratch") == ["linear-probe", "scratch"]
    assert parse_seeds("2,0,11") == [2, 0, 11]
    assert parse_fractions("1.0,0.01,0.1") == [0.01, 0.1, 1.0]
    with pytest.raises(MedxferError, match="Did you mean 'linear-probe'"):
        parse_strategies("linear_probe")


def _fake_runs(scores_per_seed, y, positive="malignant"):
    ids = [f"test/{i:06d}" for i in range(len(y))]
    labels = np.where(y == 1, positive, "benign")
    runs = []
    for k, p in enumerate(scores_per_seed):
        pred = pd.DataFrame({"split": "test", "sample_id": ids, "label": labels, f"prob_{positive}": p,
                             "prob_benign": 1 - p})
        runs.append(fake_run(f"run{k}", {"test": {"positive_label": positive, "auc": 0.5}, "val": {"auc": 0.5}},
                             predictions=pred, labels=("benign", positive)))
    return runs


def test_paired_test_words():
    from medxfer.comparison import paired_test

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 60)
    good = [np.clip(y * 0.6 + rng.uniform(0, 0.4, len(y)), 0, 1) for _ in range(2)]
    noise = [rng.uniform(0, 1, len(y)) for _ in range(2)]
    summ = {"linear-probe": {"test_auc": {"mean": 0.99}, "val_auc": {"mean": 0.9}},
            "full": {"test_auc": {"mean": 0.6}, "val_auc": {"mean": 0.8}},
            "scratch": {"test_auc": {"mean": 0.5}, "val_auc": {"mean": 0.7}}}
    by = {"linear-probe": _fake_runs(good, y), "full": _fake_runs(noise, y), "scratch": _fake_runs(noise[::-1], y)}
    pt = paired_test(by, summ, n_bootstrap=100)
    assert pt["a"] == "linear-probe" and pt["significant"]
    assert pt["conclusion"].startswith("linear-probe beats scratch (linear-probe chosen on validation): AUC diff +")
    assert "p<0.001" in pt["conclusion"] and "averaged over 2 seeds" in pt["conclusion"]
    assert pt["delong"]["auc_a"] == pytest.approx(1.0)
    # the same scores: no difference
    by_same = {"full": _fake_runs(noise, y), "scratch": _fake_runs(noise, y)}
    pt = paired_test(by_same, {"full": {"test_auc": {"mean": 0.5}, "val_auc": {"mean": 0.5}},
                               "scratch": {"test_auc": {"mean": 0.5}, "val_auc": {"mean": 0.5}}}, 50)
    assert pt["conclusion"].startswith("no significant difference between full and scratch") and not pt["significant"]
    # no scratch baseline, or a multi-class task: skipped with a reason
    assert "skipped" in paired_test({"full": by["full"]}, summ, 50)
    multi = {s: [fake_run(r.dir, {"test": {"auc": 0.7}}, predictions=r.predictions) for r in rs] for s, rs in by.items()}
    assert "two-class" in paired_test(multi, summ, 50)["skipped"]


def _source_dir(path: Path, seed: int) -> Path:
    """A hand-made source directory: a random grey test_resnet backbone (different per seed)."""
    import timm
    import torch

    from medxfer.pretrain.common import write_source_dir

    torch.manual_seed(seed)
    net = timm.create_model("test_resnet", num_classes=0, in_chans=1)
    write_source_dir(path, "test_resnet", net.state_dict(),
                     {"mean": [0.5], "std": [0.5], "input_size": 32, "in_chans": 1, "domain": f"random {seed}",
                      "description": "test", "method": "none", "trained_on": {}})
    return path


def test_several_sources_in_one_table(tmp_path, unsplit_npz, capsys):
    a, b = _source_dir(tmp_path / "src_a", 1), _source_dir(tmp_path / "src_b", 2)
    out = tmp_path / "cmp"
    argv = [x for x in _args(unsplit_npz, out) if x not in ("--source", "test_resnet", "--weights", "none")]
    argv = [*argv[:argv.index("--seeds") + 1], "0", *argv[argv.index("--seeds") + 3:]]
    assert main([*argv, "--sources", f"{a},{b}"]) == 0
    res = json.loads((out / "comparison.json").read_text())
    rows = ["linear-probe [src_a]", "linear-probe [src_b]", "scratch"]
    assert res["settings"]["rows"] == rows and list(res["strategies"]) == rows
    dirs = {r: Path(res["strategies"][r]["runs"][0]) for r in rows}
    assert dirs == {rows[0]: out / "linear-probe" / "seed0", rows[1]: out / "src_b" / "linear-probe" / "seed0",
                    rows[2]: out / "scratch" / "seed0"}
    import yaml

    assert [yaml.safe_load((dirs[r] / "config.yaml").read_text())["model"]["source"] for r in rows] == \
        [str(a), str(b), str(a)]
    preds = [pd.read_csv(dirs[r] / "predictions.csv") for r in rows[:2]]
    assert not np.allclose(preds[0]["prob_malignant"], preds[1]["prob_malignant"])  # two sources, two models
    assert res["paired_test"]["b"] == "scratch" and res["paired_test"]["a"] in rows[:2]
    printed = capsys.readouterr().out  # the table holds the rows whole; paths stay out of its title
    assert "linear-probe [src_b]" in printed and "linear-probe [src_a]" in printed
    assert main([*argv, "--sources", f"{a},{b}", "--source", str(a)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*argv, "--sources", f"{a},{a}"]) == 2
    assert "more than once" in capsys.readouterr().err


def test_a_train_run_with_the_same_effective_split_seed_is_reused(tmp_path, unsplit_npz, capsys):
    """`train --seed 0` (no --split-seed: the split follows --seed) is the run compare's seed 0, split seed 0 makes."""
    out = tmp_path / "cmp"
    common = ["--data", str(unsplit_npz), "--source", "test_resnet", "--weights", "none", "--image-size", "32",
              "--bootstrap", "20", "--num-threads", "1", "--cache-dir", str(tmp_path / "cache")]
    assert main(["train", *common, "--strategy", "linear-probe", "--seed", "0", "--no-report",
                 "--out", str(out / "linear-probe" / "seed0")]) == 0
    metrics = out / "linear-probe" / "seed0" / "metrics.json"
    first = metrics.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["compare", *common, "--strategies", "linear-probe", "--seeds", "0", "--split-seed", "0",
                 "--no-report", "--out", str(out)]) == 0
    assert "not retrained" in capsys.readouterr().err and metrics.stat().st_mtime_ns == first
    assert main(["compare", *common, "--strategies", "linear-probe", "--seeds", "0", "--split-seed", "1",
                 "--no-report", "--out", str(out)]) == 0   # another split: trained again
    assert "split_seed 0 -> 1" in capsys.readouterr().err and metrics.stat().st_mtime_ns != first
