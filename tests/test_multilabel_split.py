"""Multi-label iterative stratification (medxfer.data.multilabel_split): patients kept together,
every label's positives spread over the splits, fractions kept, seeded."""

import numpy as np
import pandas as pd
import pytest

from medxfer.data.multilabel_split import multilabel_kfold, multilabel_split
from medxfer.errors import MedxferError

PREVALENCE = (0.35, 0.2, 0.1, 0.06, 0.04, 0.01)
SPLITS = ("train", "val", "test")


def patient_data(n_patients=400, seed=0):
    """1-6 images per patient; a patient's finding appears on a random subset of their images."""
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 7, n_patients)
    has = rng.random((n_patients, len(PREVALENCE))) < np.array(PREVALENCE)
    groups = np.repeat([f"P{i:04d}" for i in range(n_patients)], per)
    Y = np.repeat(has, per, axis=0) & (rng.random((per.sum(), len(PREVALENCE))) < 0.7)
    return Y.astype(int), groups


def positive_patients(Y, groups, mask, j):
    return len(np.unique(groups[mask & (Y[:, j] == 1)]))


def test_patients_stay_together_and_labels_reach_every_split():
    Y, groups = patient_data()
    split = multilabel_split(Y, groups=groups, seed=0)
    assert set(split) == set(SPLITS)
    assert pd.DataFrame({"g": groups, "s": split}).groupby("g")["s"].nunique().max() == 1
    for j in range(Y.shape[1]):
        total = positive_patients(Y, groups, np.ones(len(Y), bool), j)
        if total >= 10:
            counts = [positive_patients(Y, groups, split == s, j) for s in SPLITS]
            assert min(counts) >= 1, (j, counts)
            for c, f in zip(counts, (0.70, 0.15, 0.15)):  # in proportion, within two patients
                assert abs(c - f * total) <= 2, (j, counts)


def test_fractions_close_to_asked_in_images():
    Y, groups = patient_data(seed=1)
    for fractions in ((0.70, 0.15, 0.15), (0.6, 0.2, 0.2), (0.8, 0.1, 0.1)):
        split = multilabel_split(Y, groups=groups, fractions=fractions, seed=3)
        got = [np.mean(split == s) for s in SPLITS]
        assert got == pytest.approx(fractions, abs=0.02), (fractions, got)


def test_without_groups_each_label_is_split_almost_exactly():
    rng = np.random.default_rng(2)
    Y = (rng.random((1000, 5)) < [0.3, 0.1, 0.05, 0.02, 0.01]).astype(int)
    split = multilabel_split(Y, seed=0)
    for j in range(5):
        for s, f in zip(SPLITS, (0.70, 0.15, 0.15)):
            assert abs(Y[split == s, j].sum() - f * Y[:, j].sum()) <= 1.5, (j, s)

    def deviation(sp):
        return sum(abs(Y[sp == s].sum(0) - f * Y.sum(0)).sum() for s, f in zip(SPLITS, (0.7, 0.15, 0.15)))

    random_splits = [deviation(rng.permutation(split)) for _ in range(20)]  # same sizes, no strata
    assert deviation(split) < 0.25 * np.mean(random_splits)


def test_seeded():
    Y, groups = patient_data(n_patients=150, seed=4)
    a = multilabel_split(Y, groups=groups, seed=5)
    assert np.array_equal(a, multilabel_split(Y, groups=groups, seed=5))
    assert not np.array_equal(a, multilabel_split(Y, groups=groups, seed=6))
    f = multilabel_kfold(Y, groups=groups, k=4, seed=5)
    assert np.array_equal(f, multilabel_kfold(Y, groups=groups, k=4, seed=5))


def test_kfold_keeps_patients_and_stratifies_labels():
    Y, groups = patient_data(seed=5)
    k = 5
    fold = multilabel_kfold(Y, groups=groups, k=k, seed=0)
    assert fold.dtype.kind == "i" and set(fold) == set(range(k))
    assert pd.DataFrame({"g": groups, "f": fold}).groupby("g")["f"].nunique().max() == 1
    assert np.bincount(fold) / len(fold) == pytest.approx([1 / k] * k, abs=0.02)
    for j in range(Y.shape[1]):
        total = positive_patients(Y, groups, np.ones(len(Y), bool), j)
        if total >= 2 * k:
            counts = [positive_patients(Y, groups, fold == i, j) for i in range(k)]
            assert max(counts) - min(counts) <= 2, (j, counts)


def test_missing_patient_ids_are_units_of_their_own_and_inputs_may_be_lists():
    Y, groups = patient_data(n_patients=60, seed=6)
    groups = groups.astype(object)
    groups[::7] = None
    split = multilabel_split(Y.tolist(), groups=list(groups), seed=0)
    known = groups != None  # noqa: E711
    table = pd.DataFrame({"g": groups[known], "s": split[known]})
    assert table.groupby("g")["s"].nunique().max() == 1
    assert set(split) == set(SPLITS)


def test_tiny_data_gets_no_empty_split():
    split = multilabel_split([[1, 0], [0, 1], [1, 1]], groups=["a", "b", "c"], seed=0)
    assert sorted(split) == ["test", "train", "val"]


@pytest.mark.parametrize("call, fragment", [
    (lambda: multilabel_split([0, 1, 1]), "'Y' parameter of multilabel_split must be an (N, K)"),
    (lambda: multilabel_split([[0, 2], [1, 0], [0, 1]]), "Got [2]"),
    (lambda: multilabel_split([[0, 1]] * 4, groups=["a", "b"]), "one patient id per row of Y (4)"),
    (lambda: multilabel_split([[0, 1]] * 4, groups=["a", "a", "b", "b"]),
     "at least 3 patients for a train/val/test split. Got 2"),
    (lambda: multilabel_split([[0, 1]] * 9, fractions=(0.7, 0.2, 0.2)), "Got (0.7, 0.2, 0.2)"),
    (lambda: multilabel_split([[0, 1]] * 9, fractions=(0.9, 0.1)), "three numbers"),
    (lambda: multilabel_kfold([[0, 1]] * 9, k=1), "'k' parameter of multilabel_kfold"),
    (lambda: multilabel_kfold([[0, 1]] * 9, groups=list("aaabbbccc"), k=5),
     "at least 5 patients for 5 folds. Got 3"),
    (lambda: multilabel_split([[0, 1]] * 9, seed=-1), "'seed'"),
])
def test_errors_name_the_value(call, fragment):
    with pytest.raises(MedxferError) as e:
        call()
    assert fragment in str(e.value)
