"""Frozen backbones run once per image: extract pooled features, cache them on disk, train the head on them.

Usage::

    feats = extract_features(model, images, key_parts={...}, cache_dir=dir)   # (N, D) float32
    fit(model.head(), groups, feats_train, y_train, feats_val, y_val, settings)  # ms per epoch

The cache key covers the source, its weights hash, the preprocessing and the image content, so a
change in any of them recomputes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from medxfer import progress
from medxfer.data.cache import DecodeCache, cache_root
from medxfer.engine.objectives import auc_score
from medxfer.engine.trainer import as_input, autocast


def content_hash(images: torch.Tensor, rows: int = 1024) -> str:
    """sha256 of the images' bytes, fed ``rows`` at a time: no copy of the whole set (the images may be a
    memory map of the decoded store far larger than memory); the same digest as of all the bytes at once."""
    h = hashlib.sha256()
    arr = images.numpy()
    for start in range(0, len(arr), rows):
        h.update(np.ascontiguousarray(arr[start:start + rows]))
    return h.hexdigest()[:32]


def source_key_parts(spec, info: dict, size: int, read, seed: int) -> dict:
    """What a source's features depend on (besides the images): one definition for train and export."""
    key = {"source": spec.name, "arch": spec.arch, "weights": info["weights_sha256"], "size": size,
           "grey_mode": info["grey_mode"], "read": read.key(), "chans": info["in_chans"]}
    if info.get("spatial_dims", 2) == 3:  # i3d and acs make different networks from the same 2-D weights
        key.update(dims=3, inflate=info.get("inflate", "i3d"))
    if info["weights_sha256"] is None:  # a random backbone: its features depend on the seed
        key["seed"] = seed
    return key


def feature_cache_dir(cache_dir: str | None, no_cache: bool) -> Path | None:
    """Features live in ``features/`` under the cache folder given (``--cache-dir``, else
    ``$MEDXFER_CACHE_DIR``, else ``~/.cache/medxfer``, beside the decode cache); None with ``--no-cache``.
    The folder is checked to be writable before any work."""
    if no_cache:
        return None
    folder = cache_root(cache_dir)
    DecodeCache(folder).check_writable()
    return folder


def feature_key(key_parts: dict, images: torch.Tensor) -> str:
    blob = json.dumps(key_parts, sort_keys=True, default=str) + content_hash(images)
    return hashlib.sha256(blob.encode()).hexdigest()[:40]


@torch.no_grad()
def compute_features(model, images: torch.Tensor, batch_size: int = 64, precision: str = "fp32",
                     device: torch.device = torch.device("cpu"), augment=None) -> torch.Tensor:
    """Pooled pre-logit features of uint8 images (N, C, S, S) -> float32 (N, D).

    Model and inputs both channels_last (a mixed layout converts at every convolution: 2.6x slower
    on CPU here); batch 64 measured faster than 256 on 2 CPU cores.
    """
    model.eval().to(device, memory_format=torch.channels_last if images.ndim == 4 else torch.contiguous_format)
    out = []
    with progress.task("extracting features", total=len(images), unit="images") as bar:
        for i in range(0, len(images), batch_size):
            xb = as_input(images[i:i + batch_size], device, channels_last=True)
            if augment is not None:
                xb = augment(xb)
            with autocast(precision, device):
                out.append(model.features(xb).float().cpu())
            bar.advance(len(xb))
    return torch.cat(out)


