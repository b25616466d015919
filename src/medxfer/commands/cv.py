"""``medxfer cv``: stratified, patient-grouped k-fold cross-validation of a training configuration.

Usage::

    medxfer cv --data labels.csv --folds 5 --strategy linear-probe --out runs/cv

Every ``medxfer train`` option is accepted and applies to each fold. Writes ``OUT/fold_<i>/`` (run
directories), ``OUT/folds.csv`` and ``OUT/cv.json`` (per-fold test metrics, mean and sd), and prints
a table of mean ± sd.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from medxfer.commands.base import RESUME, Given, command, option_fields, out, print_wide

# the metrics shown first in the table (then every other one, as in cv.json)
_FIRST = ("auc", "average_precision", "balanced_accuracy", "sensitivity", "specificity", "f1", "accuracy",
          "ppv", "npv", "brier", "ece", "threshold")


def print_summary(report: dict) -> None:
    from medxfer.evaluation.stats import mean_sd

    summary = report["summary"]
    grouped = "patient-grouped " if report.get("grouped_by_patient") else ""
    table = Table(title=f"{report['strategy']}: {report['folds']}-fold {grouped}cross-validation, test metrics")
    table.add_column("metric")
    table.add_column("mean ± sd")
    for i in range(report["folds"]):
        table.add_column(f"fold {i}", justify="right")
    shown = [k for k in summary if k not in _FIRST and ("." not in k or k.endswith(".auc"))]  # all in cv.json
    for name in [k for k in _FIRST if k in summary] + shown:
        s = summary[name]
        table.add_row(name, mean_sd(s), *("-" if v is None else f"{v:.3f}" for v in s["values"]))
    print_wide(table, 40 + 8 * report["folds"])


def register(app: typer.Typer) -> None:
    @command(app, "cv", option_fields(exclude=("out", "devices")), interrupted=RESUME)
    def cv(given: Given,
           folds: int = typer.Option(5, "--folds", help="Number of folds K (stratified, patient-grouped).",
                                     rich_help_panel="Cross-validation"),
           out_dir: Path = typer.Option(Path("runs/cv"), "--out", help="Folder for the fold runs and cv.json.",
                                        rich_help_panel="Cross-validation"),
           config: Optional[Path] = typer.Option(None, help="A config.yaml; options given here override it.",
                                                 rich_help_panel="Run")):
        """Cross-validate: every 'medxfer train' option applies to each fold.

        Stratified, patient-grouped K folds; fold i tests on part i, validates on part i+1 and trains on
        the rest. Writes OUT/fold_<i>/ run directories and OUT/cv.json (mean ± sd of every test metric).
        """
        from medxfer.crossval import cross_validate

        report = cross_validate(given.config(config), folds, out_dir)
        print_summary(report)
        out.print(f"cross-validation: {out_dir / 'cv.json'}", highlight=False)
