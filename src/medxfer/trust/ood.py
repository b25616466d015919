"""Out-of-distribution scores and flags on pooled backbone features.

Usage::

    from medxfer.trust.ood import fit_detector, OODDetector

    det = fit_detector(train_feats, val_feats, train_labels=y_train)     # Mahalanobis, class means
    det = fit_detector(train_feats, val_feats, method="knn", k=10)       # distance to the 10th neighbour
    scores, flags = det.score(new_feats)       # ood_score (higher = less like training), ood (bool)
    det.save("ood.npz"); det = OODDetector.load("ood.npz")   # arrays only: loading runs no code
    det.summary()                              # method, threshold, pass rate, n: for model.json

Mahalanobis (the default): features are scaled by their sd around the class means, a shared covariance
of the training features around their class means (or around one mean without labels) is estimated with
Ledoit-Wolf shrinkage (scikit-learn; a plain sample covariance is singular when the feature dimension,
1280 for EfficientNet-Lite0, is near or above the number of training images), and the score of an image
is its smallest squared Mahalanobis distance to a class mean (Lee et al. 2018). k-NN: the Euclidean
distance of the standardised features to the k-th nearest training image (after Sun et al. 2022, who
normalise to unit length: that makes a feature far out along the data's own direction look ordinary, so
the length is kept here); it stores the training features.

The threshold is chosen on validation (in-distribution images the detector was not fitted on): the
``ceil((n + 1) * pass_rate)``-th smallest validation score, so that a new image exchangeable with the
validation images passes with probability >= ``pass_rate`` (95% by default; with fewer than
``pass_rate / (1 - pass_rate)`` validation images, 19 at 95%, the largest score is taken and ``few_val`` says
the level is not promised) and about 5% of in-distribution
images are flagged by design. What it cannot promise: that every unusual image is flagged (near-OOD images,
such as another hospital's scanner, may score like in-distribution ones).

Blank and near-constant images: measured on BreastMNIST with EfficientNet-Lite0 features, uniform grey
images score *lower* than the in-distribution test images (AUROC 0.44 Mahalanobis, 0.19 k-NN): a flat image
gives small, central activations. Feature distances cannot catch them, so a pixel check does:
:func:`contrast_floor` (from the training images) and :func:`low_contrast` (flags images whose pixel
standard deviation is below half of the lowest training image's). An image is out of distribution when
either says so.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from medxfer.errors import MedxferError
from medxfer.trust.checks import check_labels

__all__ = ["METHODS", "OODDetector", "contrast_floor", "fit_detector", "low_contrast"]

METHODS = ("mahalanobis", "knn")
FORMAT = "medxfer-ood-1"


def _features(x, what: str, dim: int | None = None) -> np.ndarray:
    f = np.asarray(x, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] == 0:
        raise MedxferError(f"{what} must be a non-empty 2-D array (images x feature dimensions); got shape {f.shape}.")
    if dim is not None and f.shape[1] != dim:
        raise MedxferError(f"{what} have {f.shape[1]} dimensions but the detector was fitted on {dim}: use features "
                           "of the same model and source.")
    if not np.isfinite(f).all():
        raise MedxferError(f"{what} hold {int((~np.isfinite(f)).sum())} NaN or infinite values.")
    return f


class OODDetector:
    """A fitted detector: arrays (``state``) and :meth:`score`. Build it with :func:`fit_detector`."""

    def __init__(self, state: dict):
        self.state = state

    @property
    def method(self) -> str:
        return str(self.state["method"])

    @property
    def threshold(self) -> float:
        return float(self.state["threshold"])

    def raw_scores(self, features) -> np.ndarray:
        """The score of each row of ``features`` (N, D): higher is less like the training images."""
        s = self.state
        f = _features(features, "features", dim=len(s["mean"]))
        z = (f - s["mean"]) / s["std"]
        if self.method == "knn":
            return _knn_distance(z, s["bank"], int(s["k"]))
        w = z @ s["whiten"]                       # whitened: squared distance is a plain sum of squares
        best = np.full(len(w), np.inf)
        for mu in s["centres"] @ s["whiten"]:
            best = np.minimum(best, ((w - mu) ** 2).sum(axis=1))
        return best

    def score(self, features) -> tuple[np.ndarray, np.ndarray]:
        """(ood_score, ood): the score and whether it exceeds the validation threshold."""
        scores = self.raw_scores(features)
        return scores, scores > self.threshold

    def summary(self) -> dict:
        """What model.json needs to describe the detector (JSON-ready)."""
        s = self.state
        return {"method": self.method, "threshold": self.threshold, "pass_rate": float(s["pass_rate"]),
                "val_pass": float(s["val_pass"]), "n_train": int(s["n_train"]), "n_val": int(s["n_val"]),
                "dim": int(len(s["mean"])), "k": int(s["k"]), "shrinkage": float(s["shrinkage"]),
                "few_val": bool(s["few_val"]), "format": FORMAT}

    def save(self, path: str | Path) -> Path:
        """Arrays only (npz), so that :meth:`load` never unpickles (runs) anything."""
        path = Path(path)
        try:
            with open(path, "wb") as f:
                np.savez(f, **{k: np.asarray(v) for k, v in self.state.items()}, format=np.array(FORMAT))
        except OSError as e:
            raise MedxferError(f"cannot write the OOD detector to {path}: {e.strerror}. Choose a writable place.") from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> "OODDetector":
        try:
            with np.load(path, allow_pickle=False) as z:
                state = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise MedxferError(f"cannot read an OOD detector from {path}: {e}. Give the file OODDetector.save wrote.") \
                from None
        if str(state.pop("format", "")) != FORMAT or not {"method", "mean", "std", "threshold"} <= set(state):
            raise MedxferError(f"{path} is not an OOD detector medxfer wrote ({FORMAT}).")
        state["method"] = str(state["method"])
        return cls(state)


def _spread(centred: np.ndarray) -> np.ndarray:
    """Per-dimension sd, floored so that constant dimensions do not blow up."""
    sd = centred.std(axis=0)
    return np.maximum(sd, max(1e-2 * float(sd.mean()), 1e-12))


def _knn_distance(q: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """Euclidean distance of each row of ``q`` to its k-th nearest row of ``bank`` (in chunks)."""
    out = np.empty(len(q))
    sq_bank = (bank ** 2).sum(axis=1)
    for i in range(0, len(q), 1024):
        part = q[i:i + 1024]
        d2 = (part ** 2).sum(axis=1)[:, None] - 2 * part @ bank.T + sq_bank[None, :]
        out[i:i + 1024] = np.sqrt(np.maximum(np.partition(d2, k - 1, axis=1)[:, k - 1], 0))
    return out


def fit_detector(train_features, val_features, train_labels=None, method: str = "mahalanobis", k: int = 10,
                 pass_rate: float = 0.95) -> OODDetector:
    """Fit on the training images' features (with their class indices for class means, optional), and set the
    threshold on the validation images' features so that ``pass_rate`` of in-distribution images pass."""
    if method not in METHODS:
        raise MedxferError(f"the OOD method must be one of {list(METHODS)}; got {method!r}.")
    if not 0.5 <= float(pass_rate) < 1:
        raise MedxferError(f"pass_rate must be in [0.5, 1) (the share of in-distribution images that pass, e.g. "
                           f"0.95); got {pass_rate!r}.")
    x = _features(train_features, "training features")
    v = _features(val_features, "validation features", dim=x.shape[1])
    if len(x) < 2:
        raise MedxferError(f"an OOD detector needs at least 2 training images; got {len(x)}.")
    mean = x.mean(axis=0)
    state = {"method": np.array(method), "mean": mean, "k": np.array(int(k)),
             "n_train": np.array(len(x)), "n_val": np.array(len(v)), "pass_rate": np.array(float(pass_rate)),
             "shrinkage": np.array(math.nan)}
    if method == "knn":
        if not 1 <= int(k) <= len(x):
            raise MedxferError(f"k must be between 1 and the number of training images ({len(x)}); got {k!r}.")
        state["std"] = _spread(x - mean)
        state["bank"] = (x - mean) / state["std"]
    else:
        from sklearn.covariance import LedoitWolf

        if train_labels is None:
            centres, resid = mean[None, :], x - mean
        else:
            y = check_labels(train_labels, len(x), what="training labels")
            present = np.unique(y)
            centres = np.stack([x[y == c].mean(axis=0) for c in present])
            resid = x - centres[np.searchsorted(present, y)]
        # scaled by the spread around the class means, so that shrinking towards a multiple of the identity
        # treats every dimension alike (the spread between classes would hide how tight each class is)
        std = state["std"] = _spread(resid)
        lw = LedoitWolf(assume_centered=True).fit(resid / std)
        # precision = W W^T (Cholesky), so that (a - b)^T P (a - b) = ||a W - b W||^2
        state["whiten"] = np.linalg.cholesky(lw.precision_ + 1e-10 * np.eye(len(mean)))
        state["centres"] = (centres - mean) / std
        state["shrinkage"] = np.array(float(lw.shrinkage_))
    det = OODDetector(state)
    scores = det.raw_scores(v)
    n = len(scores)
    rank = math.ceil((n + 1) * float(pass_rate))
    threshold = float(np.sort(scores)[min(rank, n) - 1])   # rank > n (few images): the largest, said in val_pass
    state["threshold"] = np.array(threshold)
    state["val_pass"] = np.array(float((scores <= threshold).mean()))
    state["few_val"] = np.array(rank > n)    # too few validation images to promise pass_rate
    return det


def _pixel_sd(images) -> np.ndarray:
    arr = images.numpy() if hasattr(images, "numpy") else np.asarray(images)
    if arr.ndim < 2 or len(arr) == 0:
        raise MedxferError(f"images must be a non-empty array (images x pixels...); got shape {arr.shape}.")
    return arr.reshape(len(arr), -1).astype(np.float64).std(axis=1)


def contrast_floor(train_images, fraction: float = 0.5) -> float:
    """``fraction`` of the lowest per-image pixel standard deviation among the training images (same pixel
    scale as the images later checked, e.g. the decoded uint8 images): below it an image is near-constant."""
    return float(fraction * _pixel_sd(train_images).min())


def low_contrast(images, floor: float) -> np.ndarray:
    """Whether each image's pixel standard deviation is below ``floor`` (blank, saturated, near-constant)."""
    return _pixel_sd(images) < float(floor)
