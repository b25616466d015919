"""``compare``: every strategy x seed on one split, summarised over seeds, with a paired test.

Usage::

    from medxfer import TrainConfig
    from medxfer.compare import compare, parse_strategies, parse_seeds

    base = TrainConfig(data="data/breastmnist_28.npz", source="efficientnet_lite0.in1k", image_size=64)
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
already holds a finished run of the same configuration is reused, not retrained.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from medxfer import runs
from medxfer.config import STRATEGIES, TrainConfig
from medxfer.errors import MedxferError, did_you_mean

METRICS = (("test_auc", "auc"), ("balanced_accuracy", "balanced_accuracy"), ("sensitivity", "sensitivity"),
           ("specificity", "specificity"))
TIME_METRICS = ("train_seconds", "total_seconds")
# config keys that do not change what a run computes: a finished run that differs only in these is reused
_IGNORED_KEYS = {"out", "num_threads", "cache_dir", "no_cache", "report", "extra", "devices", "resolved", "resume",
                 "overwrite", "keep_paths",
                 "epochs_max"}
ALPHA = 0.05


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


def parse_strategies(text) -> list[str]:
    """'linear-probe,full' -> ['linear-probe', 'full']; unknown names -> MedxferError."""
    items = _items(text if isinstance(text, str) or text is None else ",".join(text), "strategies")
    for s in items:
        if s not in STRATEGIES:
            raise MedxferError(f"The 'strategies' parameter has unknown strategy '{s}'.{did_you_mean(s, STRATEGIES)} "
                               f"Choose from: {', '.join(STRATEGIES)}.")
    return items


def parse_seeds(text) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; non-integers, negatives and repeats -> MedxferError."""
    items = _items(text if isinstance(text, str) or text is None else ",".join(map(str, text)), "seeds")
    seeds = []
    for s in items:
        if not re.fullmatch(r"\d+", s, re.ASCII):
            raise MedxferError(f"The 'seeds' parameter must hold integers >= 0, like 0,1,2. Got '{s}' instead.")
        seeds.append(int(s))
    if len(set(seeds)) != len(seeds):
        raise MedxferError(f"The 'seeds' parameter lists a seed more than once. Got '{text}' instead.")
    return seeds


def parse_fractions(text) -> list[float]:
    """'0.01,0.1,1' -> [0.01, 0.1, 1.0] (sorted); values outside (0, 1] -> MedxferError."""
    items = _items(text if isinstance(text, str) or text is None else ",".join(map(str, text)), "label-fraction")
    out = []
    for s in items:
        try:
            v = float(s)
        except ValueError:
            v = math.nan
        if not (0 < v <= 1):
            raise MedxferError(f"The 'label-fraction' parameter must hold fractions in (0, 1], like 0.01,0.1,1.0. "
                               f"Got '{s}' instead.")
        out.append(v)
    if len(set(out)) != len(out):
        raise MedxferError(f"The 'label-fraction' parameter lists a fraction more than once. Got '{text}' instead.")
    return sorted(out)


def parse_sources(text) -> list[str]:
    """'efficientnet_lite0.in1k,runs/src_pneu' -> both; repeats and empty entries -> MedxferError."""
    return _items(text if isinstance(text, str) or text is None else ",".join(text), "sources")


def source_label(source: str) -> str:
    """Short row/folder name of a source: a directory's name, or the catalogue name."""
    p = Path(source)
    return p.name if (p.is_dir() or "/" in source or "\\" in source) else source


def arms(strategies: list[str], sources: list[str]) -> list[tuple[str, str, str]]:
    """(row label, strategy, source) for every strategy from every source; scratch once per architecture."""
    from medxfer.models.catalog import resolve_source

    labels = [source_label(src) for src in sources]
    if len(set(labels)) != len(labels):
        raise MedxferError(f"The 'sources' parameter names two sources with the same short name {labels}; rename a "
                           "source directory.")
    out, archs = [], {}
    for strategy in strategies:
        for src, lab in zip(sources, labels):
            if strategy != "scratch":
                out.append((strategy if len(sources) == 1 else f"{strategy} [{lab}]", strategy, src))
                continue
            arch = resolve_source(src, "none").arch.split(".")[0] if len(sources) > 1 else ""
            archs.setdefault(arch, src)
        if strategy == "scratch":
            for arch, src in archs.items():
                out.append(("scratch" if len(archs) == 1 else f"scratch [{arch}]", "scratch", src))
    return out


