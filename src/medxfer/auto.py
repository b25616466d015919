"""``medxfer auto``: search strategy x source x image size x learning rate x augmentation within a time
budget (Optuna: TPE sampler, Hyperband pruner on validation), then ensemble the best trials.

Usage::

    run = auto(AutoConfig.create(data="data/pneumoniamnist_28.npz", out="runs/auto", time_budget="15m"))
    medxfer auto --data D --time-budget 15m --out DIR [--storage postgresql://...] [--resume]

Layout of ``DIR``::

    study.db            the Optuna study (SQLite) unless --storage names another database
    trials/trial_<n>/   one ordinary run directory per finished trial
    leaderboard.csv     every trial: parameters, validation log-loss and AUC, seconds, state
    model/              the result: a normal run directory (an ensemble of the best trials, or the best
                        trial alone), with the leaderboard in its report.html

Every choice is made on validation: a trial's value is its calibrated validation log-loss (the
validation AUC of small medical sets saturates; the log-loss still separates settings), the pruner
compares per-epoch validation losses, and the ensemble is chosen among the top trials by validation
log-loss (greedy Caruana selection or uniform weights, whichever validation prefers). The test split
is evaluated once, for the final model. Several processes (machines) can work on one study at once
with ``--storage``: Optuna's database storage hands each trial to one process; no home-made engine.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pandas as pd

from medxfer import files, progress
from medxfer.config import (AUGMENT_CHOICES, Config, DataOptions, EvalOptions, ModelOptions, OptimOptions, Options,
                            RuntimeOptions, TrainConfig, option)
from medxfer.data.prepare import load_source_manifest
from medxfer.data.sizing import choose_size, native_size, sizes_around
from medxfer.engine.handlers import Deadline, Handler
from medxfer.engine.loop import Loop
from medxfer.ensemble import build_ensemble, labels_of, log_loss, val_probabilities
from medxfer.errors import MedxferError
from medxfer.evaluation import html
from medxfer.evaluation.tasks import evaluate_task
from medxfer.models.catalog import resolve_source
from medxfer.pipeline import train
from medxfer.run_writer import copy_run
from medxfer.runs import Run, is_finished, remove_staging
from medxfer.strategies import NAMES as STRATEGIES, get_strategy

log = logging.getLogger(__name__)


def parse_budget(text: str) -> float:
    """'15m' -> 900.0 seconds ('90s', '1.5h', or a plain number of seconds)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise MedxferError(f"The 'time-budget' parameter must be a duration such as 15m, 900s or 1h. Got '{text}' "
                           "instead.")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _list(text: str, name: str, allowed=None, cast=str) -> list:
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise MedxferError(f"The '{name}' parameter must be a comma-separated list. Got '{text}' instead.")
    for it in items:
        if allowed is not None and it not in allowed:
            raise MedxferError(f"The '{name}' parameter lists '{it}', not one of {list(allowed)}.")
    try:
        return [cast(it) for it in items]
    except ValueError:
        raise MedxferError(f"The '{name}' parameter must list numbers. Got '{text}' instead.") from None


@dataclass(frozen=True)
class AutoOptions(Options):
    """What medxfer auto searches, and for how long."""

    time_budget: str = option("15m", "Wall time for the whole search and the ensemble (e.g. 15m, 900s, 1h).")
    strategies: str = option("linear-probe,lp-ft,full,scratch", "Strategies to search, comma-separated.")
    sources: str | None = option(None, "Sources to search, comma-separated (bundled names, timm names with "
                                 "--weights, or 'medxfer pretrain' directories).", show="--source")
    image_sizes: str | None = option(None, "Input sizes to search, comma-separated.",
                                     show="the size 'medxfer train' chooses for the data and 1.5x that (e.g. 64,96 "
                                          "for 28 px images; 160,224 for large ones)")
    augments: str = option("auto,strong", "Augmentation presets to search, comma-separated (auto: what 'medxfer "
                           "train' chooses for the data).")
    lr_range: str = option("0.3,3", "Learning rates searched: the strategy's default times a factor in this range "
                           "(log-uniform).")
    max_epochs: int | None = option(None, "The most epochs a trial trains (the pruner stops weak trials sooner).",
                                    show="the strategy's data-aware default, as 'medxfer train'", low=1)
    n_trials: int | None = option(None, "Stop after this many trials (this process).", show="the budget decides",
                                  low=1)
    top_k: int = option(5, "The ensemble is chosen among this many best trials.", low=1)
    storage: str | None = option(None, "Optuna storage URL shared by several processes (e.g. "
                                 "postgresql://user@host/db).", show="sqlite:///OUT/study.db")
    study: str | None = option(None, "Study name in the storage.", show="OUT's folder name")


