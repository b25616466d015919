"""Tests for medxfer.evaluation.multilabel: against scikit-learn, explicit resamples, by simulation."""

import json

import numpy as np
import pytest
from scipy.special import expit
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    hamming_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from medxfer.errors import MedxferError
from medxfer.evaluation import bootstrap_weights, choose_threshold
from medxfer.evaluation.metrics import percentile_ci
from medxfer.evaluation.multilabel import (
    apply_label_temperatures,
    choose_thresholds,
    evaluate_multilabel,
    fit_label_temperatures,
)

NAMES = ["Atelectasis", "Effusion", "Mass", "Nodule", "Hernia"]


def multilabel_data(seed=0, n=400, prevalence=(0.4, 0.3, 0.2, 0.1, 0.05), shift=1.5, rounding=None):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(prevalence))) < np.array(prevalence)).astype(int)
    p = expit(rng.normal(size=y.shape) + shift * (y - 0.5) - 1.0)
    if rounding is not None:  # ties
        p = np.round(p, rounding)
    return y, p


def clustered_data(n_pat, per=10, seed=0, k=3):
    """Patients whose images are near copies: same labels, nearly the same scores."""
    rng = np.random.default_rng(seed)
    y_pat = (rng.random((n_pat, k)) < 0.35).astype(int)
    z_pat = rng.normal(size=(n_pat, k)) + 1.2 * y_pat
    y = np.repeat(y_pat, per, axis=0)
    p = expit(np.repeat(z_pat, per, axis=0) + 0.05 * rng.normal(size=(n_pat * per, k)) - 0.5)
    return y, p, np.repeat(np.arange(n_pat), per)


def test_per_label_metrics_match_sklearn():
    for seed, rounding in ((0, None), (1, 2)):
        y, p = multilabel_data(seed, rounding=rounding)
        thr = [0.3, 0.5, 0.42, 0.6, 0.25]
        r = evaluate_multilabel(y, p, NAMES, thresholds=thr, min_positives=0)
        for j, name in enumerate(NAMES):
            m, yj, pj = r["per_label"][name], y[:, j], p[:, j]
            pred = (pj >= thr[j]).astype(int)
            assert m["auc"] == pytest.approx(roc_auc_score(yj, pj))
            assert m["average_precision"] == pytest.approx(average_precision_score(yj, pj))
            assert m["sensitivity"] == pytest.approx(recall_score(yj, pred))
            assert m["specificity"] == pytest.approx(recall_score(yj, pred, pos_label=0))
            assert m["ppv"] == pytest.approx(precision_score(yj, pred))
            assert m["npv"] == pytest.approx(precision_score(yj, pred, pos_label=0))
            assert m["f1"] == pytest.approx(f1_score(yj, pred))
            assert m["accuracy"] == pytest.approx(accuracy_score(yj, pred))
            assert m["brier"] == pytest.approx(np.mean((pj - yj) ** 2))
            assert (m["n_pos"], m["n_neg"], m["threshold"]) == (yj.sum(), len(yj) - yj.sum(), thr[j])