def frac_name(f: float) -> str:
    return f"frac{f:g}"


# ---------------------------------------------------------------------------------------- runs
def _comparable(d: dict, cfg: TrainConfig) -> dict:
    d = {k: v for k, v in d.items() if k not in _IGNORED_KEYS}
    if cfg.image_size is None:
        d.pop("image_size", None)  # resolved from the source in config.yaml
    return d


def _wanted(cfg: TrainConfig) -> dict:
    d = cfg.to_dict()
    d.update(lr=cfg.resolved_lr)  # config.yaml stores the resolved learning rate (epochs as given)
    return _comparable(yaml.safe_load(yaml.safe_dump(d)), cfg)  # same round trip as config.yaml


def finished_run(cfg: TrainConfig) -> tuple[bool, str]:
    """(True, '') when ``cfg.out`` holds a finished run of this configuration, else (False, why)."""
    run_dir = Path(cfg.out)
    needed = ("metrics.json", "config.yaml", "predictions.csv", "split.csv")
    missing = [n for n in needed if not (run_dir / n).is_file()]
    if missing:
        return False, f"missing {', '.join(missing)}"
    try:
        have = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except yaml.YAMLError:
        return False, "unreadable config.yaml"
    have, want = _comparable(have, cfg), _wanted(cfg)
    diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    if diff:
        return False, "config differs: " + ", ".join(f"{k} {have.get(k)!r} -> {want.get(k)!r}" for k in diff[:4])
    return True, ""


def _load(run_dir: Path) -> dict:
    import json

    return {"metrics": json.loads((run_dir / "metrics.json").read_text()),
            "predictions": pd.read_csv(run_dir / "predictions.csv", dtype={"sample_id": str, "label": str}),
            "split": pd.read_csv(run_dir / "split.csv", dtype={"sample_id": str, "label": str})}


def _run(cfg: TrainConfig, train_fn, log, resume: bool) -> dict:
    done, why = finished_run(cfg)
    if done and resume:
        log(f"{cfg.out}: finished run with the same config found, not retrained")
    else:
        if Path(cfg.out, "metrics.json").exists():
            log(f"{cfg.out}: retraining ({why or 'asked to retrain'})")
        cfg = cfg.replace(overwrite=True)  # compare owns this folder; an old run stays until the new one is complete
        checkpoint = runs.checkpoint_path(cfg.out)
        if checkpoint.exists():  # an interrupted run: go on from its last epoch if it is this configuration
            why_not = "asked to retrain" if not resume else _not_resumable(checkpoint, cfg)
            if why_not:
                log(f"{cfg.out}: discarding an interrupted run's checkpoint ({why_not})")
                checkpoint.unlink()
            else:
                log(f"{cfg.out}: resuming an interrupted run")
                cfg = cfg.replace(resume=True)
        train_fn(cfg)
    out = _load(Path(cfg.out))
    out["dir"] = str(cfg.out)
    out["reused"] = bool(done and resume)
    return out


def _not_resumable(checkpoint: Path, cfg: TrainConfig) -> str:
    """'' when ``checkpoint`` was written by a run of this configuration, else why not."""
    from medxfer.engine.trainer import CHECKPOINT_FORMAT

    try:
        saved = runs.read_checkpoint(checkpoint, CHECKPOINT_FORMAT, "training").get("signature", {})
    except MedxferError as e:
        return str(e)
    now = cfg.training_signature()  # the checkpoint adds what the data decide (epochs, n_train, world)
    diff = runs.changed_settings({k: v for k, v in saved.items() if k in now}, now)
    return f"config differs: {', '.join(diff[:4])}" if diff else ""


