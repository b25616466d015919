"""``medxfer auto --data D --time-budget 15m --out DIR``: search and ensemble within a time budget."""

from __future__ import annotations

import typer

from medxfer.auto import AutoConfig, auto
from medxfer.commands.base import Given, command, option_fields, out

FIELDS = option_fields(config=AutoConfig, exclude=("strategy", "image_size", "augment", "lr", "epochs", "devices",
                                                   "overwrite", "report"))


def register(app: typer.Typer) -> None:
    @command(app, "auto", FIELDS)
    def auto_command(given: Given):
        """Search strategy x source x image size x learning rate x augmentation (Optuna: TPE, Hyperband pruning on
        validation) within --time-budget, then ensemble the best trials into DIR/model (a normal run directory).
        --storage postgresql://... lets several machines work on one study; --resume continues a study."""
        cfg = given.config(cls=AutoConfig)
        run = auto(cfg)
        t = run.metrics["test"]
        ci = f" (95% CI {t['auc_ci'][0]:.3f}-{t['auc_ci'][1]:.3f})" if t.get("auc_ci") else ""
        acc = t.get("argmax", {}).get("accuracy", t.get("accuracy"))
        out.print(f"medxfer auto: test AUC {t['auc']:.3f}{ci}, accuracy (argmax) {acc:.3f}; model: {run.dir}; "
                  f"leaderboard: {run.dir.parent / 'leaderboard.csv'}", highlight=False)
