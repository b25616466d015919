"""``compare``: every strategy x seed on one split, summarised over seeds, with a paired test.

Usage::

    from medxfer import TrainConfig
    from medxfer.comparison import compare

    base = TrainConfig.create(data="data/breastmnist_28.npz", image_size=64)
    result = compare(base, ["linear-probe", "full", "scratch"], [0, 1, 2], out="runs/compare",
                     label_fractions=[0.1, 1.0])
    result["strategies"]["full"]["test_auc"]["mean"]

With ``sources=[A, B, ...]`` every transfer strategy runs from each source (rows "full [B]"), so
ImageNet, a medical source and scratch land in one table; scratch runs once per architecture.

Layout of ``out``::

    <strategy>/seed<k>/                a full run directory (``medxfer.pipeline.train``), first source
    <source>/<strategy>/seed<k>/       the same for each further source
    <strategy>/frac<f>/seed<k>/        learning-curve runs (fractions below 1; 1.0 reuses seed<k>/)
    comparison.json                    summaries over seeds, settings, the paired test
    comparison.html                    self-contained: table, plots (base64 PNG), the paired test

The split is made once from the data with ``split_seed`` (or comes with the data), so seeds vary
the training only; every run's ``split.csv`` is checked to be the same. A run directory that
already holds a finished run of the same configuration is reused, not retrained. The strategy tested
against scratch is the one best on validation, never on the test set it is then tested on.
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path

import numpy as np

from medxfer import files
from medxfer.config import AUTO_PRESETS, TrainConfig, auto_augment
from medxfer.engine.handlers import CHECKPOINT_FORMAT
from medxfer.errors import MedxferError, did_you_mean
from medxfer.evaluation import html, plots
from medxfer.evaluation.ordinal import predict_grade
from medxfer.evaluation.stats import delong_test, mean_sd, paired_bootstrap, paired_bootstrap_metric, summarize
from medxfer.evaluation.tasks import label_matrix, macro_auc, qwk
from medxfer.models.catalog import resolve_source
from medxfer.pipeline import train
from medxfer.runs import Run, checkpoint_path, is_finished
from medxfer.strategies import NAMES as STRATEGIES, get_strategy

METRICS = (("test_auc", "auc"), ("balanced_accuracy", "balanced_accuracy"), ("sensitivity", "sensitivity"),
           ("specificity", "specificity"),
           # multi-label and ordinal tasks (their 'auc' is the macro AUC / the mean AUC of the grade cuts)
           ("micro_auc", "micro_auc"), ("macro_average_precision", "macro_average_precision"),
           ("macro_f1", "macro_f1"), ("qwk", "qwk"), ("mae", "mae"))
TIME_METRICS = ("train_seconds", "total_seconds")
ALPHA = 0.05
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- parsing
def _items(text, name: str) -> list[str]:
    items = [s.strip() for s in str(text).split(",")] if text is not None else []
    if not items or any(not s for s in items):
        raise MedxferError(f"The '{name}' parameter must be a comma-separated list without empty entries. "
                           f"Got '{text}' instead.")
    dup = sorted({s for s in items if items.count(s) > 1})
    if dup:
        raise MedxferError(f"The '{name}' parameter lists '{dup[0]}' more than once. Got '{text}' instead.")
    return items


def _text(x) -> str | None:
    return x if isinstance(x, str) or x is None else ",".join(map(str, x))


def parse_strategies(text) -> list[str]:
    """'linear-probe,full' -> ['linear-probe', 'full']; unknown names -> MedxferError."""
    items = _items(_text(text), "strategies")
    for s in items:
        if s not in STRATEGIES:
            raise MedxferError(f"The 'strategies' parameter has unknown strategy '{s}'.{did_you_mean(s, STRATEGIES)} "
                               f"Choose from: {', '.join(STRATEGIES)}.")
    return items


def parse_seeds(text) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; non-integers, negatives and repeats -> MedxferError."""
    items = _items(_text(text), "seeds")
    for s in items:
        if not re.fullmatch(r"\d+", s, re.ASCII):
            raise MedxferError(f"The 'seeds' parameter must hold integers >= 0, like 0,1,2. Got '{s}' instead.")
    return [int(s) for s in items]


