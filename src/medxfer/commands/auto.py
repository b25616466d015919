"""``medxfer auto --data D --time-budget 15m --out DIR``: search and ensemble within a time budget."""

from __future__ import annotations

import typer

from medxfer.auto import AutoConfig, auto
from medxfer.commands.base import RESUME, Given, command, option_fields, out

FIELDS = option_fields(config=AutoConfig, exclude=("strategy", "image_size", "augment", "lr", "epochs", "devices",
                                                   "overwrite", "report"))


def register(app: typer.Typer) -> None:
    @command(app, "auto", FIELDS, interrupted=RESUME)
    def auto_command(given: Given):
        """Search strategy x source x image size x learning rate x augmentation (Optuna: TPE, Hyperband pruning on
        validation) within --time-budget, then ensemble the best trials into DIR/model (a normal run directory).

        --storage postgresql://... lets several machines work on one study; --resume continues a study."""
        cfg = given.config(cls=AutoConfig)
        run = auto(cfg)
        out.print(f"medxfer auto: {summary(run.model.task, run.metrics['test'])}; model: {run.dir}; "
                  f"leaderboard: {run.dir.parent / 'leaderboard.csv'}", highlight=False)


def summary(task: str, t: dict) -> str:
    """The final model's test line: its task's AUC with the CI, and accuracy at argmax (MedMNIST's) or QWK."""
    name = {"multilabel": "macro AUC", "ordinal": "cut AUC"}.get(task, "AUC")
    auc = "-" if t.get("auc") is None else f"{t['auc']:.3f}"
    line = f"test {name} {auc}" + (f" (95% CI {t['auc_ci'][0]:.3f}-{t['auc_ci'][1]:.3f})" if t.get("auc_ci") else "")
    if task == "ordinal" and t.get("qwk") is not None:
        return line + f", QWK {t['qwk']:.3f}"
    acc = (t.get("argmax") or {}).get("accuracy", t.get("accuracy"))
    return line + (f", accuracy (argmax) {acc:.3f}" if task != "multilabel" and acc is not None else "")