def _check_same_split(loaded: dict) -> None:
    """Full-label runs: identical split.csv. Label-fraction runs: identical val and test rows."""
    def table(r, eval_only):
        s = r["split"]
        if eval_only:
            s = s[s["split"] != "train"]
        return s.sort_values("sample_id").reset_index(drop=True)[["sample_id", "split", "label"]]

    refs = {}
    for key, r in loaded.items():
        for eval_only in ((False, True) if key[1] is None else (True,)):
            s = table(r, eval_only)
            if eval_only not in refs:
                refs[eval_only] = (r["dir"], s)
            elif not s.equals(refs[eval_only][1]):
                raise MedxferError(f"runs '{refs[eval_only][0]}' and '{r['dir']}' used different splits (split.csv "
                                   "differs); a comparison needs one split. Remove the output folder and run again.")


# ---------------------------------------------------------------------------------------- summaries
def _summaries(results: list[dict]) -> dict:
    from medxfer.evaluation.stats import summarize

    out = {}
    for key, m in METRICS:
        out[key] = summarize([r["metrics"]["test"].get(m) for r in results])
    for key in TIME_METRICS:
        out[key] = summarize([r["metrics"].get(key) for r in results])
    out["val_auc"] = summarize([r["metrics"]["val"].get("auc") for r in results])
    out["val_brier"] = summarize([r["metrics"]["val"].get("brier") for r in results])
    return out


def _test_scores(results: list[dict], positive_label: str):
    """Per-image P(positive) on the test split averaged over runs, aligned on sample_id."""
    col = f"prob_{positive_label}"
    frames = []
    for r in results:
        p = r["predictions"]
        t = p[p["split"] == "test"].set_index("sample_id").sort_index()
        if col not in t:
            raise MedxferError(f"'{r['dir']}/predictions.csv' has no column '{col}'.")
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


def paired_test(by_strategy: dict, summaries: dict, n_bootstrap: int, seed: int = 0) -> dict | None:
    """The transfer strategy best on validation (mean validation AUC, then lower validation Brier score) vs
    scratch on the same test images, seeds averaged. Choosing on test and testing on the same images would
    make the test optimistic."""
    from medxfer.evaluation.stats import delong_test, paired_bootstrap

    if "scratch" not in by_strategy:
        return {"skipped": "no 'scratch' baseline among the strategies"}
    others = [s for s in by_strategy if s != "scratch" and summaries[s]["val_auc"]["mean"] is not None]
    if not others:
        return {"skipped": "no transfer strategy with a validation AUC to choose one to test against scratch"}
    first = by_strategy["scratch"][0]["metrics"]["test"]
    positive = first.get("positive_label")
    if positive is None:
        return {"skipped": "the paired AUC tests are for two-class tasks; this task has more classes"}
    def rank(s):
        brier = (summaries[s].get("val_brier") or {}).get("mean")
        return (round(summaries[s]["val_auc"]["mean"], 6), -(brier if brier is not None else 1.0))

    best = max(others, key=rank)
    ids, y, a, groups = _test_scores(by_strategy[best], positive)
    ids_b, y_b, b, _ = _test_scores(by_strategy["scratch"], positive)
    if not np.array_equal(ids, ids_b) or not np.array_equal(y, y_b):
        raise MedxferError(f"'{best}' and 'scratch' were tested on different images; a paired test needs the same "
                           "test images. Remove the output folder and run again.")
    dl = delong_test(y, a, b)
    bs = paired_bootstrap(y, a, b, n_bootstrap=int(n_bootstrap), seed=seed, groups=groups) if n_bootstrap > 0 else None
    out = {"a": best, "b": "scratch",
           "a_chosen_as": "the transfer strategy with the best mean validation AUC (ties: lower validation Brier)",
           "positive_label": positive, "n_test": int(len(y)),
           "n_seeds_averaged": {best: len(by_strategy[best]), "scratch": len(by_strategy["scratch"])},
           "scores": "per-image test P(positive) averaged over seeds", "alpha": ALPHA,
           "delong": dl, "paired_bootstrap": bs}
    out["significant"] = dl["p_value"] is not None and dl["p_value"] < ALPHA
    n_seeds = len(by_strategy["scratch"])
    out["conclusion"] = _conclusion(best, dl, bs, f"{len(y)} test images, probabilities averaged over {n_seeds} "
                                                  f"seed{'s' if n_seeds > 1 else ''}")
    return out