def parse_fractions(text) -> list[float]:
    """'0.01,0.1,1' -> [0.01, 0.1, 1.0] (sorted); values outside (0, 1] -> MedxferError."""
    out = []
    for s in _items(_text(text), "label-fractions"):
        try:
            v = float(s)
        except ValueError:
            v = math.nan
        if not (0 < v <= 1):
            raise MedxferError(f"The 'label-fractions' parameter must hold fractions in (0, 1], like 0.01,0.1,1.0. "
                               f"Got '{s}' instead.")
        out.append(v)
    if len(set(out)) != len(out):
        raise MedxferError(f"The 'label-fractions' parameter lists a fraction more than once. Got '{text}' instead.")
    return sorted(out)


def parse_sources(text) -> list[str]:
    """'efficientnet_lite0.in1k,runs/src_pneu' -> both; repeats and empty entries -> MedxferError."""
    return _items(_text(text), "sources")


def source_label(source: str) -> str:
    """Short row/folder name of a source: a directory's name, or the catalogue name."""
    p = Path(source)
    return p.name if (p.is_dir() or "/" in source or "\\" in source) else source


def arms(strategies: list[str], sources: list[str]) -> list[tuple[str, str, str]]:
    """(row label, strategy, source) for every strategy from every source; scratch once per architecture."""
    labels = [source_label(src) for src in sources]
    if len(set(labels)) != len(labels):
        raise MedxferError(f"The 'sources' parameter names two sources with the same short name {labels}; rename a "
                           "source directory.")
    out = []
    for strategy in strategies:
        if get_strategy(strategy).pretrained:
            out += [(strategy if len(sources) == 1 else f"{strategy} [{lab}]", strategy, src)
                    for src, lab in zip(sources, labels)]
            continue
        archs = {}  # a strategy from random weights: once per architecture (the source's weights are not used)
        for src in sources:
            archs.setdefault(resolve_source(src, "none").arch.split(".")[0] if len(sources) > 1 else "", src)
        out += [(strategy if len(archs) == 1 else f"{strategy} [{arch}]", strategy, src) for arch, src in archs.items()]
    return out


# How a volume becomes a model input, one row per view (``--views``): the flat options each view sets.
VIEWS = {"slice": {"slice": "middle", "spatial_dims": 2}, "2.5d": {"slice": "orthogonal", "spatial_dims": 2},
         "mip": {"slice": "mip", "spatial_dims": 2}, "3d": {"slice": "volume", "spatial_dims": 3}}


def parse_views(text) -> list[str]:
    """'slice,2.5d,3d' -> the views; unknown names -> MedxferError naming what is allowed."""
    views = _items(_text(text), "views")
    bad = [v for v in views if v not in VIEWS]
    if bad:
        raise MedxferError(f"The 'views' parameter has the unknown view '{bad[0]}': choose from {', '.join(VIEWS)} "
                           "(slice: the middle slice; 2.5d: the three orthogonal mid-planes as channels; mip: "
                           "maximum intensity projection; 3d: the whole volume into a 3-D network).")
    return views


def with_views(rows: list[tuple[str, str, str]], views: list[str] | None) -> list[tuple[str, str, str, str | None]]:
    """Every row once per view ('full [3d]'); without views the rows as they are (view None)."""
    if not views:
        return [(label, strategy, source, None) for label, strategy, source in rows]
    return [(f"{label} [{view}]", strategy, source, view) for view in views for label, strategy, source in rows]


def scratch_row(best: str, scratches: list[str]) -> str | None:
    """The baseline row (a strategy from random weights) that ``best`` is tested against: one without a
    bracket ('scratch'), or the one of ``best``'s view or architecture ('scratch [3d]')."""
    plain = [s for s in scratches if not s.endswith("]")]
    if plain:
        return plain[0]
    view = best.rsplit(" [", 1)[1][:-1] if best.endswith("]") and " [" in best else None
    return next((s for s in scratches if view is not None and s.endswith(f" [{view}]")), None)


def frac_name(f: float) -> str:
    return f"frac{f:g}"