@dataclass(frozen=True)
class AutoConfig(Config):
    GROUPS: ClassVar[dict[str, type]] = {"data": DataOptions, "model": ModelOptions, "optim": OptimOptions,
                                         "evaluation": EvalOptions, "runtime": RuntimeOptions, "auto": AutoOptions}
    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    evaluation: EvalOptions = field(default_factory=EvalOptions)
    runtime: RuntimeOptions = field(default_factory=lambda: RuntimeOptions(out="runs/auto"))
    auto: AutoOptions = field(default_factory=AutoOptions)

    def trial_config(self) -> TrainConfig:
        """A trial's TrainConfig: these data, model, optim, evaluation and runtime options."""
        return TrainConfig(data=self.data, model=self.model, optim=self.optim, evaluation=self.evaluation,
                           runtime=self.runtime)

    def space(self) -> dict:
        a = (self if self.auto.image_sizes is not None else with_sizes(self)).auto
        lo, hi = _list(a.lr_range, "lr-range", cast=float)[:2] if "," in a.lr_range else (1.0, 1.0)
        if not 0 < lo <= hi:
            raise MedxferError(f"The 'lr-range' parameter must be two factors 0 < low <= high. Got '{a.lr_range}'.")
        return {"strategy": _list(a.strategies, "strategies", STRATEGIES),
                "source": _list(a.sources or self.model.source, "sources"),
                "image_size": _list(a.image_sizes, "image-sizes", cast=int),
                "augment": _list(a.augments, "augments", AUGMENT_CHOICES), "lr_factor": (lo, hi)}


class OptunaPruning(Handler):
    """Reports each epoch's validation loss to the trial and stops a trial the pruner judges weak."""

    def __init__(self, trial):
        self.trial = trial

    def on_epoch_end(self, loop: Loop, record: dict) -> None:
        import optuna

        value = record.get("val_loss")
        if value is None or not math.isfinite(value):
            return
        self.trial.report(float(value), step=record["epoch"])
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {record['epoch']} (validation loss {value:.4f})")


def val_log_loss(run: Run) -> float:
    """The run's calibrated validation log-loss (the search's objective; multi-label: mean over findings)."""
    return log_loss(*val_probabilities(run))


class _Search:
    """One process's part of the search: suggests, trains and scores trials until the budget is spent."""

    def __init__(self, cfg: AutoConfig, deadline: float, out: Path):
        self.cfg, self.deadline, self.out, self.space = cfg, deadline, out, cfg.space()
        self.reserve = max(5.0, 0.08 * parse_budget(cfg.auto.time_budget))  # for the ensemble and its report
        self.started = 0          # trials this process began
        self.current = None       # (trial number, whether the objective came to an end of its own)

    def params(self, trial) -> dict:
        """A trial's settings; the learning rate and augmentation only where :func:`draws_recipe`."""
        sp = self.space
        p = {"strategy": trial.suggest_categorical("strategy", sp["strategy"]),
             "source": trial.suggest_categorical("source", sp["source"]),
             "image_size": trial.suggest_categorical("image_size", sp["image_size"])}
        if not draws_recipe(p["strategy"]):
            return {**p, "augment": self.cfg.optim.augment, "lr_factor": 1.0}
        p["augment"] = trial.suggest_categorical("augment", sp["augment"])
        lo, hi = sp["lr_factor"]
        p["lr_factor"] = trial.suggest_float("lr_factor", lo, hi, log=True) if hi > lo else lo
        return p

    def __call__(self, trial) -> float:
        import optuna

        left = self.deadline - self.reserve - time.monotonic()
        if left < 10:
            trial.study.stop()
            raise optuna.TrialPruned("no time left in the budget")
        self.started += 1
        self.current = (trial.number, False)
        p = self.params(trial)
        strategy = get_strategy(p["strategy"])
        cfg = self.cfg.trial_config().replace(
            strategy=p["strategy"], source=p["source"], image_size=p["image_size"], augment=p["augment"],
            lr=strategy.default_lr * p["lr_factor"], epochs=None if strategy.feature_cache else self.cfg.auto.max_epochs,
            out=str(self.out / "trials" / f"trial_{trial.number:04d}"), overwrite=True, resume=False, report=False,
            bootstrap=0)
        t0 = time.monotonic()
        try:
            run = train(cfg, handlers=[OptunaPruning(trial), Deadline(self.deadline - self.reserve)])
        except optuna.TrialPruned:
            self.current = (trial.number, True)
            remove_staging(cfg.runtime.out)  # a pruned trial is not resumed (removed only as the lock's holder)
            raise
        except MedxferError:
            self.current = (trial.number, True)
            raise
        value = val_log_loss(run)
        try:
            trial.set_user_attr("run_dir", str(run.dir))
            trial.set_user_attr("val_auc", run.metrics["val"].get("auc"))
            trial.set_user_attr("seconds", round(time.monotonic() - t0, 1))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another process finished the trial meanwhile: optimize() says so (see _optimize)
        self.current = (trial.number, True)
        log.info("trial %d: %s from %s at %d px, %s, lr x%.2f: validation log-loss %.4f, AUC %s (%.0f s)",
                 trial.number, p["strategy"], p["source"], p["image_size"], p["augment"], p["lr_factor"], value,
                 _f(run.metrics["val"].get("auc")), time.monotonic() - t0)
        return value