def test_aggregates_match_sklearn():
    y, p = multilabel_data(2)
    thr = np.array([0.5, 0.4, 0.3, 0.35, 0.2])
    r = evaluate_multilabel(y, p, NAMES, thresholds=thr)
    pred = (p >= thr).astype(int)
    per_label = roc_auc_score(y, p, average=None)
    assert r["macro_auc"] == pytest.approx(np.mean(per_label))
    assert r["macro_auc"] == pytest.approx(roc_auc_score(y, p, average="macro"))
    assert r["macro_auc_n_labels"] == 5
    assert r["micro_auc"] == pytest.approx(roc_auc_score(y.ravel(), p.ravel()))
    assert r["macro_average_precision"] == pytest.approx(average_precision_score(y, p))
    assert r["micro_average_precision"] == pytest.approx(
        average_precision_score(y.ravel(), p.ravel()))
    assert r["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert r["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro"))
    assert r["subset_accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert r["hamming_loss"] == pytest.approx(hamming_loss(y, pred))
    assert (r["n"], r["n_labels"], r["thresholds"]) == (400, 5, thr.tolist())


def test_ece_is_binned_on_the_label_probability():
    y = np.array([[1], [0], [1], [1]])
    p = np.array([[0.9], [0.9], [0.1], [0.5]])
    # bins: 0.1 -> bin 1 (1 positive, p 0.1); 0.5 -> bin 7 (1, 0.5); 0.9 -> bin 13 (1 of 2, 1.8)
    r = evaluate_multilabel(y, p, ["x"], min_positives=0)
    assert r["per_label"]["x"]["ece"] == pytest.approx((0.9 + 0.5 + 0.8) / 4)
    rng = np.random.default_rng(0)
    pc = rng.random((20000, 1))
    calibrated = evaluate_multilabel(rng.random((20000, 1)) < pc, pc, ["x"])
    assert calibrated["per_label"]["x"]["ece"] < 0.02


def test_undefined_label_is_none_and_left_out_of_the_macro_auc():
    y, p = multilabel_data(3)
    y[:, 4] = 0  # no positives at all
    r = evaluate_multilabel(y, p, NAMES, n_bootstrap=50)
    json.dumps(r, allow_nan=False)
    none = r["per_label"]["Hernia"]
    assert none["auc"] is None and none["average_precision"] is None and none["auc_ci"] is None
    assert none["sensitivity"] is None and none["evaluable"] is False
    assert r["macro_auc_n_labels"] == 4
    assert r["macro_auc"] == pytest.approx(np.mean(roc_auc_score(y[:, :4], p[:, :4], average=None)))
    assert r["macro_average_precision"] == pytest.approx(average_precision_score(y[:, :4], p[:, :4]))
    assert r["macro_f1"] == pytest.approx(
        f1_score(y, p >= 0.5, average="macro", zero_division=np.nan))


def test_rare_label_flagged_but_auc_and_its_wide_interval_shown():
    y, p = multilabel_data(4, n=600)
    y[:, 4] = 0
    y[:6, 4] = 1
    r = evaluate_multilabel(y, p, NAMES, n_bootstrap=300, min_positives=10)
    rare, common = r["per_label"]["Hernia"], r["per_label"]["Atelectasis"]
    assert rare["evaluable"] is False and "too rare" in rare["note"] and "6 positive" in rare["note"]
    assert common["evaluable"] is True and common["note"] is None
    assert rare["auc"] == pytest.approx(roc_auc_score(y[:, 4], p[:, 4]))
    width = {name: m["auc_ci"][1] - m["auc_ci"][0] for name, m in r["per_label"].items()}
    assert width["Hernia"] > 2 * width["Atelectasis"]
    assert r["n_evaluable"] == 4


def test_bootstrap_equals_sklearn_on_explicit_resamples():
    y, p = multilabel_data(5, n=150, prevalence=(0.4, 0.3, 0.25))
    groups = np.arange(150) // 3
    r = evaluate_multilabel(y, p, NAMES[:3], thresholds=[0.4, 0.5, 0.3], groups=groups,
                            n_bootstrap=40, seed=7)
    w = bootstrap_weights(150, 40, seed=7, groups=groups)
    values = {m: [] for m in ("macro_auc", "micro_auc", "micro_average_precision", "macro_f1",
                              "subset_accuracy", "hamming_loss")}
    sens0 = []
    for b in range(40):
        idx = np.repeat(np.arange(150), w[b].astype(int))
        yb, pb = y[idx], p[idx]
        if not all(0 < yb[:, j].sum() < len(yb) for j in range(3)):
            continue
        pred = (pb >= [0.4, 0.5, 0.3]).astype(int)
        values["macro_auc"].append(roc_auc_score(yb, pb))
        values["micro_auc"].append(roc_auc_score(yb.ravel(), pb.ravel()))
        values["micro_average_precision"].append(average_precision_score(yb.ravel(), pb.ravel()))
        values["macro_f1"].append(f1_score(yb, pred, average="macro", zero_division=np.nan))
        values["subset_accuracy"].append(accuracy_score(yb, pred))
        values["hamming_loss"].append(hamming_loss(yb, pred))
        sens0.append(recall_score(yb[:, 0], pred[:, 0]))
    assert r["n_bootstrap_used"] == len(sens0) and r["bootstrap_unit"] == "group"
    for m, v in values.items():
        assert r[f"{m}_ci"] == pytest.approx(percentile_ci(v)), m
    assert r["per_label"][NAMES[0]]["sensitivity_ci"] == pytest.approx(percentile_ci(sens0))


def test_aggregate_intervals_use_resamples_where_every_scored_label_has_both_classes():
    y, p = multilabel_data(10, n=100, prevalence=(0.4, 0.3, 0.0))
    y[:3, 2] = 1  # 3 positives: missing from about 1 resample in 20
    r = evaluate_multilabel(y, p, NAMES[:3], n_bootstrap=200, seed=2)
    w = bootstrap_weights(100, 200, seed=2)
    pos = w @ y
    both = (pos > 0) & (pos < w.sum(1)[:, None])
    assert r["n_bootstrap_used"] == int(both.all(1).sum()) < 200
    assert r["per_label"][NAMES[2]]["n_bootstrap_used"] == int(both[:, 2].sum())
    assert r["per_label"][NAMES[0]]["n_bootstrap_used"] == 200
    macro = [roc_auc_score(y[idx], p[idx]) for idx in
             (np.repeat(np.arange(100), w[b].astype(int)) for b in np.flatnonzero(both.all(1)))]
    assert r["macro_auc_ci"] == pytest.approx(percentile_ci(macro))


def test_intervals_contain_the_estimate_and_shrink_with_more_data():
    widths = []
    for n in (200, 2000):
        y, p = multilabel_data(6, n=n)
        r = evaluate_multilabel(y, p, NAMES, n_bootstrap=200, seed=1, min_positives=0)
        for m in ("macro_auc", "micro_auc", "macro_average_precision", "micro_f1",
                  "subset_accuracy", "hamming_loss"):
            lo, hi = r[f"{m}_ci"]
            assert lo <= r[m] <= hi, m
        for m in r["per_label"].values():
            for key in ("auc", "average_precision", "sensitivity", "specificity"):
                assert m[f"{key}_ci"][0] <= m[key] <= m[f"{key}_ci"][1]
        widths.append(r["macro_auc_ci"][1] - r["macro_auc_ci"][0])
    assert widths[1] < 0.6 * widths[0]


def test_patient_bootstrap_is_wider_than_image_bootstrap_on_clustered_data():
    y, p, groups = clustered_data(60)
    names = NAMES[:3]
    img = evaluate_multilabel(y, p, names, n_bootstrap=300, seed=0)
    pat = evaluate_multilabel(y, p, names, groups=groups, n_bootstrap=300, seed=0)
    assert img["macro_auc"] == pat["macro_auc"]
    for key in ("macro_auc_ci", "micro_auc_ci", "subset_accuracy_ci"):
        assert pat[key][1] - pat[key][0] > 2 * (img[key][1] - img[key][0]), key
    assert pat["bootstrap_unit"] == "group" and img["bootstrap_unit"] == "image"
    assert pat["per_label"][names[0]]["n_pos_patients"] * 10 == pat["per_label"][names[0]]["n_pos"]


def test_bootstrap_is_seeded_and_json_ready():
    y, p = multilabel_data(8, n=200)
    a = evaluate_multilabel(y, p, NAMES, n_bootstrap=100, seed=3)
    b = evaluate_multilabel(y, p, NAMES, n_bootstrap=100, seed=3)
    c = evaluate_multilabel(y, p, NAMES, n_bootstrap=100, seed=4)
    assert a == b and a["macro_auc_ci"] != c["macro_auc_ci"]
    assert json.loads(json.dumps(a, allow_nan=False)) == a


@pytest.mark.parametrize("kwargs, fragment", [
    ({"y_true": [[0, 2], [1, 0]]}, "Got [2]"),
    ({"y_true": [[0, 1]]}, "'y_true'"),
    ({"probs": [[0.2, 1.5], [0.1, 0.3]]}, "'probs'"),
    ({"labels": ["a"]}, "'labels'"),
    ({"thresholds": [0.5]}, "'thresholds'"),
    ({"groups": [1, 2, 3]}, "'groups'"),
    ({"n_bootstrap": -1}, "'n_bootstrap'"),
])
def test_bad_input_raises_medxfer_error(kwargs, fragment):
    args = {"y_true": [[0, 1], [1, 0]], "probs": [[0.2, 0.7], [0.6, 0.4]], "labels": ["a", "b"]}
    args.update(kwargs)
    y, p, labels = args.pop("y_true"), args.pop("probs"), args.pop("labels")
    with pytest.raises(MedxferError, match="evaluate_multilabel") as e:
        evaluate_multilabel(y, p, labels, **args)
    assert fragment in str(e.value)


def test_choose_thresholds_per_label_with_fallback():
    y, p = multilabel_data(9, n=300)
    y[:, 4] = 1  # one class only in validation
    thr, why = choose_thresholds(y, p, "youden")
    for j in range(4):
        assert thr[j] == choose_threshold(y[:, j].astype(bool), p[:, j], "youden")
        assert "youden" in why[j]
    assert thr[4] == 0.5 and "fell back to 0.5" in why[4] and "300 positive of 300" in why[4]
    sens, _ = choose_thresholds(y, p, "sensitivity=0.9")
    assert all((p[y[:, j] == 1, j] >= sens[j]).mean() >= 0.9 for j in range(4))
    assert choose_thresholds(y, p, 0.3)[0] == [0.3] * 5
    with pytest.raises(MedxferError):
        choose_thresholds(y, p, "best")


def test_label_temperatures_recover_known_scales_and_calibrate():
    rng = np.random.default_rng(0)
    n, scales = 4000, np.array([3.0, 0.5, 1.0])
    z_true = rng.normal(size=(n, 3)) * 2
    y = (rng.random((n, 3)) < expit(z_true)).astype(int)
    z = z_true * scales  # over- and under-confident logits
    temps = fit_label_temperatures(z, y)
    assert temps == pytest.approx(scales.tolist(), rel=0.1)
    probs = apply_label_temperatures(z, temps)
    assert probs == pytest.approx(expit(z / np.array(temps)))
    before = evaluate_multilabel(y, expit(z), NAMES[:3])
    after = evaluate_multilabel(y, probs, NAMES[:3])
    assert after["per_label"][NAMES[0]]["ece"] < before["per_label"][NAMES[0]]["ece"] / 2
    degenerate = np.c_[z[:, :1], z[:, 1:2], np.zeros(n)]
    y_single = y.copy()
    y_single[:, 1] = 1
    assert fit_label_temperatures(degenerate, y_single)[1:] == [1.0, 1.0]
    with pytest.raises(MedxferError, match="'temps'"):
        apply_label_temperatures(z, [1.0, 2.0])
    with pytest.raises(MedxferError, match="'temps'"):
        apply_label_temperatures(z, [1.0, 0.0, 1.0])