# ---------------------------------------------------------------------------------------- runs
def _what_counts(cfg: TrainConfig) -> dict:
    """The options that change what a run computes (not where it goes, caches or logging). The split seed is
    the one in effect (no --split-seed means --seed's), so a run made by ``train --seed 0`` is reused."""
    sig = cfg.training_signature()
    sig["data"] = {**sig["data"], "split_seed": cfg.split_seed}
    evaluation = {k: v for k, v in cfg.to_dict()["evaluation"].items() if k != "report"}
    return {**sig, "evaluation": {**evaluation, "tta": cfg.resolved_tta}}  # a default and its value count alike


def finished_run(cfg: TrainConfig) -> tuple[bool, str]:
    """(True, '') when ``cfg``'s out holds a finished run of this configuration, else (False, why)."""
    out = Path(cfg.runtime.out)
    if not is_finished(out):
        return False, "no finished run"
    try:
        run = Run.load(out)
    except MedxferError as e:
        return False, str(e)
    have = run.config
    if cfg.optim.augment == "auto":  # the run recorded the preset auto stood for on its data
        cfg = cfg.replace(augment=auto_augment(run.model.data_chans, cfg.model.spatial_dims))
    a, b = files.flatten(_what_counts(have)), files.flatten(_what_counts(cfg))
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        return False, "config differs: " + ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:4])
    return True, ""


def _run(cfg: TrainConfig, train_fn, resume: bool) -> tuple[Run, bool]:
    """The finished run of ``cfg`` (reused, resumed or trained) and whether it was reused."""
    done, why = finished_run(cfg)
    if done and resume:
        log.info("%s: finished run with the same config found, not retrained", cfg.runtime.out)
        return Run.load(cfg.runtime.out), True
    if is_finished(cfg.runtime.out):
        log.info("%s: retraining (%s)", cfg.runtime.out, why if resume else "asked to retrain")
    cfg = cfg.replace(overwrite=True)  # compare owns this folder; an old run stays until the new one is complete
    checkpoint = checkpoint_path(cfg.runtime.out)
    if checkpoint.exists():  # an interrupted run: go on from its last epoch if it is this configuration
        why_not = "asked to retrain" if not resume else _not_resumable(checkpoint, cfg)
        if why_not:
            log.info("%s: discarding an interrupted run's checkpoint (%s)", cfg.runtime.out, why_not)
            checkpoint.unlink()
        else:
            log.info("%s: resuming an interrupted run", cfg.runtime.out)
            cfg = cfg.replace(resume=True)
    return train_fn(cfg), False


def _not_resumable(checkpoint: Path, cfg: TrainConfig) -> str:
    """'' when ``checkpoint`` was written by a run of this configuration, else why not."""
    try:
        saved = files.read_checkpoint(checkpoint, CHECKPOINT_FORMAT, "training").get("signature", {})
    except MedxferError as e:
        return str(e)
    now = files.flatten(cfg.training_signature())  # the checkpoint adds what the data decide (epochs, n_train)
    flat = files.flatten(saved)
    if now.get("optim.augment") == "auto" and flat.get("optim.augment") in AUTO_PRESETS:
        now["optim.augment"] = flat["optim.augment"]  # the preset auto stood for on these data (no channels kept)
    diff = files.changed_settings({k: v for k, v in flat.items() if k in now}, now)
    return f"config differs: {', '.join(diff[:4])}" if diff else ""


def _check_same_split(loaded: dict) -> None:
    """Full-label runs: identical split.csv. Label-fraction runs: identical val and test rows."""
    def table(r: Run, eval_only):
        s = r.split
        if eval_only:
            s = s[s["split"] != "train"]
        return s.sort_values("sample_id").reset_index(drop=True)[["sample_id", "split", "label"]]

    refs = {}
    for key, r in loaded.items():
        for eval_only in ((False, True) if key[1] is None else (True,)):
            s = table(r, eval_only)
            if eval_only not in refs:
                refs[eval_only] = (r.dir, s)
            elif not s.equals(refs[eval_only][1]):
                raise MedxferError(f"runs '{refs[eval_only][0]}' and '{r.dir}' used different splits (split.csv "
                                   "differs); a comparison needs one split. Remove the output folder and run again.")


