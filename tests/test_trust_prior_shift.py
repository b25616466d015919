"""EM prior adaptation recovers a known shifted prevalence, moves the binary threshold the right way, and
leaves an unshifted batch alone."""

import numpy as np
import pytest

from medxfer.errors import MedxferError
from medxfer.trust.prior_shift import adapt_prior, reweight


def batch(n, prior1, rng, src1=0.5):
    """Calibrated posteriors under the source prior ``src1`` of two Gaussian classes; labels at ``prior1``."""
    y = (rng.random(n) < prior1).astype(int)
    x = rng.normal(2.0 * y, 1.0)
    p1 = 1 / (1 + np.exp(-(2.0 * x - 2.0 + np.log(src1 / (1 - src1)))))
    return np.column_stack([1 - p1, p1]), y


@pytest.mark.parametrize("true1", [0.2, 0.625, 0.85])
def test_em_recovers_the_shifted_prevalence(true1):
    rng = np.random.default_rng(0)
    p, y = batch(20000, true1, rng, src1=0.74)
    r = adapt_prior(p, [0.26, 0.74], threshold=0.5)
    assert r["converged"] and r["iterations"] < 1000
    assert abs(r["prevalence"][1] - y.mean()) < 0.02
    acc_before = ((p[:, 1] >= 0.5) == y).mean()
    acc_after = ((r["probs"][:, 1] >= 0.5) == y).mean()
    assert acc_after >= acc_before - 0.002
    if abs(true1 - 0.74) > 0.3:
        assert acc_after > acc_before + 0.01
    moved = r["threshold_on_original"]
    assert (moved < 0.5) == (r["prevalence"][1] > 0.74)      # more positives: a lower bar on the original
    assert np.array_equal(r["probs"][:, 1] >= 0.5, p[:, 1] >= moved)


def test_no_shift_stays_put_and_multiclass_works():
    rng = np.random.default_rng(1)
    p, y = batch(20000, 0.5, rng)
    r = adapt_prior(p, [0.5, 0.5])
    assert abs(r["prevalence"][1] - 0.5) < 0.02
    k, n = 3, 30000
    means = np.eye(k) * 2.5
    src = np.array([1 / 3] * 3)
    true = np.array([0.6, 0.3, 0.1])
    y = rng.choice(k, n, p=true)
    x = means[y] + rng.normal(size=(n, k))
    logit = x @ means.T - 0.5 * (means ** 2).sum(1)
    post = np.exp(logit - logit.max(1, keepdims=True))
    post /= post.sum(1, keepdims=True)
    r = adapt_prior(post, src)
    assert np.abs(np.array(r["prevalence"]) - np.bincount(y, minlength=k) / n).max() < 0.02


def test_reweight_and_bad_input():
    p = np.array([[0.5, 0.5]])
    assert np.allclose(reweight(p, [0.5, 0.5], [0.2, 0.8]), [[0.2, 0.8]])
    with pytest.raises(MedxferError, match="source_prior"):
        adapt_prior(p, [0.5, 0.0])
    with pytest.raises(MedxferError, match="binary"):
        adapt_prior(np.ones((2, 3)) / 3, [1, 1, 1], threshold=0.5)
    with pytest.raises(MedxferError, match="threshold"):
        adapt_prior(p, [0.5, 0.5], threshold=1.5)
    r = adapt_prior(p, [0.5, 0.5], max_iter=1)
    assert r["iterations"] == 1
