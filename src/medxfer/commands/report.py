"""``medxfer report RUN_DIR``: the self-contained HTML report of a finished run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medxfer.commands.base import command, out


def register(app: typer.Typer) -> None:
    @command(app, "report")
    def report(
        run_dir: Path = typer.Argument(..., help="A run directory from 'medxfer train'."),
        gradcam: bool = typer.Option(True, "--gradcam/--no-gradcam", help="Grad-CAM gallery of test images."),
        data: Optional[str] = typer.Option(None, help="The run's data, when config.yaml's path does not reach it."),
    ):
        """Write RUN_DIR/report.html (one file, opens offline), RUN_DIR/plots/*.png and RUN_DIR/model_card.md."""
        from medxfer.evaluation.card import write_model_card
        from medxfer.evaluation.report import write_report

        write_model_card(run_dir)
        path = write_report(run_dir, gradcam=gradcam, data=data)
        out.print(f"report: {path}", markup=False, highlight=False)