# ---------------------------------------------------------------------------------------- summaries
def _summaries(results: list[Run]) -> dict:
    out = {key: summarize([r.metrics["test"].get(m) for r in results]) for key, m in METRICS}
    out.update({key: summarize([r.metrics.get(key) for r in results]) for key in TIME_METRICS})
    out["val_auc"] = summarize([r.metrics["val"].get("auc") for r in results])
    out["val_brier"] = summarize([r.metrics["val"].get("brier") for r in results])
    return out


def _test_scores(results: list[Run], positive_label: str):
    """Per-image P(positive) on the test split averaged over runs, aligned on sample_id."""
    col = f"prob_{positive_label}"
    frames = []
    for r in results:
        t = r.test_predictions.set_index("sample_id").sort_index()
        if col not in t:
            raise MedxferError(f"'{r.dir}/predictions.csv' has no column '{col}'.")
        frames.append(t)
    ref = frames[0]
    for t in frames[1:]:
        if not t.index.equals(ref.index):
            raise MedxferError("the runs' test images differ (predictions.csv sample_id); a paired test needs the "
                               "same test images. Remove the output folder and run again.")
    scores = np.mean([t[col].to_numpy(float) for t in frames], axis=0)
    groups = ref["patient_id"].astype(str).to_numpy() if "patient_id" in ref else None
    return ref.index.to_numpy(), (ref["label"].astype(str) == positive_label).to_numpy(), scores, groups


def _fmt_p(p) -> str:
    if p is None:
        return "p not available"
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def best_on_validation(candidates: list[str], summaries: dict) -> str:
    """The row with the best mean validation AUC (ties: the lower validation Brier score)."""
    def rank(s):
        brier = (summaries[s].get("val_brier") or {}).get("mean")
        return (round(summaries[s]["val_auc"]["mean"], 6), -(brier if brier is not None else 1.0))

    return max(candidates, key=rank)


def _from_random_weights(row: str, summary: dict) -> bool:
    """Whether row ``row`` (its label starts with its strategy: 'scratch', 'scratch [3d]') is a baseline: a
    strategy that does not start from the source's weights."""
    name = summary.get("strategy") or row.split(" [")[0]
    return name in STRATEGIES and not get_strategy(name).pretrained


def paired_test(by_strategy: dict, summaries: dict, n_bootstrap: int, seed: int = 0) -> dict | None:
    """The transfer strategy best on validation (mean validation AUC, then lower validation Brier score) vs
    scratch on the same test images, seeds averaged. Choosing on test and testing on the same images would
    make the test optimistic."""
    scratches = [s for s in by_strategy if _from_random_weights(s, summaries[s])]
    if not scratches:
        return {"skipped": "no 'scratch' baseline among the strategies"}
    others = [s for s in by_strategy if s not in scratches and summaries[s]["val_auc"]["mean"] is not None]
    if not others:
        return {"skipped": "no transfer strategy with a validation AUC to choose one to test against scratch"}
    best = best_on_validation(others, summaries)
    ref = scratch_row(best, scratches)
    if ref is None:
        return {"skipped": f"no scratch row of the same architecture or view as '{best}' (best on validation)"}
    positive = by_strategy[ref][0].metrics["test"].get("positive_label")
    task = by_strategy[ref][0].model.task
    if task in ("multilabel", "ordinal"):
        return _paired_task_test(task, best, by_strategy, n_bootstrap, seed, ref)
    if positive is None:
        return {"skipped": "the paired AUC tests are for two-class tasks; this task has more classes"}
    ids, y, a, groups = _test_scores(by_strategy[best], positive)
    ids_b, y_b, b, _ = _test_scores(by_strategy[ref], positive)
    if not np.array_equal(ids, ids_b) or not np.array_equal(y, y_b):
        raise MedxferError(f"'{best}' and '{ref}' were tested on different images; a paired test needs the same "
                           "test images. Remove the output folder and run again.")
    dl = delong_test(y, a, b)
    bs = paired_bootstrap(y, a, b, n_bootstrap=int(n_bootstrap), seed=seed, groups=groups) if n_bootstrap > 0 else None
    n_seeds = len(by_strategy[ref])
    out = {"a": best, "b": ref,
           "a_chosen_as": "the transfer strategy with the best mean validation AUC (ties: lower validation Brier)",
           "positive_label": positive, "n_test": int(len(y)),
           "n_seeds_averaged": {best: len(by_strategy[best]), ref: n_seeds},
           "scores": "per-image test P(positive) averaged over seeds", "alpha": ALPHA,
           "delong": dl, "paired_bootstrap": bs,
           "significant": dl["p_value"] is not None and dl["p_value"] < ALPHA}
    out["conclusion"] = _conclusion(best, dl, bs, ref, f"{len(y)} test images, probabilities averaged over {n_seeds} "
                                                  f"seed{'s' if n_seeds > 1 else ''}")
    return out


