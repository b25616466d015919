"""``medxfer features RUN_DIR|--source NAME --data PATH --out FILE``: embeddings for every sample."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("features")
    def features(
        run_dir: Optional[Path] = typer.Argument(None, help="A run directory (its model and preprocessing)."),
        source: Optional[str] = typer.Option(None, help="Or a source model (see 'medxfer sources')."),
        weights: Optional[str] = typer.Option(None, help="Weights for a timm --source: FILE, 'hub' or 'none'."),
        data: Optional[str] = typer.Option(None, help="Images (npz, folder, manifest); default with RUN_DIR: its data."),
        out_file: Path = typer.Option(..., "--out", help="FILE.parquet (columns sample_id, split, label, f0..) or .npz."),
        image_size: Optional[int] = typer.Option(None, help="With --source: input size (default: the source's)."),
        head: Optional[str] = typer.Option(None, help="logistic: fit LogisticRegressionCV on train+val, report test AUC."),
        seed: int = typer.Option(0, help="Seed of the split medxfer makes when the data has none."),
        cache_dir: Optional[str] = typer.Option(None), no_cache: bool = typer.Option(False, "--no-cache"),
        batch_size: int = typer.Option(256),
    ):
        """Export pooled backbone features (embeddings) of every sample, optionally with a logistic head."""
        from rich.console import Console
        from rich.table import Table

        from medxfer.features_export import export_features

        out, err = Console(), Console(stderr=True)
        r = export_features(out_file, run_dir=run_dir, source=source, weights=weights, data=data,
                            image_size=image_size, head=head, seed=seed, cache_dir=cache_dir, no_cache=no_cache,
                            batch_size=batch_size, log=lambda msg: err.print(f"[dim]{msg}[/dim]"))
        split = ", ".join(f"{k} {v}" for k, v in r["per_split"].items())
        out.print(f"{r['n']} x {r['dim']} features from {r['from']} ({split}; cache {r['cache']}) -> {r['path']}")
        if "head" in r:
            h = r["head"]
            table = Table(title="logistic head on the features (C by cross-validated AUC on train+val)")
            for col in ("C", "CV AUC (train+val)", "test AUC", "train+val n", "test n"):
                table.add_column(col)
            table.add_row(f"{h['C']:g}", f"{h['cv_auc']:.3f}", "-" if h["test_auc"] is None else f"{h['test_auc']:.3f}",
                          str(h["train_n"]), str(h["test_n"]))
            out.print(table)
            out.print(f"coefficients -> {h['path']}")
