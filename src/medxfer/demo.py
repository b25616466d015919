"""``medxfer demo``: does transfer help when labels are few? Put to the test on bundled BreastMNIST.

Transfer learning promises most where target labels are few. The demo keeps 10% of BreastMNIST's train
labels (55 images; a different stratified draw for each seed), trains three arms on them from each seed:

- ``linear-probe``: a logistic head on the features of the frozen ImageNet EfficientNet-Lite0;
- ``full``: the whole ImageNet network fine-tuned (medxfer's default recipe);
- ``scratch``: the same network from random initialisation,

tests each on BreastMNIST's own 156 test images, and compares the transfer arm that is best on
*validation* (mean validation AUC over seeds) with scratch on the same test images: the paired DeLong
test on the probabilities averaged over seeds, and the count of seeds each arm won. It ends with one
plain sentence of what the numbers say, whatever they say.

Runs go to ``OUT/<arm>/seed<k>`` (full run directories: ``medxfer report``, ``predict``, ``export`` work
on them) and the summary to ``OUT/demo.json``. Runs are trained ``workers`` at a time in separate
processes (one PyTorch thread each unless ``num_threads`` gives more), since one 55-image batch keeps two
threads of one process half idle.

Usage::

    from medxfer.demo import run_demo

    summary = run_demo("runs/demo", seeds=[0, 1, 2])
    summary["paired_test"]["p_value"], summary["sentence"]
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from medxfer import files
from medxfer.config import TrainConfig
from medxfer.errors import MedxferError
from medxfer.evaluation.metrics import evaluate
from medxfer.evaluation.stats import delong_test, summarize
from medxfer.pipeline import train
from medxfer.runs import Run

log = logging.getLogger("medxfer.demo")

DATA = Path(__file__).resolve().parent / "datasets" / "breastmnist_28.npz"
ARMS = (("scratch", "scratch (random init)"),   # longest first: the pool ends sooner
        ("full", "full fine-tune (ImageNet)"),
        ("linear-probe", "linear probe (ImageNet)"))
TRANSFER = ("full", "linear-probe")
SEEDS = (0, 1, 2)
FRACTION = 0.1
IMAGE_SIZE = 64
ALPHA = 0.05
BOOTSTRAP = 1000


def demo_config(arm: str, seed: int, fraction: float, out: Path, threads: int, **options) -> TrainConfig:
    """One demo run: BreastMNIST at 64 px (the size medxfer chooses for 28 px images), ``fraction`` of its
    train labels, malignant as the positive class, no report (the demo prints its own summary); ``options``
    (flat option names) on top, e.g. a shorter run in tests."""
    flat = dict(data=str(DATA), strategy=arm, seed=seed, label_fraction=fraction, image_size=IMAGE_SIZE,
                label_names=("malignant", "benign"), positive_label="malignant", report=False, overwrite=True,
                out=str(out / arm / f"seed{seed}"), num_threads=threads)
    return TrainConfig.create(**{**flat, **options})


def plan(n_jobs: int, num_threads: int | None) -> tuple[int, int]:
    """(processes, PyTorch threads each): one process per usable core (at most one per job), each with one
    thread, unless ``num_threads`` gives a total to share out."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = max(1, int(num_threads or usable or 1))
    workers = max(1, min(n_jobs, cores))
    return workers, max(1, cores // workers)


def _train_here(cfg: TrainConfig) -> str:
    """Train one run in this process (its threads are the run's --num-threads); return its directory."""
    return str(train(cfg).dir)


def _train_one(config: dict) -> str:
    """Train one run in a worker process; its log goes to the run's train.log, warnings to stderr."""
    cfg = TrainConfig.from_dict(config)
    torch.set_num_threads(cfg.runtime.num_threads or 1)
    logger = logging.getLogger("medxfer")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not logger.handlers:
        stderr = logging.StreamHandler()
        stderr.setLevel(logging.WARNING)
        stderr.setFormatter(logging.Formatter(f"warning ({cfg.optim.strategy}, seed {cfg.optim.seed}): %(message)s"))
        logger.addHandler(stderr)
    return _train_here(cfg)


def train_all(configs: list[TrainConfig], workers: int, say) -> list[Run]:
    """Train ``configs`` (in ``workers`` processes when more than one), saying each as it finishes."""
    done: dict[int, Run] = {}
    if workers == 1:
        for i, cfg in enumerate(configs):
            done[i] = Run.load(_train_here(cfg))  # one at a time: this process, its own log on the screen
            say(len(done), len(configs), done[i])
    else:
        ctx = multiprocessing.get_context("spawn")  # torch's threads do not survive a fork
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(_train_one, cfg.to_dict()): i for i, cfg in enumerate(configs)}
            for f in as_completed(futures):
                done[futures[f]] = Run.load(f.result())
                say(len(done), len(configs), done[futures[f]])
    return [done[i] for i in range(len(configs))]


