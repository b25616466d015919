"""``medxfer cv``: stratified, patient-grouped k-fold cross-validation of a training configuration.

Usage::

    medxfer cv --data labels.csv --folds 5 --strategy linear-probe --out runs/cv

Every ``medxfer train`` option is accepted and applies to each fold. Writes ``OUT/fold_<i>/``
(run directories), ``OUT/splits/fold_<i>.csv``, ``OUT/folds.csv`` and ``OUT/cv.json`` (per-fold
test metrics, mean and sd), and prints a table of mean ± sd.
"""

from __future__ import annotations

from pathlib import Path

import typer

from medxfer.errors import MedxferError

# train's option names -> TrainConfig / make_config keyword names
_RENAME = {"labels": "labels_csv", "slice_": "slice", "out_dir": "out"}

# the metrics shown first in the table (then every other one, as in cv.json)
_FIRST = ("auc", "average_precision", "balanced_accuracy", "sensitivity", "specificity", "f1", "accuracy",
          "ppv", "npv", "brier", "ece", "threshold")


def train_options(args: list[str], command: str = "medxfer cv") -> tuple[dict, Path | None]:
    """Parse ``args`` exactly as ``medxfer train`` does -> (make_config keywords, --config path)."""
    import typer.main

    from medxfer.cli import app

    train_cmd = typer.main.get_command(app).commands["train"]
    ctx = train_cmd.make_context(command, list(args), resilient_parsing=False)
    params = dict(ctx.params)
    devices = params.pop("devices", 1) or 1
    if devices > 1:
        raise MedxferError(f"{command} trains its runs one after the other in one process: --devices must be 1.")
    if params.get("out_dir") is not None:
        raise MedxferError("give the output folder once, as --out DIR.")
    config = params.pop("config", None)
    if params.get("threshold") is not None:
        from medxfer.evaluation.calibration import parse_threshold_rule

        parse_threshold_rule(params["threshold"])
    return {_RENAME.get(k, k): v for k, v in params.items()}, config


def cv(ctx: typer.Context,
       folds: int = typer.Option(5, "--folds", help="Number of folds K (stratified, patient-grouped)."),
       out_dir: Path = typer.Option(Path("runs/cv"), "--out", help="Folder for the fold runs and cv.json.")):
    """Cross-validate: pass --data and any 'medxfer train' option (see 'medxfer train --help').

    Stratified, patient-grouped K folds; fold i tests on part i, validates on part i+1 and trains on
    the rest. Writes OUT/fold_<i>/ run directories and OUT/cv.json (mean ± sd of every test metric).
    """
    from medxfer.cli import console, make_config, out, run_training
    from medxfer.cv import cross_validate

    options, config = train_options(ctx.args)
    cfg = make_config(config, **options)

    def log(msg: str) -> None:
        console.print(f"[dim]{msg}[/dim]")

    report = cross_validate(cfg, folds, out_dir, log=log, train_fn=run_training)
    print_summary(report, out)
    out.print(f"cross-validation: {out_dir / 'cv.json'}")


def print_summary(report: dict, console) -> None:
    from rich.table import Table

    from medxfer.cv import format_mean_sd

    summary = report["summary"]
    grouped = "patient-grouped " if report.get("grouped_by_patient") else ""
    table = Table(title=f"{report['strategy']} from {report['source']}: {report['folds']}-fold {grouped}"
                        "cross-validation, test metrics")
    table.add_column("metric")
    table.add_column("mean ± sd")
    for i in range(report["folds"]):
        table.add_column(f"fold {i}", justify="right")
    names = [k for k in _FIRST if k in summary] + [k for k in summary if k not in _FIRST]
    for name in names:
        s = summary[name]
        table.add_row(name, format_mean_sd(s), *("-" if v is None else f"{v:.3f}" for v in s["values"]))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("cv", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(cv)
