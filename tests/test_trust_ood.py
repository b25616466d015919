"""OOD detector: flags far-away features, passes ~95% of held-out in-distribution ones, saves and loads as
plain arrays (no pickle), and refuses bad input in one line."""

import numpy as np
import pytest

from medxfer.errors import MedxferError
from medxfer.trust.ood import OODDetector, fit_detector


def blobs(n, rng, dim=64, shift=0.0):
    """Three classes with different means and a correlated (non-diagonal) covariance."""
    y = rng.integers(0, 3, n)
    means = np.zeros((3, dim))
    means[1, :5], means[2, 5:10] = 3.0, 3.0
    mix = np.eye(dim) + 0.5 * np.random.default_rng(99).normal(size=(dim, dim)) / np.sqrt(dim)
    x = means[y] + rng.normal(size=(n, dim)) @ mix + shift
    return x * np.linspace(0.1, 10, dim), y       # dimensions on very different scales


@pytest.mark.parametrize("method", ["mahalanobis", "knn"])
def test_flags_far_features_and_passes_95_percent_of_held_out_in_distribution(method):
    rng = np.random.default_rng(0)
    xt, yt = blobs(3000, rng)
    xv, _ = blobs(1500, rng)
    xh, _ = blobs(6000, rng)
    det = fit_detector(xt, xv, yt if method == "mahalanobis" else None, method=method)
    _, flags = det.score(xh)
    assert 0.93 <= 1 - flags.mean() <= 0.97, 1 - flags.mean()
    far, _ = blobs(500, rng, shift=8.0)
    noise = rng.normal(size=(500, 64)) * 50
    for x in (far, noise):
        scores, flags = det.score(x)
        assert flags.mean() > 0.99
    assert det.summary()["method"] == method and 0.94 <= det.summary()["val_pass"] <= 0.96


def test_class_means_separate_a_point_between_classes():
    """With class means, a point midway between two class clusters is unusual; one pooled mean misses it."""
    rng = np.random.default_rng(1)
    dim = 20
    y = rng.integers(0, 2, 4000)
    x = rng.normal(size=(4000, dim)) * 0.3
    x[:, 0] += np.where(y == 1, 5.0, -5.0)
    det_cls = fit_detector(x[:2000], x[2000:], y[:2000])
    det_one = fit_detector(x[:2000], x[2000:])
    middle = rng.normal(size=(200, dim)) * 0.3
    assert det_cls.score(middle)[1].mean() > 0.99
    assert det_one.score(middle)[1].mean() < 0.05


def test_save_and_load_without_pickle(tmp_path):
    rng = np.random.default_rng(2)
    xt, yt = blobs(500, rng)
    xv, _ = blobs(300, rng)
    det = fit_detector(xt, xv, yt)
    path = det.save(tmp_path / "ood.npz")
    with np.load(path, allow_pickle=False) as z:      # every array loads without pickle
        assert all(z[k].dtype != object for k in z.files)
    again = OODDetector.load(path)
    xq, _ = blobs(50, rng, shift=1.0)
    assert np.allclose(det.score(xq)[0], again.score(xq)[0]) and again.summary() == det.summary()
    np.savez(tmp_path / "bad.npz", method=np.array([{"a": 1}], dtype=object))
    with pytest.raises(MedxferError, match="cannot read an OOD detector"):
        OODDetector.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(MedxferError, match="not an OOD detector"):
        OODDetector.load(tmp_path / "other.npz")


def test_bad_input():
    rng = np.random.default_rng(3)
    xt, _ = blobs(100, rng)
    with pytest.raises(MedxferError, match="same model"):
        fit_detector(xt, xt[:, :10])
    with pytest.raises(MedxferError, match="one of"):
        fit_detector(xt, xt, method="energy")
    with pytest.raises(MedxferError, match="NaN"):
        fit_detector(xt, np.full((3, 64), np.nan))
    with pytest.raises(MedxferError, match="pass_rate"):
        fit_detector(xt, xt, pass_rate=95)
    det = fit_detector(xt, xt[:10])
    assert det.summary()["few_val"]


def test_low_contrast_flags_blank_images_only():
    from medxfer.trust.ood import contrast_floor, low_contrast

    rng = np.random.default_rng(4)
    train = rng.integers(40, 220, size=(50, 1, 16, 16), dtype=np.uint8)
    floor = contrast_floor(train)
    assert floor > 0
    blank = np.full((3, 1, 16, 16), 128, np.uint8)
    blank[2, 0, 0, 0] = 129                        # one pixel off: still near-constant
    assert low_contrast(blank, floor).all()
    assert not low_contrast(rng.integers(40, 220, size=(20, 1, 16, 16), dtype=np.uint8), floor).any()
    with pytest.raises(MedxferError, match="non-empty"):
        low_contrast(np.zeros((0, 4)), floor)