def _task_scores(results: list[Run]):
    """Per-image test probabilities (N, K) averaged over runs, with labels and patient ids, aligned on sample_id."""
    frames = [r.test_predictions.set_index("sample_id").sort_index() for r in results]
    if any(not f.index.equals(frames[0].index) for f in frames):
        raise MedxferError("the runs' test images differ (predictions.csv sample_id); a paired test needs the same "
                           "test images. Remove the output folder and run again.")
    labels = [str(c) for c in results[0].model.labels]
    probs = np.mean([f[[f"prob_{c}" for c in labels]].to_numpy(float) for f in frames], axis=0)
    ref = frames[0]
    groups = ref["patient_id"].astype(str).to_numpy() if "patient_id" in ref else None
    return ref.index.to_numpy(), ref["label"], labels, probs, groups


def _paired_task_test(task: str, best: str, by_strategy: dict, n_bootstrap: int, seed: int,
                      ref: str = "scratch") -> dict:
    """Multi-label: the macro AUC; ordinal: the quadratic weighted kappa; paired bootstrap (patients when known)."""
    ids, raw, labels, a, groups = _task_scores(by_strategy[best])
    ids_b, _, _, b, _ = _task_scores(by_strategy[ref])
    if not np.array_equal(ids, ids_b):
        raise MedxferError(f"'{best}' and '{ref}' were tested on different images; a paired test needs the same "
                           "test images. Remove the output folder and run again.")
    if task == "multilabel":
        y, name = label_matrix(raw.fillna("").astype(str).tolist(), labels), "macro AUC"
        metric = macro_auc
    else:
        y, name = raw.astype(str).map({c: i for i, c in enumerate(labels)}).to_numpy(int), "quadratic weighted kappa"
        metric = lambda yy, p: qwk(yy, predict_grade(p), len(labels))  # noqa: E731
    bs = paired_bootstrap_metric(metric, y, a, b, n_bootstrap=max(int(n_bootstrap), 200), seed=seed, groups=groups)
    n_seeds = len(by_strategy[ref])
    ci = bs.get("ci_diff")
    text = (f"{best} (best on validation) vs {ref}: {name} difference {bs['diff']:+.3f}"
            + (f", 95% CI [{ci[0]:.3f}, {ci[1]:.3f}], {_fmt_p(bs['p_value'])}" if ci else ", no interval")
            + f" (paired bootstrap by {bs.get('unit', 'image')}, {bs['n_bootstrap_used']} resamples; {len(y)} test "
            f"images, probabilities averaged over {n_seeds} seed{'s' if n_seeds > 1 else ''})."
            if bs["diff"] is not None else f"{best} vs {ref}: {name} not defined on the test split.")
    return {"a": best, "b": ref, "metric": name, "n_test": int(len(y)), "paired_bootstrap": bs, "alpha": ALPHA,
            "significant": bs["p_value"] is not None and bs["p_value"] < ALPHA, "conclusion": text}


def _conclusion(best: str, dl: dict, bs: dict, ref: str, on: str) -> str:
    if dl["diff"] is None:
        return f"{best} vs {ref}: AUC not defined on the test split (one class only)."
    ci = dl["ci_diff"]
    ci_txt = f"95% CI [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "95% CI not available"
    bci = bs.get("ci_diff") if bs else None
    boot = f"; paired bootstrap 95% CI [{bci[0]:.3f}, {bci[1]:.3f}], {_fmt_p(bs['p_value'])}" if bci else ""
    detail = (f"AUC diff {dl['diff']:+.3f} ({dl['auc_a']:.3f} vs {dl['auc_b']:.3f}), {ci_txt}, "
              f"{_fmt_p(dl['p_value'])} (paired DeLong){boot}; {on}")
    chosen = f" ({best} chosen on validation)"
    if dl["p_value"] is not None and dl["p_value"] < ALPHA:
        winner, loser = (best, ref) if dl["diff"] > 0 else (ref, best)
        return f"{winner} beats {loser}{chosen}: {detail}."
    return f"no significant difference between {best} and {ref}{chosen} (alpha {ALPHA}): {detail}."


