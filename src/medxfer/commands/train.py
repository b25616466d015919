"""``medxfer train``: one run from a source model with a strategy; writes a run directory and prints its metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from medxfer.commands.base import RESUME, Given, Interrupted, command, launch_torchrun, option_fields, out, print_wide

#: the summary columns per task: (heading, metrics.json key)
SUMMARY = {"multilabel": (("macro AUC", "auc"), ("micro AUC", "micro_auc"), ("macro AP", "macro_average_precision"),
                          ("macro F1", "macro_f1")),
           "ordinal": (("cut AUC", "auc"), ("QWK", "qwk"), ("MAE", "mae"), ("accuracy", "accuracy")),
           "other": (("AUC", "auc"), ("bal. acc", "balanced_accuracy"), ("sens", "sensitivity"),
                     ("spec", "specificity"), ("F1", "f1"))}


def register(app: typer.Typer) -> None:
    @command(app, "train", option_fields(), interrupted=RESUME)
    def train(given: Given, config: Optional[Path] = typer.Option(
            None, help="A config.yaml (a run's own replays it); options given here override it.",
            rich_help_panel="Run")):
        """Train a target model from a source model with a strategy; writes a run directory."""
        cfg = given.config(config)
        code = launch_torchrun(cfg.runtime.devices)
        if code is not None:
            raise typer.Exit(code)
        from medxfer.pipeline import train as train_job
        from medxfer.runs import checkpoint_path

        try:
            run = train_job(cfg)
        except KeyboardInterrupt:
            if checkpoint_path(cfg.runtime.out).exists():
                raise Interrupted(RESUME) from None
            raise Interrupted("interrupted before the first epoch ended: nothing to resume. Run the same command "
                              "again to start.") from None
        print_metrics(run)


def print_metrics(run) -> None:
    if run is None:  # a DDP rank other than 0
        return
    m = run.metrics
    task = m.get("task", "binary")
    cols = SUMMARY.get(task, SUMMARY["other"])
    origin = f"from {m['source']}" if run.config.strategy.pretrained else f"({run.model.arch}, random init)"
    table = Table(title=f"{m['strategy']} {origin} (seed {m['seed']}, {task})")
    for col in ("split", *(c for c, _ in cols)):
        table.add_column(col)
    for split in ("val", "test"):
        table.add_row(split, *(_fmt(m[split].get(k)) for _, k in cols))
    print_wide(table, 80)
    t = m["test"]
    if task == "multilabel":
        per = Table(title="test, per finding (thresholds chosen on validation)")
        for col in ("finding", "positives", "AUC (95% CI)", "sens", "spec", "note"):
            per.add_column(col)
        for name, r in t["per_label"].items():
            ci = f" ({r['auc_ci'][0]:.3f}-{r['auc_ci'][1]:.3f})" if r.get("auc_ci") else ""
            per.add_row(name, str(r["n_pos"]), _fmt(r["auc"]) + ci, _fmt(r["sensitivity"]), _fmt(r["specificity"]),
                        "too rare" if not r["evaluable"] else "")
        print_wide(per, 80)
    if t.get("auc_ci"):
        what = {"multilabel": "thresholds per finding chosen on validation",
                "ordinal": "predicted grade: the median of the calibrated grade probabilities"}.get(
            task, f"threshold {_fmt(m.get('threshold'))} chosen on validation")
        out.print(f"test {cols[0][0]} {t['auc']:.3f} (95% CI {t['auc_ci'][0]:.3f}-{t['auc_ci'][1]:.3f}); "
                  f"{what}; train {m['train_seconds']:.1f} s", highlight=False)
    out.print(f"run directory: {run.dir}", highlight=False)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