def _f(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _open_storage(url: str, attempts: int = 5):
    """Optuna's RDB storage for ``url``. Processes started together race to create the tables; the loser sees
    'already exists' (PostgreSQL) or a UNIQUE or locked error (SQLite) and tries again: the tables are there by then."""
    import optuna

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # the heartbeat is 'experimental' in Optuna 5: not the user's concern
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
        except ImportError:
            raise MedxferError(f"no database driver for the study storage '{url}': for PostgreSQL, "
                               "pip install 'psycopg[binary]'; for MySQL, pip install pymysql.") from None
        except Exception as e:  # noqa: BLE001 - a wrong URL or an unreachable database: one clear line
            race = "already exists" in str(e) or "UNIQUE constraint failed" in str(e) or "database is locked" in str(e)
            if attempt + 1 < attempts and race:
                time.sleep(0.5 + random.random())
                continue
            raise MedxferError(f"cannot open the study storage '{url}' ({type(e).__name__}: {str(e)[:160]}).") from None


def study_for(cfg: AutoConfig, out: Path):
    """The Optuna study: created, or joined when it exists (another process, or --resume)."""
    import optuna

    storage = cfg.auto.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    name = cfg.auto.study or out.resolve().name
    storage = _open_storage(storage)
    existing = optuna.study.get_all_study_names(storage)
    joining = name in existing
    if joining and not cfg.runtime.resume and cfg.auto.storage is None:
        raise MedxferError(f"'{out}' already holds the study '{name}': pass --resume to continue it, or choose another "
                           "--out.")
    def sampler(joined: bool):  # a process that joins must not repeat the creator's draws
        return optuna.samplers.TPESampler(seed=cfg.optim.seed + (os.getpid() if joined else 0), n_startup_trials=6)

    pruner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.auto.max_epochs or "auto",
                                            reduction_factor=3)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:  # one process creates the study (the database's unique name decides), the others join it
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler(False), pruner=pruner,
                                    direction="minimize")
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler(True), pruner=pruner)
        created = False
    space = {k: list(v) for k, v in cfg.space().items()}
    saved = study.user_attrs.get("space")
    if saved is None:
        study.set_user_attr("space", space)
    elif saved != space:
        key = next(k for k in space if saved.get(k) != space[k])
        raise MedxferError(f"the study '{name}' searches {key} {saved.get(key)}, not {space[key]}: continue it with the "
                           "same search options, or start a new study (another --out or --study).")
    first = default_trial(cfg)
    if created and first is not None:
        study.enqueue_trial(first)
    return study


def draws_recipe(strategy: str) -> bool:
    """Whether trials of ``strategy`` draw a learning rate and an augmentation preset. Strategies that train a
    head on cached features (linear-probe) use neither: trials that differed only there would be the same
    model, so neither the sampler nor the study's first trial sets them."""
    return not get_strategy(strategy).feature_cache


