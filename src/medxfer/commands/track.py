"""``medxfer track RUN_DIR``: log a finished run to MLflow (a local ./mlruns store by default, offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medxfer.commands.base import command, out


def register(app: typer.Typer) -> None:
    @command(app, "track")
    def track(
        run_dir: Path = typer.Argument(..., help="A run directory from 'medxfer train'."),
        tracking_uri: Optional[str] = typer.Option(
            None, "--tracking-uri", help="MLflow store: a folder, file:/..., sqlite:///FILE.db or http(s)://SERVER.",
            show_default="$MLFLOW_TRACKING_URI, else ./mlruns"),
        experiment: str = typer.Option("medxfer", "--experiment", help="MLflow experiment (made when new)."),
        name: Optional[str] = typer.Option(None, "--name", help="MLflow run name.", show_default="the run folder's"),
        artifacts: bool = typer.Option(True, "--artifacts/--no-artifacts",
                                       help="Upload the model files (model.safetensors, model.onnx) too; the "
                                            "reports, config and metrics are always logged."),
    ):
        """Log a finished run to MLflow: options as params, epoch curves, test and validation results with
        their intervals, the model card and report. Sample and patient ids are never sent."""
        from medxfer.tracking import log_run, resolve_tracking_uri, store_location

        uri = resolve_tracking_uri(tracking_uri)
        run_id = log_run(run_dir, uri, experiment=experiment, artifacts=artifacts, run_name=name)
        out.print(f"MLflow run {run_id} in experiment '{experiment}'", markup=False, highlight=False)
        out.print(f"store: {store_location(uri)}", markup=False, highlight=False)
        if uri.startswith("file:"):
            out.print(f"view: MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {uri} (needs the full mlflow "
                      "package)", markup=False, highlight=False)
