"""Label audit core: planted label flips are found and ranked first, conflicting duplicates found, clear
errors."""

import numpy as np
import pytest

from medxfer.errors import MedxferError
from medxfer.trust.audit import conflicting_duplicates, find_label_issues, out_of_fold_probs


def planted(n=600, dim=20, flip=0.1, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    means = rng.normal(size=(3, dim)) * 2.0
    x = means[y] + rng.normal(size=(n, dim))
    flipped = rng.choice(n, int(flip * n), replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, 3, len(flipped))) % 3
    return x, y, noisy, flipped


def test_audit_finds_planted_flips_and_ranks_them_first():
    x, clean, noisy, flipped = planted()
    probs, info = out_of_fold_probs(x, noisy, folds=5, seed=0)
    assert info["folds"] == 5 and probs.shape == (600, 3) and np.allclose(probs.sum(1), 1)
    r = find_label_issues(probs, noisy)
    found = np.flatnonzero(r["is_issue"])
    truth = set(flipped.tolist())
    recall = len(truth & set(found.tolist())) / len(truth)
    precision = len(truth & set(found.tolist())) / max(len(found), 1)
    assert recall >= 0.9 and precision >= 0.8, (recall, precision)
    top = np.argsort(np.where(r["rank"] > 0, r["rank"], 10 ** 9))[:len(truth)]
    assert len(truth & set(top.tolist())) / len(truth) >= 0.85          # chance would be 0.10
    assert (r["suspected"][flipped] == clean[flipped]).mean() >= 0.9    # and says what the label should be
    assert abs(r["estimated_issues"] - len(truth)) <= 0.3 * len(truth)
    ranks = r["rank"][found]
    assert sorted(ranks.tolist()) == list(range(1, len(found) + 1))
    # rank 1 has the lowest probability of its given label among the suspects
    assert r["self_confidence"][r["rank"] == 1][0] == r["self_confidence"][found].min()


def test_clean_labels_give_few_issues():
    x, clean, _, _ = planted(flip=0.0, seed=1)
    r = find_label_issues(out_of_fold_probs(x, clean, seed=1)[0], clean)
    assert r["is_issue"].mean() < 0.03


def test_out_of_fold_means_never_seen():
    """A memorising model (C huge, one feature per sample) must not be able to fit the held-out labels."""
    rng = np.random.default_rng(2)
    x = np.eye(60)
    y = rng.integers(0, 2, 60)
    probs, _ = out_of_fold_probs(x, y, folds=5, C=1e4)
    assert np.abs(probs[np.arange(60), y] - 0.5).max() < 0.2    # in-sample it would be ~1.0


def test_conflicting_duplicates():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(10, 1, 8, 8), dtype=np.uint8)
    images[7] = images[2]              # same image, different label: reported
    images[9] = images[4]              # same image, same label: not a conflict
    labels = np.array([0, 1, 0, 1, 1, 0, 1, 1, 0, 1])
    assert conflicting_duplicates(images, labels) == [[2, 7]]
    assert conflicting_duplicates(images, np.zeros(10)) == []


@pytest.mark.parametrize("call, words", [
    (lambda: out_of_fold_probs(np.zeros((10, 2)), np.zeros(10, int)), "one class"),
    (lambda: out_of_fold_probs(np.zeros((10, 2)), np.r_[np.zeros(8, int), 1, 1]), "fewer than --folds"),
    (lambda: out_of_fold_probs(np.zeros((10, 2)), np.r_[np.zeros(5, int), np.ones(5, int)], folds=1), "at least 2"),
    (lambda: find_label_issues(np.ones((3, 2)) / 2, [0, 1, 2]), "class indices"),
    (lambda: conflicting_duplicates(np.zeros((3, 2)), [0, 1]), "align"),
])
def test_bad_input(call, words):
    with pytest.raises(MedxferError, match=words):
        call()


def test_text_labels_are_one_clear_error():
    from medxfer.trust.ood import fit_detector

    with pytest.raises(MedxferError, match="integer class indices"):
        out_of_fold_probs(np.zeros((10, 2)), np.array(["a", "b"] * 5))
    with pytest.raises(MedxferError, match="integer class indices"):
        fit_detector(np.zeros((10, 2)), np.zeros((5, 2)), np.array(["a", "b"] * 5))