def default_trial(cfg: AutoConfig) -> dict | None:
    """The settings of 'medxfer train' with these options, as the study's first trial (None when the search
    space excludes them): the search starts from the default recipe, so its result is never worse on
    validation than the default run it is measured against."""
    sp = cfg.space()
    if cfg.optim.strategy not in sp["strategy"]:
        return None
    p = {"strategy": cfg.optim.strategy, "source": cfg.model.source if cfg.model.source in sp["source"] else
         sp["source"][0], "image_size": cfg.model.image_size if cfg.model.image_size in sp["image_size"] else
         sp["image_size"][0]}
    if draws_recipe(p["strategy"]):
        lo, hi = sp["lr_factor"]
        p["augment"] = cfg.optim.augment if cfg.optim.augment in sp["augment"] else sp["augment"][0]
        p["lr_factor"] = min(max(1.0, lo), hi)
    return p


def leaderboard(study) -> pd.DataFrame:
    rows = []
    for t in study.trials:
        rows.append({"trial": t.number, "state": t.state.name, **t.params, "val_log_loss": t.value,
                     "val_auc": t.user_attrs.get("val_auc"), "seconds": t.user_attrs.get("seconds"),
                     "run_dir": t.user_attrs.get("run_dir")})
    df = pd.DataFrame(rows)
    if "image_size" in df:  # whole pixels, also beside a trial pruned before it drew one (NaN)
        df["image_size"] = df["image_size"].astype("Int64")
    return df.sort_values("val_log_loss", na_position="last").reset_index(drop=True) if len(df) else df


def distinct(board: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard without trials whose drawn settings repeat a better trial's (the same model
    trained again: TPE draws a good linear-probe setting many times), so the ensemble's top k differ."""
    params = [c for c in ("strategy", "source", "image_size", "augment", "lr_factor") if c in board.columns]
    if not params or not len(board):
        return board
    key = board[params].astype(str)  # NaN (a setting not drawn) compares equal as text
    return board[~key.duplicated()]


def _progress_callback(bar, t0: float, budget: float):
    def callback(study, trial) -> None:
        done = [t for t in study.trials if t.value is not None]
        best = min((t.value for t in done), default=None)
        bar.update(completed=min(budget, time.monotonic() - t0),
                   info=f"{len(study.trials)} trials, best validation log-loss {_f(best)}")
    return callback


def auto(cfg: AutoConfig) -> Run:
    """Search within the budget, then write the ensemble of the best trials to ``OUT/model`` (see the module
    docstring). Returns that run."""
    out, budget = Path(cfg.runtime.out), parse_budget(cfg.auto.time_budget)
    cfg = with_sizes(cfg)
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    study = study_for(cfg, out)
    search = _Search(cfg, t0 + budget, out)
    with progress.task("medxfer auto", total=int(budget), unit="s") as bar:
        _optimize(study, search, cfg.auto.n_trials, t0 + max(1.0, budget - search.reserve),
                  [_progress_callback(bar, t0, budget)])
    from filelock import FileLock, Timeout

    try:  # processes sharing one study and --out build the model one after the other, each from the latest board
        with FileLock(str(out / ".final-model.lock"), timeout=900):
            board = leaderboard(study)
            files.write_csv(out / "leaderboard.csv", board)
            return _final_model(cfg, out, board)
    except Timeout:
        raise MedxferError(f"another medxfer auto process has been writing '{out / 'model'}' for 15 minutes; the "
                           "trials are in the study: run 'medxfer auto ... --resume' later to build the model.") from None


def with_sizes(cfg: AutoConfig) -> AutoConfig:
    """``--image-sizes`` as given; else ``--image-size`` alone, or the size train would choose from the data
    (data/sizing.py, native sides from headers) and one step around it, logged."""
    if cfg.auto.image_sizes is not None:
        return cfg
    if cfg.model.image_size:
        return cfg.replace(image_sizes=str(cfg.model.image_size))
    first = _list(cfg.auto.sources or cfg.model.source, "sources")[0]
    try:
        spec = resolve_source(first, cfg.model.weights, spatial_dims=cfg.model.spatial_dims)
    except MedxferError:  # only the architecture's input size is needed here; the trials check the weights
        spec = resolve_source(first, "none", spatial_dims=cfg.model.spatial_dims)
    source_size = spec.input_size
    size, why = choose_size(native_size(load_source_manifest(cfg.data)), source_size, cfg.model.spatial_dims)
    sizes = sizes_around(size, source_size, cfg.model.spatial_dims)
    log.info("image sizes searched: %s (train's choice %d px: %s; --image-sizes to choose others)",
             ",".join(map(str, sizes)), size, why)
    return cfg.replace(image_sizes=",".join(map(str, sizes)))


