"""The one writer of a run directory: every file of a finished run, under the run directory's lock.

``train`` (:mod:`medxfer.pipeline`), ``ensemble``, ``auto`` and ``export`` all write runs through here, so
the steps that make a run's answers are written once: calibrate on validation -> choose the threshold ->
evaluate val and test -> predictions.csv -> the hash record -> model card -> report.

Usage::

    ev = evaluate(task, labels, pos, logits={"val": ..., "test": ...}, targets={...}, groups={...},
                  calibrate="temperature", threshold="youden", n_bootstrap=1000, seed=0)
    meta = ModelMeta(arch=..., labels=..., ...)        # the build record: what rebuilds and applies the model
    finish(rd, meta.replace(temperature=ev.temperature, threshold=ev.threshold), state_dict,
           RunFiles(config=..., metrics={**ev.metrics, ...}, predictions=predictions(rows, ev.probs, labels),
                    split=split_df), test_images=x, title="runs/b")
    rd.commit()

``model.json`` is :class:`~medxfer.runs.ModelMeta` written by :func:`write_model_json` (a new field is a
field of ModelMeta, range-checked in :mod:`medxfer.run_values`); every file ``Run.load`` reads is written by
:func:`write_files` into the locked staging folder and recorded in ``files.sha256`` before it is read back.
A finished run is changed only under its lock: :func:`copy_run` (auto's best trial as the model, its test
metrics given bootstrap CIs) and :func:`record_export` (an export and its SHA-256 in model.json).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from medxfer import files
from medxfer.errors import MedxferError
from medxfer.evaluation.card import write_model_card
from medxfer.evaluation.report import write_report
from medxfer.evaluation.tasks import choose_task_threshold, evaluate_task, fit_calibration, probabilities
from medxfer.runs import CHECK_IMAGES, RECORD, ModelMeta, Run, RunDirectory, amend
from medxfer.trust.run_records import class_prior, conformal_record, conformal_section, selective_section

log = logging.getLogger("medxfer.train")
SPLITS = ("val", "test")
#: the optional tables a writer may add (skipped samples, cross-split duplicates, --keep-paths' mapping)
EXTRA_TABLES = ("skipped", "duplicates", "paths")
#: at most this many test images are kept with the run (export's parity check), and at most this many bytes
MAX_CHECK_IMAGES, CHECK_BYTES = 512, 16 * 2**20


@dataclass(frozen=True)
class Evaluated:
    """Calibrated on validation, thresholded on validation, evaluated on val and test."""

    metrics: dict             # {"val": {...}, "test": {...}, "task": task}
    probs: dict               # split -> calibrated probabilities
    temperature: float | list[float]
    threshold: float | list[float] | None
    conformal: dict | None = None  # the conformal record calibrated on validation (model.json 'conformal')
    prior: list[float] | None = None  # the validation class mix, single-label tasks (model.json 'prior')


@dataclass
class RunFiles:
    """Every file of a run besides the model (model.json and the weights)."""

    config: dict                                  # config.yaml: the options and what they resolved to
    metrics: dict                                 # metrics.json
    predictions: pd.DataFrame                     # predictions.csv (val and test, calibrated)
    split: pd.DataFrame                           # split.csv
    history: pd.DataFrame | None = None           # history.csv (one row per epoch)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # of EXTRA_TABLES
    extra: dict[str, pd.DataFrame] = field(default_factory=dict)   # tables beside the run (auto's leaderboard)
    test_images: object = None   # the test images in predictions.csv's order; the first ones are kept (CHECK_IMAGES)


def evaluate(task: str, labels: list[str], pos: int | None, logits: dict, targets: dict, groups: dict, *,
             calibrate: str, threshold: str, n_bootstrap: int, seed: int, conformal: float | None = None) -> Evaluated:
    """The temperature (``calibrate == 'temperature'``) and the threshold(s) chosen on validation; val and test
    evaluated with them (test with ``n_bootstrap`` resamples, by patient when ``groups`` are known).
    ``conformal``: the alpha of the conformal record calibrated on validation after the temperature (0: none),
    with test's coverage per class and the selective-prediction rows (:func:`trust_metrics`); None: neither
    (writers that do not record them)."""
    temperature = fit_calibration(task, logits["val"], targets["val"]) if calibrate == "temperature" else 1.0
    probs = {s: probabilities(task, logits[s], temperature) for s in SPLITS}
    chosen = choose_task_threshold(task, targets["val"], probs["val"], threshold, pos)
    metrics = {s: evaluate_task(task, targets[s], probs[s], labels, positive=pos, threshold=chosen,
                                groups=groups.get(s), n_bootstrap=n_bootstrap if s == "test" else 0, seed=seed)
               for s in SPLITS}
    metrics["task"] = task
    if conformal is None:
        return Evaluated(metrics, probs, temperature, chosen)
    record, prior = trust_metrics(task, labels, pos, probs, targets, chosen, conformal, metrics["test"])
    return Evaluated(metrics, probs, temperature, chosen, conformal=record, prior=prior)


def trust_metrics(task: str, labels: list[str], pos: int | None, probs: dict, targets: dict, threshold,
                  alpha: float, test: dict) -> tuple[dict | None, list[float] | None]:
    """The conformal record (``alpha`` > 0) and class prior from validation's calibrated probabilities; into
    ``test`` (metrics.json): 'conformal' (coverage per class, Mondrian and marginal) and 'selective'."""
    record = conformal_record(task, labels, probs["val"], targets["val"], alpha)
    if record is not None:
        test["conformal"] = conformal_section(record, probs["val"], targets["val"], probs["test"], targets["test"])
    selective = selective_section(task, probs["test"], targets["test"], threshold, pos)
    if selective is not None:
        test["selective"] = selective
    return record, class_prior(task, targets["val"], len(labels))


def predictions(rows: dict[str, pd.DataFrame], probs: dict, labels: list[str]) -> pd.DataFrame:
    """predictions.csv: each split's rows (split, sample_id, label[, patient_id]) with its calibrated
    probabilities (``prob_<class>``), val then test."""
    parts = [pd.concat([rows[s].reset_index(drop=True), pd.DataFrame(probs[s], columns=[f"prob_{c}" for c in labels])],
                       axis=1) for s in SPLITS]
    return pd.concat(parts, ignore_index=True)


def write_model_json(path: Path, meta: ModelMeta) -> None:
    """model.json: the build record, saying that its run has a hash record (so a removed record is refused, not
    taken for a run of an earlier release). The only place model.json is written."""
    files.write_json(path, {**meta.to_dict(), "hashes": RECORD})


def write_files(staging: Path, meta: ModelMeta, state_dict: dict | None, run_files: RunFiles) -> ModelMeta:
    """Every file ``Run.load`` reads, into ``staging``: the weights (``state_dict``; None: already there), then
    model.json with their SHA-256, config.yaml, metrics.json and the tables. -> the record written."""
    if state_dict is not None:
        meta = meta.replace(weights_sha256=files.write_weights(staging / "model.safetensors", state_dict))
    write_model_json(staging / "model.json", meta)
    files.write_yaml(staging / "config.yaml", run_files.config)
    files.write_json(staging / "metrics.json", run_files.metrics)
    files.write_csv(staging / "predictions.csv", run_files.predictions)
    files.write_csv(staging / "split.csv", run_files.split)
    if run_files.history is not None:
        files.write_csv(staging / "history.csv", run_files.history)
    unknown = set(run_files.tables) - set(EXTRA_TABLES)
    if unknown:
        raise ValueError(f"unknown run tables {sorted(unknown)}")
    for name, table in {**run_files.tables, **run_files.extra}.items():
        files.write_csv(staging / f"{name}.csv", table)
    if run_files.test_images is not None and len(run_files.test_images):
        x = run_files.test_images
        n = min(MAX_CHECK_IMAGES, len(x), max(1, CHECK_BYTES // (x[0].numel() * x.element_size())))
        files.write_weights(staging / CHECK_IMAGES, {"images": x[:n]})
    return meta


def finish(rd: RunDirectory, meta: ModelMeta, state_dict: dict | None, run_files: RunFiles, *, test_images=None,
           title: str, report: bool = True, report_extra: list | None = None,
           subgroups: Callable[[Run], dict] | None = None) -> None:
    """Write the whole run into ``rd``'s staging folder (held under its lock), record its hashes, then the
    subgroup results (``subgroups(run)``, into metrics.json), the model card and the report; the caller
    commits. A failed card or report is a warning: the run itself is written."""
    staging = rd.staging
    write_files(staging, meta, state_dict, run_files)
    rd.seal()  # the card and report read the run back, checked like any run
    if subgroups is not None:
        files.write_json(staging / "metrics.json", {**run_files.metrics, "subgroups": subgroups(Run.load(staging))})
        rd.seal()
    documents(staging, title, report, test_images=test_images, extra=report_extra)


def documents(run_dir: Path, title: str, report: bool, *, test_images=None, extra: list | None = None) -> None:
    """The model card, and the report (``report``), of the sealed run in ``run_dir``; a failure is a warning."""
    try:
        write_model_card(Run.load(run_dir))
    except Exception as e:  # noqa: BLE001 - the run is written; a failed card must not lose it
        log.warning("model card not written (%s: %s); retry with 'medxfer report %s'", type(e).__name__, e, title)
    if not report:
        return
    try:
        write_report(Run.load(run_dir), test_images=test_images, title=title, extra=extra)
    except Exception as e:  # noqa: BLE001 - the run is written; a failed report must not lose it
        log.warning("report not written (%s: %s); retry with 'medxfer report %s'", type(e).__name__, e, title)


def copy_run(run: Run, dest: Path, *, metrics: dict | None = None, report_extra: list | None = None,
             extra: dict[str, pd.DataFrame] | None = None, wait: float = 600) -> Run:
    """``run`` as the finished run ``dest`` (auto's best trial as its model): its files copied under ``dest``'s
    lock and checked against the trial's record, ``metrics`` (if given) in place of its metrics.json, the
    record written again, the card and the report (with ``report_extra`` sections) written, then committed."""
    with RunDirectory(dest, overwrite=True, wait=wait) as rd:
        shutil.rmtree(rd.staging)
        shutil.copytree(run.dir, rd.staging)
        Run.load(rd.staging)  # the copy checked against the trial's hash record before it is sealed again
        if metrics is not None:
            files.write_json(rd.staging / "metrics.json", metrics)
        for name, table in (extra or {}).items():
            files.write_csv(rd.staging / f"{name}.csv", table)
        rd.seal()
        documents(rd.staging, str(dest), True, extra=report_extra)
        rd.commit()
    return Run.load(dest)


def record_export(run: Run, fmt: str, digest: str, made_from: str | None, place: Callable[[], None]) -> None:
    """The run's own export, under the run's lock: the run checked first (an edit made since it was loaded is
    refused, not recorded; a run trained again meanwhile is not given this export), then ``place()`` puts the
    file in, its SHA-256 goes into model.json, and the run's hash record is written again."""
    with amend(run.dir):
        meta = ModelMeta.from_dict(files.read_json(run.dir / "model.json", "model.json"), str(run.dir / "model.json"))
        if meta.weights_sha256 not in (None, made_from):
            raise MedxferError(f"'{run.dir}' was trained again while it was exported; nothing was written. Run "
                               f"'medxfer export {run.dir}' again.")
        place()
        key = "onnx_sha256" if fmt == "onnx" else "torchscript_sha256"
        extra = {k: v for k, v in meta.extra.items() if k != "hashes"}
        write_model_json(run.dir / "model.json", dataclasses.replace(meta, extra=extra, **{key: digest}))

