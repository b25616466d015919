"""Tests for ordinal grading: medxfer.evaluation.ordinal metrics and the CORN head in
medxfer.models.ordinal (probabilities, loss, training a tiny model)."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import cohen_kappa_score, confusion_matrix, roc_auc_score

from medxfer.errors import MedxferError
from medxfer.evaluation import bootstrap_weights
from medxfer.evaluation.metrics import percentile_ci
from medxfer.evaluation.ordinal import evaluate_ordinal, predict_grade
from medxfer.models.ordinal import corn_loss, corn_predict, corn_probabilities

GRADES = ["none", "mild", "moderate", "severe", "proliferative"]


def ordinal_data(seed=0, n=500, k=5, noise=1.0):
    """Grades from a latent score; probabilities from a noisy copy of it (cumulative logit)."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=n) * 1.5
    cuts = np.linspace(-1.5, 1.5, k - 1)
    y = (latent[:, None] > cuts).sum(1)
    est = latent + noise * rng.normal(size=n)
    above = 1 / (1 + np.exp(-(est[:, None] - cuts)))  # P(grade > j), decreasing in j
    probs = np.c_[np.ones(n), above] - np.c_[above, np.zeros(n)]
    return y, probs


def test_metrics_match_sklearn_and_hand():
    for seed in range(3):
        y, p = ordinal_data(seed)
        r = evaluate_ordinal(y, p, GRADES)
        pred = predict_grade(p)
        assert r["qwk"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
        assert r["mae"] == pytest.approx(np.mean(np.abs(y - pred)))
        assert r["accuracy"] == pytest.approx(np.mean(y == pred))
        assert r["confusion_matrix"] == confusion_matrix(y, pred).tolist()
        aucs = [roc_auc_score(y >= k, p[:, k:].sum(1)) for k in range(1, 5)]
        assert [c["auc"] for c in r["cuts"]] == pytest.approx(aucs)
        assert [c["cut"] for c in r["cuts"]] == [1, 2, 3, 4]
        assert r["cuts"][0]["name"] == ">= mild" and r["cuts"][0]["n_pos"] == int((y >= 1).sum())
        assert r["cut_auc_macro"] == pytest.approx(np.mean(aucs))
        assert r["n_per_grade"] == {g: int((y == i).sum()) for i, g in enumerate(GRADES)}


def test_qwk_weights_span_all_grades_when_one_is_missing():
    y, p = ordinal_data(1, k=5)
    keep = y != 2
    y, p = y[keep], p[keep]
    r = evaluate_ordinal(y, p, GRADES)
    pred = predict_grade(p)
    assert r["qwk"] == pytest.approx(
        cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(5))))


def test_predicted_grade_is_the_median_and_minimises_expected_absolute_error():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5) * 0.7, size=300)
    pred = predict_grade(p)
    cum = np.cumsum(p, axis=1)
    assert np.all(cum[np.arange(300), pred] >= 0.5 - 1e-9)
    assert np.all((pred == 0) | (cum[np.arange(300), np.maximum(pred - 1, 0)] < 0.5))
    expected_abs = np.abs(np.arange(5)[:, None] - np.arange(5)[None, :]) @ p.T  # (k, N)
    assert np.allclose(expected_abs[pred, np.arange(300)], expected_abs.min(0))
    assert predict_grade([[0.3, 0.2, 0.5]]).tolist() == [1]  # argmax would say 2
    assert predict_grade([[0.5, 0.0, 0.5]]).tolist() == [0]  # exactly 0.5: the smallest


def test_bootstrap_equals_sklearn_on_explicit_resamples():
    y, p = ordinal_data(2, n=200)
    groups = np.arange(200) // 2
    r = evaluate_ordinal(y, p, GRADES, groups=groups, n_bootstrap=30, seed=5)
    w = bootstrap_weights(200, 30, seed=5, groups=groups)
    pred = predict_grade(p)
    qwk, mae, cut1 = [], [], []
    for b in range(30):
        idx = np.repeat(np.arange(200), w[b].astype(int))
        if not ((y[idx] == 0).any() and (y[idx] == 4).any()):
            continue
        qwk.append(cohen_kappa_score(y[idx], pred[idx], weights="quadratic", labels=range(5)))
        mae.append(np.mean(np.abs(y[idx] - pred[idx])))
        cut1.append(roc_auc_score(y[idx] >= 1, p[idx, 1:].sum(1)))
    assert r["n_bootstrap_used"] == len(qwk) > 20
    assert r["qwk_ci"] == pytest.approx(percentile_ci(qwk))
    assert r["mae_ci"] == pytest.approx(percentile_ci(mae))
    assert r["cuts"][0]["auc_ci"] == pytest.approx(percentile_ci(cut1))


def test_intervals_contain_the_estimate_and_shrink_with_more_data():
    widths = []
    for n in (200, 2000):
        y, p = ordinal_data(3, n=n)
        r = evaluate_ordinal(y, p, GRADES, n_bootstrap=200, seed=0)
        for m in ("qwk", "mae", "accuracy", "cut_auc_macro"):
            assert r[f"{m}_ci"][0] <= r[m] <= r[f"{m}_ci"][1], m
        for c in r["cuts"]:
            assert c["auc_ci"][0] <= c["auc"] <= c["auc_ci"][1]
        widths.append(r["qwk_ci"][1] - r["qwk_ci"][0])
    assert widths[1] < 0.6 * widths[0]


