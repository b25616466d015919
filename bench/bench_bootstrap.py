"""Bootstrap CIs: 2000 patient-level resamples of 1000 test images, vectorised vs a plain loop.

    .venv/bin/python bench/bench_bootstrap.py        # prints medians of 5 runs and the ratio

The plain peer resamples patients in a Python loop and calls scikit-learn's roc_auc_score per resample
(what a short script would do); medxfer evaluates every resample at once (per-image weights).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from medxfer.evaluation.metrics import evaluate


def data(n: int = 1000, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p1 = np.clip(0.35 * y + rng.uniform(0, 0.65, n), 0, 1)
    return y, np.stack([1 - p1, p1], 1), np.arange(n) // 2


def peer(y, probs, groups, n_boot: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    units = np.unique(groups)
    rows = {u: np.flatnonzero(groups == u) for u in units}
    out = []
    for _ in range(n_boot):
        idx = np.concatenate([rows[u] for u in rng.choice(units, len(units))])
        if len(np.unique(y[idx])) == 2:
            out.append(roc_auc_score(y[idx], probs[idx, 1]))
    return out


def timed(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    y, probs, groups = data()
    evaluate(y[:50], probs[:50], ["a", "b"], n_bootstrap=10)  # warm imports
    ours = timed(lambda: evaluate(y, probs, ["a", "b"], n_bootstrap=2000, groups=groups))
    theirs = timed(lambda: peer(y, probs, groups, 2000), repeats=3)
    print(f"| bootstrap, 2000 patient resamples, 1000 images | medxfer {ours:.2f} s (all metrics) | "
          f"loop + roc_auc_score {theirs:.2f} s (AUC only) | {theirs / ours:.1f}x |")


if __name__ == "__main__":
    main()