# ---------------------------------------------------------------------------------------- main
def _jobs(rows, seeds, fractions, sources, out: Path, base: TrainConfig, split_seed: int):
    """(key, config) of every run: key = (row label, fraction or None, seed)."""
    for frac in [None] + [f for f in fractions if f < 1]:
        for label, strategy, source, view in rows:
            for seed in seeds:
                top = out if source == sources[0] else out / source_label(source)
                top = top / view if view else top
                run_dir = top / strategy / (frac_name(frac) if frac else "") / f"seed{seed}"
                yield (label, frac, seed), base.replace(strategy=strategy, seed=seed, split_seed=int(split_seed),
                                                        label_fraction=frac or 1.0, out=str(run_dir), source=source,
                                                        **(VIEWS[view] if view else {}))


def compare(base: TrainConfig, strategies, seeds, out, *, split_seed: int = 0, label_fractions=None,
            train_fn=None, resume: bool = True, sources=None, views=None) -> dict:
    """Train every strategy x seed (x label fraction) on one split; write comparison.json and .html.

    ``base`` carries the common training options (its strategy, seed, out and label_fraction are
    replaced per run). ``sources``: transfer from each of these (default: ``base``'s source), one row
    per strategy and source. ``views`` (volumes): one row per strategy and view of :data:`VIEWS` on the same
    split (e.g. the middle slice vs 2.5-D vs 3-D). ``train_fn(cfg) -> Run`` trains one run (default
    :func:`medxfer.pipeline.train`).
    Returns the dict written to ``comparison.json``.
    """
    strategies, seeds = parse_strategies(strategies), parse_seeds(seeds)
    sources = parse_sources(sources) if sources is not None else [base.model.source]
    fractions = parse_fractions(label_fractions) if label_fractions is not None else []
    if base.data.label_fraction != 1.0:
        raise MedxferError("compare trains on all train labels; give fractions with --label-fractions 0.1,1.0 "
                           f"for a learning curve instead of a single label_fraction ({base.data.label_fraction:g}).")
    if not isinstance(split_seed, (int, np.integer)) or split_seed < 0:
        raise MedxferError(f"The 'split-seed' parameter must be an integer >= 0. Got {split_seed!r} instead.")
    train_fn, out, t0 = train_fn or train, Path(out), time.perf_counter()
    views = parse_views(views) if views is not None else None
    if views and len(sources) > 1:
        raise MedxferError("compare one source over several --views, or several --sources in one view, not both.")
    rows = with_views(arms(strategies, sources), views)
    jobs = list(_jobs(rows, seeds, fractions, sources, out, base, split_seed))
    loaded, reused = {}, {}
    for i, (key, cfg) in enumerate(jobs, 1):
        label, frac, seed = key
        log.info("[%d/%d] %s, seed %d%s -> %s", i, len(jobs), label, seed,
                 f", label fraction {frac:g}" if frac else "", cfg.runtime.out)
        loaded[key], reused[key] = _run(cfg, train_fn, resume)
    _check_same_split(loaded)
    labels = [label for label, _, _, _ in rows]
    by_strategy = {s: [loaded[(s, None, k)] for k in seeds] for s in labels}
    summaries = {s: _summaries(rs) for s, rs in by_strategy.items()}
    for label, strategy, source, view in rows:
        summaries[label].update(runs=[str(r.dir) for r in by_strategy[label]], strategy=strategy, source=source,
                                reused=[reused[(label, None, k)] for k in seeds], **({"view": view} if view else {}))
    first = by_strategy[labels[0]][0]
    test = first.metrics["test"]
    result = {
        "settings": {"data": base.data.path, "source": sources[0] if len(sources) == 1 else sources,
                     "weights": base.model.weights, "strategies": strategies, "views": views, "rows": labels,
                     "seeds": seeds,
                     "split_seed": int(split_seed), "label_fractions": fractions or None,
                     "split": _split_origin(first, int(split_seed)), "image_size": first.image_size,
                     "epochs": {s: by_strategy[s][0].resolved.get("epochs") for s in labels},
                     "lr": {s: by_strategy[s][0].resolved.get("lr") for s in labels},
                     "positive_label": test.get("positive_label"), "n_test": test.get("n"),
                     "n_per_class_test": test.get("n_per_class"), "threshold_rule": base.evaluation.threshold,
                     "bootstrap": base.evaluation.bootstrap, "train_config": base.to_dict()},
        "strategies": summaries,
        "paired_test": paired_test(by_strategy, summaries, base.evaluation.bootstrap, seed=int(split_seed)),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if fractions:
        result["learning_curve"] = {s: {f"{f:g}": _curve_point(by_strategy[s] if f == 1 else
                                                                [loaded[(s, f, k)] for k in seeds])
                                        for f in fractions} for s in labels}
    files.write_json(out / "comparison.json", result)
    files.write_text(out / "comparison.html", render_html(result))
    return result


def _curve_point(runs: list[Run]) -> dict:
    summ = summarize([r.metrics["test"].get("auc") for r in runs])
    summ["n_train"] = [int((r.split["split"] == "train").sum()) for r in runs]
    return summ


def _split_origin(run: Run, split_seed: int) -> str:
    notes = (run.resolved.get("data") or {}).get("notes") or []
    if any(str(n).startswith("made a ") for n in notes):
        return f"made by medxfer with split seed {split_seed}"
    return "given with the data (the split seed is not used)"


# ---------------------------------------------------------------------------------------- html
TABLE_COLUMNS = (("test_auc", "test AUC", 3), ("balanced_accuracy", "bal. acc", 3), ("sensitivity", "sensitivity", 3),
                 ("specificity", "specificity", 3), ("train_seconds", "train s", 1), ("total_seconds", "total s", 1))


def table_rows(result: dict) -> list[list[str]]:
    """[strategy, 'mean ± sd' per TABLE_COLUMNS] for each strategy."""
    return [[s] + [mean_sd(summ[key], d) for key, _, d in TABLE_COLUMNS] for s, summ in result["strategies"].items()]


def sources_text(source) -> str:
    return ", ".join(map(str, source)) if isinstance(source, list) else str(source)


def render_html(result: dict) -> str:
    """One self-contained page: no external references, plots as base64 PNG."""
    st = result["settings"]
    rows = [[html.esc(c) for c in row] for row in table_rows(result)]
    pt = result.get("paired_test") or {}
    intro = (f"<p>{len(st['seeds'])} seeds per strategy ({html.esc(', '.join(map(str, st['seeds'])))}), one split "
             f"({html.esc(st['split'])}), test split: {html.esc(st['n_test'])} images, positive class "
             f"{html.esc(st['positive_label'])}. Threshold chosen on validation ({html.esc(st['threshold_rule'])}). "
             "Values: mean ± sd over seeds.</p>")
    sections = [("metrics", "Test metrics",
                 html.table(["strategy"] + [name for _, name, _ in TABLE_COLUMNS], rows)
                 + html.figure(plots.to_png(plots.strategies_figure(result)), "Test AUC per strategy")),
                ("paired", "Paired test", f"<p class='note'>{html.esc(pt.get('conclusion') or pt.get('skipped') or 'no paired test')}</p>")]
    if result.get("learning_curve"):
        sections.append(("curve", "Learning curve", html.figure(
            plots.to_png(plots.learning_curve_figure(result["learning_curve"])),
            "Each point: mean test AUC over seeds, bars ± sd; the fraction is of the train labels (stratified); "
            "validation and test are untouched.")))
    settings = [[f"<b>{html.esc(k)}</b>", html.esc(str(v))] for k, v in st.items() if k != "train_config"]
    sections.append(("settings", "Settings", html.table(None, settings, 9)))
    return html.page(f"Strategy comparison: {sources_text(st['source'])} on {st['data']}", intro, sections)