def test_patient_bootstrap_is_wider_on_clustered_data():
    y, p = ordinal_data(4, n=50)
    y, p, groups = np.repeat(y, 10), np.repeat(p, 10, axis=0), np.repeat(np.arange(50), 10)
    img = evaluate_ordinal(y, p, GRADES, n_bootstrap=300, seed=0)
    pat = evaluate_ordinal(y, p, GRADES, groups=groups, n_bootstrap=300, seed=0)
    for key in ("qwk_ci", "mae_ci", "cut_auc_macro_ci"):
        assert pat[key][1] - pat[key][0] > 2 * (img[key][1] - img[key][0]), key


def test_single_grade_gives_none_not_nan_and_json_is_strict():
    p = np.tile([0.9, 0.05, 0.05], (20, 1))
    r = evaluate_ordinal(np.zeros(20, int), p, ["a", "b", "c"], n_bootstrap=20)
    assert r["qwk"] is None and r["cut_auc_macro"] is None and r["cut_auc_n_cuts"] == 0
    assert all(c["auc"] is None and c["auc_ci"] is None for c in r["cuts"])
    assert r["mae"] == 0.0 and r["accuracy"] == 1.0
    json.dumps(r, allow_nan=False)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"y_true": [0, 3]}, "0..2. Got 0..3"),
    ({"y_true": [0.5, 1]}, "integer grades"),
    ({"probs": [[0.5, 0.6, 0.0], [0.2, 0.3, 0.5]]}, "sum to 1"),
    ({"y_true": [0, 1], "probs": [[0.5, 0.5], [0.5, 0.5]]}, "'labels'"),
    ({"groups": [1]}, "'groups'"),
    ({"n_bootstrap": 2.5}, "'n_bootstrap'"),
])
def test_bad_input_raises_medxfer_error(kwargs, fragment):
    args = {"y_true": [0, 2], "probs": [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], "labels": ["a", "b", "c"]}
    args.update(kwargs)
    y, p, labels = args.pop("y_true"), args.pop("probs"), args.pop("labels")
    with pytest.raises(MedxferError) as e:
        evaluate_ordinal(y, p, labels, **args)
    assert fragment in str(e.value)


def corn_reference_loss(logits, y, k):
    """The CORN loss written as in the paper: one binary task per k on the images with y >= k."""
    total, count = 0.0, 0
    for j in range(k - 1):
        sel = y >= j
        if sel.any():
            z, t = logits[sel, j], (y[sel] > j).float()
            total = total + torch.nn.functional.binary_cross_entropy_with_logits(z, t, reduction="sum")
            count += int(sel.sum())
    return total / count


def test_corn_probabilities_sum_to_one_and_are_rank_consistent():
    torch.manual_seed(0)
    z = torch.randn(200, 4) * 4
    p = corn_probabilities(z)
    assert p.shape == (200, 5) and torch.all(p >= 0)
    assert torch.allclose(p.sum(1), torch.ones(200), atol=1e-6)
    above = 1 - torch.cumsum(p, 1)[:, :-1]  # P(grade > k)
    assert torch.all(above[:, 1:] <= above[:, :-1] + 1e-7)
    assert torch.allclose(above, torch.cumprod(torch.sigmoid(z), 1), atol=1e-6)
    hand = corn_probabilities(np.array([[0.0, np.log(3)]]))  # sigmoids 0.5 and 0.75
    assert isinstance(hand, np.ndarray) and hand[0] == pytest.approx([0.5, 0.125, 0.375])
    assert np.array_equal(corn_predict(z).numpy(), predict_grade(p.numpy()))


def test_corn_loss_matches_the_per_task_definition_and_has_gradient():
    torch.manual_seed(1)
    z = torch.randn(64, 4, requires_grad=True)
    y = torch.randint(0, 5, (64,))
    loss = corn_loss(z, y, num_classes=5)
    assert loss.item() == pytest.approx(corn_reference_loss(z, y, 5).item(), rel=1e-6)
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert corn_loss(z[:0], y[:0], 5).item() == 0.0
    with pytest.raises(MedxferError, match="'num_classes' parameter of corn_loss must be 5"):
        corn_loss(z, y, num_classes=4)
    with pytest.raises(MedxferError, match=r"0\.\.4\. Got 0\.\.5"):
        corn_loss(z, torch.tensor([0, 5] * 32), num_classes=5)


def test_corn_trains_a_tiny_linear_model_on_ordinal_data():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 3)).astype(np.float32)
    latent = x @ np.array([1.5, -1.0, 0.5]) + 0.3 * rng.normal(size=600)
    y = np.digitize(latent, [-1.2, -0.3, 0.5, 1.3])  # grades 0..4
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    head = torch.nn.Linear(3, 4)
    first = corn_loss(head(xt), yt, 5).item()
    for _ in range(100):  # plain gradient descent (torch.optim takes seconds to import)
        head.zero_grad()
        loss = corn_loss(head(xt), yt, 5)
        loss.backward()
        with torch.no_grad():
            for param in head.parameters():
                param -= 2.0 * param.grad
    assert loss.item() < 0.5 * first
    with torch.no_grad():
        probs = corn_probabilities(head(xt)).numpy()
    r = evaluate_ordinal(y, probs, GRADES)
    assert r["qwk"] > 0.85 and r["mae"] < 0.4 and r["cut_auc_macro"] > 0.9
