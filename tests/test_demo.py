"""medxfer demo: three arms x seeds on a fraction of BreastMNIST, the paired test, and a sentence true to the numbers."""

import json
import re
import sys
import types
from pathlib import Path

import pytest

from medxfer.cli import main
from medxfer.demo import plan, run_demo, sentence, table


def _test(auc_a, auc_b, p, won=3, seeds=3):
    return {"auc_a": auc_a, "auc_b": auc_b, "diff": auc_a - auc_b, "p_value": p,
            "ci_diff": [auc_a - auc_b - 0.05, auc_a - auc_b + 0.05], "seeds_won": [won, seeds], "n_test": 156}


ARMS = {"scratch": {"n_train": 55, "test_auc": {"mean": 0.62}}, "full": {"test_auc": {"mean": 0.71}},
        "linear-probe": {"test_auc": {"mean": 0.72}}}


def test_the_sentence_says_what_the_numbers_say_whatever_they_say():
    helped = sentence(_test(0.85, 0.60, 0.001), ARMS, "full")
    assert helped.startswith("With 55 labelled training images, transfer helped") and "0.850 vs 0.600 with the seeds' probabilities averaged" in helped
    assert "0.710 vs 0.620 on average over 3 seeds (ahead in 3 of 3)" in helped and "full fine-tune (ImageNet)" in helped
    tie = sentence(_test(0.80, 0.78, 0.4, won=2), ARMS, "linear-probe")
    assert "did not differ significantly" in tie and "helped" not in tie and "0.720 vs 0.620 on average over 3 seeds (ahead in 2 of 3)" in tie
    worse = sentence(_test(0.70, 0.85, 0.01, won=0), ARMS, "full")
    assert "transfer did not help here" in worse and "scratch beat" in worse and "-0.150" in worse


def test_the_pool_uses_one_thread_per_core_or_shares_num_threads():
    assert plan(9, 4) == (4, 1)
    assert plan(2, 8) == (2, 4)          # fewer jobs than threads: the threads are shared out
    assert plan(9, 1) == (1, 1)
    assert plan(9, None)[0] >= 1 and plan(1, None)[0] == 1  # the usable cores, at most one process per job


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_demo_trains_three_arms_per_seed_and_tests_the_best_transfer_arm_against_scratch(tmp_path, workers):
    """Two seeds, one epoch at 32 px, in this process or two: every run is a full run directory; the transfer arm
    tested against scratch is the one best on validation; demo.json holds the paired test the sentence quotes."""
    lines = []
    summary = run_demo(tmp_path, seeds=[0, 1], workers=workers, echo=lines.append,
                       options={"epochs": 1, "image_size": 32})
    assert len([ln for ln in lines if re.match(r"\[\d/6\] ", ln)]) == 6
    for arm in ("linear-probe", "full", "scratch"):
        for seed in (0, 1):
            run = tmp_path / arm / f"seed{seed}"
            assert (run / "metrics.json").is_file() and (run / "files.sha256").is_file()
            assert json.loads((run / "metrics.json").read_text())["test"]["n"] == 156
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["sentence"] == summary["sentence"] and saved["paired_test"] == summary["paired_test"]
    arms = saved["arms"]
    assert saved["n_train"] == arms["full"]["n_train"] < 100                     # 10% of 546 train labels
    best = max(("full", "linear-probe"), key=lambda a: arms[a]["val_auc"]["mean"])
    assert saved["best_transfer_on_validation"] == best and saved["paired_test"]["a"] == best
    means = {a: arms[a]["test_auc"]["mean"] for a in arms}
    assert saved["paired_test"]["seeds_won"][1] == 2
    assert f"{saved['paired_test']['auc_b']:.3f}" in saved["sentence"]
    assert arms["scratch"]["test_auc"]["n"] == 2 and 0 <= means["scratch"] <= 1
    rendered = table(saved)
    assert rendered.row_count == 3


def test_the_demo_command_passes_its_options_and_prints_the_table_and_sentence(tmp_path, monkeypatch, capsys):
    calls = []
    summary = {"n_train": 55, "label_fraction": 0.1, "seeds": 3, "best_transfer_on_validation": "full", "seconds": 1.0,
               "sentence": "the sentence", "arms": {a: {"test_auc": {"mean": 0.8, "sd": 0.01, "values": [0.8] * 3},
                                                        "averaged": {"auc": 0.81, "auc_ci": [0.7, 0.9]},
                                                        "val_auc": {"mean": 0.8},
                                                        "train_seconds": {"mean": 3.0}}
                                                    for a in ("linear-probe", "full", "scratch")}}
    fake = types.SimpleNamespace(run_demo=lambda *a, **kw: calls.append((a, kw)) or summary, table=table)
    monkeypatch.setitem(sys.modules, "medxfer.demo", fake)
    assert main(["demo", "--out", str(tmp_path), "--seeds", "0,1, 2", "--num-threads", "1",
                 "--label-fraction", "0.2"]) == 0
    assert main(["demo"]) == 0
    assert [(a, kw["fraction"]) for a, kw in calls] == [((tmp_path, [0, 1, 2], 1), 0.2), ((Path("runs/demo"), None, None), 0.1)]
    text = capsys.readouterr().out
    assert "the sentence" in text and "0.810 (0.700-0.900)" in text and "full fine-tune (ImageNet) *" in text
    assert main(["demo", "--seed", "a,1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "medxfer: The 'seeds' parameter must be comma-separated whole numbers of 0 or more (e.g. 0,1,2). "
        "Got 'a,1' instead.")