def extract_features(model, images: torch.Tensor, key_parts: dict, cache_dir: str | Path | None,
                     **kw) -> tuple[torch.Tensor, bool]:
    """Features from the on-disk cache when present, else computed and stored; returns (features, hit)."""
    if cache_dir is None:
        return compute_features(model, images, **kw), False
    path = Path(cache_dir) / "features" / f"{feature_key(key_parts, images)}.npy"
    if path.exists():
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False)), True
        except (ValueError, OSError, EOFError):
            path.unlink(missing_ok=True)  # a damaged entry is a miss
    feats = compute_features(model, images, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        np.save(f, feats.numpy())
    os.replace(tmp, path)
    return feats, False


def standardize(train: torch.Tensor, *others: torch.Tensor):
    """Zero-mean unit-variance features (statistics from ``train``); returns (mu, sd, train, *others)."""
    mu, sd = train.mean(0), train.std(0)
    sd = sd.clamp(min=max(1e-2 * float(sd.mean()), 1e-6))  # near-constant features are not blown up
    return (mu, sd, (train - mu) / sd, *[(o - mu) / sd for o in others])


@torch.no_grad()
def fold_standardization(linear: torch.nn.Linear, mu: torch.Tensor, sd: torch.Tensor) -> None:
    """Make a head trained on standardised features take raw features: W' = W / sd, b' = b - W' mu."""
    linear.weight.div_(sd)
    linear.bias.sub_(linear.weight @ mu)


C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def fit_logistic_head(linear: torch.nn.Linear, x_train, y_train, x_val, y_val, seed: int = 0,
                      class_weight: str | None = None) -> dict:
    """scikit-learn logistic regression on standardised features, C chosen by validation AUC.

    The fitted coefficients are copied into ``linear`` (binary: logits [0, z], so softmax = sigmoid(z)).
    Returns a record of the search (C grid, validation AUC per C, chosen C).
    """
    from threadpoolctl import threadpool_limits

    xt, xv = x_train.numpy(), x_val.numpy()
    yt, yv = y_train.numpy(), y_val.numpy()
    k = linear.out_features
    with threadpool_limits(limits=1, user_api="blas"):  # small problems: threaded BLAS is far slower here
        (c, clf), scores = _search_c(xt, yt, xv, yv, k, seed, class_weight)
    w = np.zeros((k, xt.shape[1]), np.float32)
    b = np.zeros(k, np.float32)
    if clf.coef_.shape[0] == 1:  # two classes seen: one row, for the second of them (the other stays 0)
        w[clf.classes_[1]], b[clf.classes_[1]] = clf.coef_[0], clf.intercept_[0]
    else:
        w[clf.classes_], b[clf.classes_] = clf.coef_, clf.intercept_
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(w))
        linear.bias.copy_(torch.from_numpy(b))
    return {"C_grid": list(C_GRID), "val_auc_per_C": [scores[c_] for c_ in C_GRID], "C": c, "val_auc": scores[c]}


def fit_logistic_heads(linear: torch.nn.Linear, x_train, y_train, x_val, y_val, seed: int = 0,
                       class_weight: str | None = None) -> dict:
    """Multi-label: one logistic regression per finding on standardised features, one C for all chosen by
    the validation macro AUC; copied into ``linear`` (row k: finding k's logit). A finding without
    positive (or negative) training images gets zero weights and its training prevalence as bias."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from threadpoolctl import threadpool_limits

    xt, xv = x_train.numpy(), x_val.numpy()
    yt, yv = y_train.numpy() > 0.5, y_val.numpy() > 0.5
    k = yt.shape[1]
    learnable = [j for j in range(k) if 0 < yt[:, j].sum() < len(yt)]
    scored = [j for j in learnable if 0 < yv[:, j].sum() < len(yv)]
    best, scores = None, {}
    with threadpool_limits(limits=1, user_api="blas"):
        for c in C_GRID:
            fits = {j: LogisticRegression(C=c, max_iter=3000, class_weight=class_weight, random_state=seed)
                    .fit(xt, yt[:, j]) for j in learnable}
            scores[c] = float(np.mean([roc_auc_score(yv[:, j], fits[j].decision_function(xv)) for j in scored])) \
                if scored else float("nan")
            if best is None or scores[c] > scores[best[0]] + 1e-9:
                best = (c, fits)
    c, fits = best
    prevalence = np.clip(yt.mean(0), 1e-4, 1 - 1e-4)
    w = np.zeros((k, xt.shape[1]), np.float32)
    b = np.log(prevalence / (1 - prevalence)).astype(np.float32)
    for j, clf in fits.items():
        w[j], b[j] = clf.coef_[0], clf.intercept_[0]
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(w))
        linear.bias.copy_(torch.from_numpy(b))
    return {"C_grid": list(C_GRID), "val_auc_per_C": [scores[c_] for c_ in C_GRID], "C": c, "val_auc": scores[c]}


def _search_c(xt, yt, xv, yv, k: int, seed: int, class_weight):
    from sklearn.linear_model import LogisticRegression

    best, scores = None, {}
    for c in C_GRID:
        clf = LogisticRegression(C=c, max_iter=3000, class_weight=class_weight, random_state=seed)
        clf.fit(xt, yt)
        full = np.zeros((len(xv), k))
        full[:, clf.classes_] = clf.predict_proba(xv)
        scores[c] = auc_score("single", yv, full)
        if best is None or scores[c] > scores[best[0]] + 1e-9:
            best = (c, clf)
    return best, scores