def _optimize(study, search: _Search, n_trials: int | None, end: float, callbacks: list) -> None:
    """``study.optimize`` until ``n_trials`` or the time ``end`` (monotonic), going on when another process
    finished one of this process's trials meanwhile (marked it failed as stale when its heartbeat was late):
    Optuna then cannot tell the trial its result ('Cannot tell a FAIL trial') and leaves the loop; the trial is
    logged, its result is not used, and the search goes on."""
    while True:
        left = None if n_trials is None else n_trials - search.started
        seconds = end - time.monotonic()
        if (left is not None and left <= 0) or seconds <= 0:
            return
        search.current = None
        try:
            study.optimize(search, n_trials=left, timeout=seconds, callbacks=callbacks, catch=(MedxferError,))
            return
        except Exception:
            lost = _finished_elsewhere(study, search.current)
            if lost is None:
                raise
            log.warning("trial %d was marked %s by another process (its heartbeat looked stale) before it could "
                        "report; its result is not used and the search goes on", lost.number, lost.state.name)


def _finished_elsewhere(study, current):
    """The trial this process was running, when its objective had come to an end of its own and the storage
    already holds it as finished (by another process); else None (an error of its own: raised)."""
    if current is None or not current[1]:
        return None
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == current[0]), None)
    return trial if trial is not None and trial.state.is_finished() else None


def _final_model(cfg: AutoConfig, out: Path, board: pd.DataFrame) -> Run:
    done = board[(board["state"] == "COMPLETE") & board["run_dir"].map(lambda d: isinstance(d, str) and
                                                                        is_finished(d))] if len(board) else board
    if not len(done):
        raise MedxferError("no trial finished within the time budget: give a longer --time-budget (or fewer, "
                           "cheaper choices: --strategies linear-probe, smaller --image-sizes).")
    top = distinct(done).head(cfg.auto.top_k)["run_dir"].tolist()
    if len(top) == 1:
        log.info("one finished trial: it is the model")
    model, section = out / "model", _leaderboard_html(board, top)
    report_extra, extra = [("leaderboard", "Leaderboard (medxfer auto)", section)], {"leaderboard": board}
    if len(top) >= 2:  # the leaderboard in the model's report and beside it, written with the run (run_writer)
        return build_ensemble(top, model, method="auto", overwrite=True, wait=600, bootstrap=cfg.evaluation.bootstrap,
                              report_extra=report_extra, extra=extra)
    best = Run.load(top[0])
    metrics = {**best.metrics, "test": _test_metrics(best, cfg.evaluation.bootstrap)} \
        if cfg.evaluation.bootstrap > 0 else None  # trials are scored without bootstrap CIs
    return copy_run(best, model, metrics=metrics, report_extra=report_extra, extra=extra)


def _test_metrics(run: Run, n_bootstrap: int) -> dict:
    """The run's test metrics again from its predictions, with ``n_bootstrap`` resamples (by patient when known)."""
    preds, labels, task = run.test_predictions, [str(c) for c in run.model.labels], run.model.task
    probs = preds[[f"prob_{c}" for c in labels]].to_numpy(float)
    y = labels_of(preds["label"], labels, task)
    groups = preds["patient_id"].astype(str).to_numpy() if "patient_id" in preds else None
    return evaluate_task(task, y, probs, labels, positive=run.model.positive_index, threshold=run.metrics["threshold"],
                         groups=groups, n_bootstrap=n_bootstrap, seed=int(run.metrics.get("seed") or 0))


def _leaderboard_html(board: pd.DataFrame, chosen: list[str]) -> str:
    cols = [c for c in ("trial", "state", "strategy", "source", "image_size", "augment", "lr_factor", "val_log_loss",
                        "val_auc", "seconds") if c in board]
    def cell(v) -> str:  # NaN / NA: a setting the trial did not draw
        if not isinstance(v, str) and pd.isna(v):
            return html.num(None)
        return html.num(v) if isinstance(v, float) else html.esc(v)

    rows = [[html.esc(r["trial"]), html.esc(r["state"])] + [cell(r[c]) for c in cols[2:]]
            + ["yes" if r.get("run_dir") in chosen else ""] for _, r in board.iterrows()]
    return ("<p>Every trial of the search, best validation log-loss first; the model is chosen among the marked "
            "trials on validation (the test split was not used to choose anything). A linear probe draws no learning "
            "rate or augmentation (–); a trial that repeats a better one's settings is not a candidate.</p>"
            + html.table(cols + ["in the candidates"], rows, 6))