def _test_scores(runs: list[Run]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample ids, 1 for malignant, P(malignant) averaged over the runs) on the test split."""
    frames = [r.test_predictions.set_index("sample_id").sort_index() for r in runs]
    if any(not f.index.equals(frames[0].index) for f in frames):
        raise MedxferError("the demo's runs were tested on different images; remove the demo's output folder "
                           "(--out) and run it again.")
    y = (frames[0]["label"].astype(str) == "malignant").to_numpy(int)
    return frames[0].index.to_numpy(), y, np.mean([f["prob_malignant"].to_numpy(float) for f in frames], axis=0)


def summarise(by_arm: dict[str, list[Run]], fraction: float) -> dict:
    """Per arm: test and validation AUC over seeds; the transfer arm best on validation against scratch."""
    arms = {}
    for arm, runs in by_arm.items():
        arms[arm] = {"test_auc": summarize([r.metrics["test"].get("auc") for r in runs]),
                     "val_auc": summarize([r.metrics["val"].get("auc") for r in runs]),
                     "test_auc_ci": [r.metrics["test"].get("auc_ci") for r in runs],
                     "train_seconds": summarize([r.metrics.get("train_seconds") for r in runs]),
                     "n_train": int((runs[0].split["split"] == "train").sum()),
                     "n_test": int((runs[0].split["split"] == "test").sum()),
                     "runs": [str(r.dir) for r in runs]}
    scores = {arm: _test_scores(runs) for arm, runs in by_arm.items()}
    ids, y, _ = scores["scratch"]
    if any(not np.array_equal(i, ids) for i, _, _ in scores.values()):
        raise MedxferError("the demo's runs were tested on different images; remove the demo's output folder "
                           "(--out) and run it again.")
    for arm, (_, _, p) in scores.items():  # the seeds' averaged probabilities: one model per arm, with its CI
        m = evaluate(y, np.stack([1 - p, p], axis=1), ["other", "malignant"], n_bootstrap=BOOTSTRAP, seed=0)
        arms[arm]["averaged"] = {"auc": m["auc"], "auc_ci": m.get("auc_ci")}
    best = max(TRANSFER, key=lambda a: arms[a]["val_auc"]["mean"] if arms[a]["val_auc"]["mean"] is not None else -1)
    test = delong_test(y, scores[best][2], scores["scratch"][2])
    wins = sum(a > b for a, b in zip(arms[best]["test_auc"]["values"], arms["scratch"]["test_auc"]["values"])
               if a is not None and b is not None)
    test.update(a=best, b="scratch", seeds_won=[wins, len(by_arm[best])], n_test=int(len(y)),
                scores="per-image test P(malignant) averaged over seeds", alpha=ALPHA)
    return {"data": "BreastMNIST (bundled)", "label_fraction": fraction,
            "n_train": arms["scratch"]["n_train"], "seeds": len(by_arm[best]), "arms": arms,
            "best_transfer_on_validation": best, "paired_test": test, "sentence": sentence(test, arms, best)}


def sentence(test: dict, arms: dict, best: str) -> str:
    """What the numbers say, in one plain sentence, whatever they say."""
    n, name = arms["scratch"]["n_train"], dict(ARMS)[best]
    if test["diff"] is None or test["p_value"] is None:
        return f"With {n} labelled training images the test split cannot tell {name} and scratch apart (AUC undefined)."
    won, seeds = test["seeds_won"]
    lo, hi = test["ci_diff"]
    mean_a, mean_b = arms[best]["test_auc"]["mean"], arms["scratch"]["test_auc"]["mean"]
    numbers = (f"test AUC {mean_a:.3f} vs {mean_b:.3f} on average over {seeds} seeds (ahead in {won} of {seeds}), "
               f"{test['auc_a']:.3f} vs {test['auc_b']:.3f} with the seeds' probabilities averaged: difference "
               f"{test['diff']:+.3f}, 95% CI {lo:+.3f} to {hi:+.3f}, paired DeLong p = {test['p_value']:.2g}")
    if test["p_value"] >= ALPHA:
        return (f"With {n} labelled training images, {name} and training from scratch did not differ significantly "
                f"on {test['n_test']} test images: {numbers}.")
    if test["diff"] > 0:
        return f"With {n} labelled training images, transfer helped: {name} beat training from scratch, {numbers}."
    return (f"With {n} labelled training images, transfer did not help here: training from scratch beat {name}, "
            f"{numbers}.")


def run_demo(out_dir, seeds=None, num_threads: int | None = None, *, fraction: float = FRACTION,
             workers: int | None = None, echo=None, options: dict | None = None) -> dict:
    """Train the demo's arms x seeds, saying each run as it ends (``echo``), write ``OUT/demo.json``; return it
    (:func:`table` and ``summary["sentence"]`` are what ``medxfer demo`` prints)."""
    echo = echo or log.info
    seeds = list(SEEDS if seeds is None else seeds)
    if not seeds:
        raise MedxferError("The 'seeds' parameter needs at least one seed (e.g. 0,1,2).")
    if not 0 < fraction <= 1:
        raise MedxferError(f"The 'label-fraction' parameter must be in (0, 1]. Got {fraction!r} instead.")
    out = Path(out_dir)
    n_jobs = len(ARMS) * len(seeds)
    procs, threads = plan(n_jobs, num_threads) if workers is None else (max(1, workers), num_threads or 1)
    echo(f"Does transfer help when labels are few? BreastMNIST (breast ultrasound, malignant vs normal/benign; "
         f"MedMNIST v2, CC BY 4.0), {fraction:.0%} of its train labels, {IMAGE_SIZE} px, seeds "
         f"{','.join(map(str, seeds))}: {n_jobs} runs, {procs} at a time ({threads} thread{'s' * (threads > 1)} each).")
    t0 = time.perf_counter()
    configs = [demo_config(arm, s, fraction, out, threads, **(options or {})) for arm, _ in ARMS for s in seeds]

    def say(i, n, run):
        echo(f"[{i}/{n}] {run.config.optim.strategy}, seed {run.config.optim.seed}: test AUC "
             f"{run.metrics['test']['auc']:.3f} (validation {run.metrics['val']['auc']:.3f}), "
             f"{time.perf_counter() - t0:.0f} s")

    runs = train_all(configs, procs, say)
    by_arm = {arm: [r for r in runs if r.config.optim.strategy == arm] for arm, _ in ARMS}
    summary = summarise(by_arm, fraction)
    summary["image_size"] = runs[0].image_size
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    files.write_json(out / "demo.json", summary)
    return summary


def table(summary: dict):
    """The summary as a rich table: one row per arm, * on the transfer arm chosen on validation."""
    from rich.table import Table

    t = Table(title=f"BreastMNIST test split ({summary['arms']['scratch'].get('n_test', 156)} images), trained on "
                    f"{summary['n_train']} labels ({summary['label_fraction']:.0%}), {summary['seeds']} seeds; "
                    "positive class: malignant")
    for col in ("arm", "test AUC by seed", "mean (sd)", "seeds averaged (95% CI)", "val AUC", "s/run"):
        t.add_column(col, no_wrap=True)
    for arm, name in ARMS:
        a = summary["arms"][arm]
        by_seed = " ".join("n/a" if v is None else f"{v:.3f}" for v in a["test_auc"]["values"])
        m, sd = a["test_auc"]["mean"], a["test_auc"]["sd"]
        avg, ci = a.get("averaged", {}).get("auc"), a.get("averaged", {}).get("auc_ci")
        t.add_row(name + (" *" if arm == summary["best_transfer_on_validation"] else ""), by_seed,
                  "n/a" if m is None else f"{m:.3f}" + (f" ({sd:.3f})" if sd is not None else ""),
                  "n/a" if avg is None else f"{avg:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else ""),
                  "n/a" if a["val_auc"]["mean"] is None else f"{a['val_auc']['mean']:.3f}",
                  f"{a['train_seconds']['mean']:.0f}" if a["train_seconds"]["mean"] is not None else "n/a")
    return t
