"""``medxfer features RUN_DIR|--source NAME --data PATH --out FILE``: embeddings for every sample."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from medxfer.commands.base import Given, command, option_fields, out

FIELDS = option_fields(("data", "model", "optim", "runtime"), only=("data", "labels", "label_names", "split_by", "split_seed",
                                                         "on_bad_file", "window", "frame", "slice", "intensity",
                                                         "cache_dir", "no_cache", "source", "weights", "image_size",
                                                         "grey_mode", "seed", "num_threads"))


def register(app: typer.Typer) -> None:
    @command(app, "features", FIELDS)
    def features(
        given: Given,
        run_dir: Optional[Path] = typer.Argument(None, help="A run directory (its model and preprocessing); or "
                                                 "give --source."),
        out_file: Path = typer.Option(..., "--out", help="FILE.parquet (sample_id, split, label, f0..) or .npz."),
        head: Optional[str] = typer.Option(None, help="logistic: fit LogisticRegressionCV on train+val, report the "
                                           "test AUC."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file that medxfer did "
                                       "not write (never an input or a file inside a run)."),
    ):
        """Export pooled backbone features (embeddings) of every sample, optionally with a logistic head."""
        from medxfer.features_export import export_features

        r = export_features(out_file, given.config(), run_dir=run_dir, head=head, given=given.explicit,
                            overwrite=overwrite)
        split = ", ".join(f"{k} {v}" for k, v in r["per_split"].items())
        out.print(f"{r['n']} x {r['dim']} features from {r['from']} ({split}; cache {r['cache']}) -> {r['path']}",
                  highlight=False)
        if "head" in r:
            h = r["head"]
            table = Table(title="logistic head on the features (C by cross-validated AUC on train+val)")
            for col in ("C", "CV AUC (train+val)", "test AUC", "train+val n", "test n"):
                table.add_column(col)
            table.add_row(f"{h['C']:g}", f"{h['cv_auc']:.3f}", "-" if h["test_auc"] is None else f"{h['test_auc']:.3f}",
                          str(h["train_n"]), str(h["test_n"]))
            out.print(table)
            out.print(f"coefficients -> {h['path']}", highlight=False)