def _conclusion(best: str, dl: dict, bs: dict, on: str) -> str:
    if dl["diff"] is None:
        return f"{best} vs scratch: AUC not defined on the test split (one class only)."
    ci = dl["ci_diff"]
    ci_txt = f"95% CI [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "95% CI not available"
    bci = bs.get("ci_diff") if bs else None
    boot = (f"; paired bootstrap 95% CI [{bci[0]:.3f}, {bci[1]:.3f}], {_fmt_p(bs['p_value'])}"
            if bci else "")
    detail = (f"AUC diff {dl['diff']:+.3f} ({dl['auc_a']:.3f} vs {dl['auc_b']:.3f}), {ci_txt}, "
              f"{_fmt_p(dl['p_value'])} (paired DeLong){boot}; {on}")
    chosen = f" ({best} chosen on validation)"
    if dl["p_value"] is not None and dl["p_value"] < ALPHA:
        winner, loser = (best, "scratch") if dl["diff"] > 0 else ("scratch", best)
        return f"{winner} beats {loser}{chosen}: {detail}."
    return f"no significant difference between {best} and scratch{chosen} (alpha {ALPHA}): {detail}."


# ---------------------------------------------------------------------------------------- main
def compare(base: TrainConfig, strategies, seeds, out, *, split_seed: int = 0, label_fractions=None,
            train_fn=None, log=print, resume: bool = True, sources=None) -> dict:
    """Train every strategy x seed (x label fraction) on one split; write comparison.json and .html.

    ``base`` carries the common training options (its strategy, seed, out and label_fraction are
    replaced per run). ``sources``: transfer from each of these (default: ``base.source``), one row
    per strategy and source. ``train_fn(cfg)`` trains one run (default :func:`medxfer.pipeline.train`).
    Returns the dict written to ``comparison.json``.
    """
    strategies = parse_strategies(strategies)
    seeds = parse_seeds(seeds)
    sources = parse_sources(sources) if sources is not None else [base.source]
    fractions = parse_fractions(label_fractions) if label_fractions is not None else []
    if base.label_fraction != 1.0:
        raise MedxferError("compare trains on all train labels; give fractions with --label-fraction 0.1,1.0 "
                           f"for a learning curve instead of a single label_fraction ({base.label_fraction:g}).")
    if not isinstance(split_seed, (int, np.integer)) or split_seed < 0:
        raise MedxferError(f"The 'split-seed' parameter must be an integer >= 0. Got {split_seed!r} instead.")
    if train_fn is None:
        from medxfer.pipeline import train

        def train_fn(cfg):
            return train(cfg, log=log)

    out = Path(out)
    t0 = time.perf_counter()
    rows = arms(strategies, sources)
    strategy_of = {label: strategy for label, strategy, _ in rows}
    jobs = [(row, None, k) for row in rows for k in seeds]
    jobs += [(row, f, k) for f in fractions if f < 1 for row in rows for k in seeds]
    loaded: dict = {}
    for i, ((label, strategy, source), frac, seed) in enumerate(jobs, 1):
        top = out if source == sources[0] else out / source_label(source)
        run_dir = top / strategy / (frac_name(frac) if frac else "") / f"seed{seed}"
        cfg = base.replace(strategy=strategy, seed=seed, split_seed=int(split_seed), label_fraction=frac or 1.0,
                           out=str(run_dir), source=source)
        what = f"{label}, seed {seed}" + (f", label fraction {frac:g}" if frac else "")
        log(f"[{i}/{len(jobs)}] {what} -> {run_dir}")
        loaded[(label, frac, seed)] = _run(cfg, train_fn, log, resume)
    _check_same_split(loaded)

    labels = [label for label, _, _ in rows]
    by_strategy = {s: [loaded[(s, None, k)] for k in seeds] for s in labels}
    summaries = {s: _summaries(rs) for s, rs in by_strategy.items()}
    for label, strategy, source in rows:
        summaries[label]["runs"] = [r["dir"] for r in by_strategy[label]]
        summaries[label]["reused"] = [r["reused"] for r in by_strategy[label]]
        summaries[label].update(strategy=strategy, source=source)
    first = by_strategy[labels[0]][0]
    test = first["metrics"]["test"]
    first_cfg = _run_config(first)
    result = {
        "settings": {
            "data": base.data, "source": sources[0] if len(sources) == 1 else sources, "weights": base.weights,
            "strategies": strategies, "rows": labels,
            "seeds": seeds, "split_seed": int(split_seed), "label_fractions": fractions or None,
            "split": _split_origin(first_cfg, int(split_seed)),
            "image_size": first_cfg.get("image_size", base.image_size),
            "epochs": {s: _run_config(by_strategy[s][0]).get("epochs_max") for s in labels},
            "lr": {s: base.replace(strategy=strategy_of[s]).resolved_lr for s in labels},
            "positive_label": test.get("positive_label"), "n_test": test.get("n"),
            "n_per_class_test": test.get("n_per_class"), "threshold_rule": base.threshold,
            "bootstrap": base.bootstrap, "train_config": _common_options(base),
        },
        "strategies": summaries,
        "paired_test": paired_test(by_strategy, summaries, base.bootstrap, seed=int(split_seed)),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if fractions:
        from medxfer.evaluation.stats import summarize

        curve = {}
        for s in labels:
            curve[s] = {}
            for f in fractions:
                rs = by_strategy[s] if f == 1 else [loaded[(s, f, k)] for k in seeds]
                summ = summarize([r["metrics"]["test"].get("auc") for r in rs])
                summ["n_train"] = [_n_train(r) for r in rs]
                curve[s][f"{f:g}"] = summ
        result["learning_curve"] = curve
    runs.write_json(out / "comparison.json", result)
    runs.write_text(out / "comparison.html", render_html(result))
    return result


def _common_options(base: TrainConfig) -> dict:
    d = yaml.safe_load(yaml.safe_dump(base.to_dict()))
    return {k: v for k, v in d.items() if k not in ("strategy", "seed", "split_seed", "out", "label_fraction", "extra")}


def _run_config(run: dict) -> dict:
    try:
        return yaml.safe_load((Path(run["dir"]) / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _split_origin(run_cfg: dict, split_seed: int) -> str:
    notes = ((run_cfg.get("resolved") or {}).get("data") or {}).get("notes") or []
    if any(str(n).startswith("made a ") for n in notes):
        return f"made by medxfer with split seed {split_seed}"
    return "given with the data (the split seed is not used)"


def _n_train(run: dict) -> int:
    split = run["split"]
    return int((split["split"] == "train").sum())


# ---------------------------------------------------------------------------------------- html
def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _auc_plot(result: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(result["strategies"])
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(strategies), 3.6))
    rng = np.random.default_rng(0)
    for i, s in enumerate(strategies):
        summ = result["strategies"][s]["test_auc"]
        vals = [v for v in summ["values"] if v is not None]
        if summ["mean"] is not None:
            ax.bar(i, summ["mean"], width=0.6, color="#c6dbef", edgecolor="#4a7fb0", zorder=1)
            ax.errorbar(i, summ["mean"], yerr=summ["sd"] or 0, color="#08306b", capsize=6, lw=1.5, zorder=3)
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(vals)), vals, color="#d94801", s=22, zorder=4,
                   label="one seed" if i == 0 else None)
    ax.set_xticks(range(len(strategies)), strategies)
    lows = [v for s in strategies for v in result["strategies"][s]["test_auc"]["values"] if v is not None]
    ax.set_ylim(max(0.0, min(lows + [0.5]) - 0.05), 1.0)
    ax.set_ylabel("test AUC")
    ax.set_title("Test AUC per strategy: seeds (points), mean ± sd (bar)")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def _curve_plot(result: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    curve = result["learning_curve"]
    for i, (s, pts) in enumerate(curve.items()):
        shift = 1.03 ** (i - (len(curve) - 1) / 2)  # small offsets so the error bars do not overlap
        fs = [float(f) * shift for f in pts]
        means = [pts[f]["mean"] if pts[f]["mean"] is not None else np.nan for f in pts]
        sds = [pts[f]["sd"] or 0 for f in pts]
        ax.errorbar(fs, means, yerr=sds, marker="o", capsize=4, label=s)
    ax.set_xscale("log")
    ticks = sorted({float(f) for pts in curve.values() for f in pts})
    ax.set_xticks(ticks, [f"{f:g}" for f in ticks])
    ax.minorticks_off()
    ax.set_xlabel("fraction of train labels used (log scale)")
    ax.set_ylabel("test AUC (mean ± sd over seeds)")
    ax.set_title("Learning curve: labelled data needed per strategy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def mean_sd(summ: dict, digits: int = 3) -> str:
    if summ["mean"] is None:
        return "-"
    sd = f" ± {summ['sd']:.{digits}f}" if summ["sd"] is not None else ""
    return f"{summ['mean']:.{digits}f}{sd}"


TABLE_COLUMNS = (("test_auc", "test AUC", 3), ("balanced_accuracy", "bal. acc", 3), ("sensitivity", "sensitivity", 3),
                 ("specificity", "specificity", 3), ("train_seconds", "train s", 1), ("total_seconds", "total s", 1))


def table_rows(result: dict) -> list[list[str]]:
    """[strategy, 'mean ± sd' per TABLE_COLUMNS] for each strategy."""
    return [[s] + [mean_sd(summ[key], d) for key, _, d in TABLE_COLUMNS] for s, summ in result["strategies"].items()]


def sources_text(source) -> str:
    return ", ".join(map(str, source)) if isinstance(source, list) else str(source)


def render_html(result: dict) -> str:
    """One self-contained page: no external references, plots as base64 PNG."""
    e = html.escape
    st = result["settings"]
    head = "".join(f"<th>{e(name)}</th>" for _, name, _ in TABLE_COLUMNS)
    rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in table_rows(result))
    pt = result.get("paired_test") or {}
    paired = e(pt.get("conclusion") or pt.get("skipped") or "no paired test")
    curve = ""
    if result.get("learning_curve"):
        curve = (f"<h2>Learning curve</h2><img alt='test AUC vs label fraction' "
                 f"src='data:image/png;base64,{_curve_plot(result)}'>"
                 "<p>Each point: mean test AUC over seeds, bars ± sd; the fraction is of the train labels "
                 "(stratified); validation and test are untouched.</p>")
    settings = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in st.items() if k != "train_config")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>medxfer comparison</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
.paired{{background:#f4f8fb;border-left:4px solid #4a7fb0;padding:0.6em 1em}}</style></head><body>
<h1>Strategy comparison: {e(sources_text(st['source']))} on {e(str(st['data']))}</h1>
<p>{len(st['seeds'])} seeds per strategy ({e(', '.join(map(str, st['seeds'])))}), one split
({e(st['split'])}), test split: {e(str(st['n_test']))} images, positive class {e(str(st['positive_label']))}.
Threshold chosen on validation ({e(str(st['threshold_rule']))}). Values: mean ± sd over seeds.</p>
<h2>Test metrics</h2>
<table><tr><th>strategy</th>{head}</tr>{rows}</table>
<img alt="test AUC per strategy" src="data:image/png;base64,{_auc_plot(result)}">
<h2>Paired test</h2><p class="paired">{paired}</p>
{curve}
<h2>Settings</h2><table>{settings}</table>
</body></html>
"""
