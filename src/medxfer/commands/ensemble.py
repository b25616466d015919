"""``medxfer ensemble RUN... --out ENS``: several runs as one run directory (weights chosen on validation)."""

from __future__ import annotations

from pathlib import Path

import typer

from medxfer.commands.base import command, out

METHODS = ("auto", "greedy", "uniform")  # medxfer.ensemble.METHODS, here so that --help needs no PyTorch


def register(app: typer.Typer) -> None:
    @command(app, "ensemble")
    def ensemble(
        run_dirs: list[Path] = typer.Argument(..., help="Finished runs of one task and split (seeds, strategies, "
                                              "sources, image sizes)."),
        out_dir: Path = typer.Option(..., "--out", help="The ensemble's run directory."),
        method: str = typer.Option("auto", help=" | ".join(METHODS) + ": greedy (Caruana) forward selection, equal "
                                   "weights, or whichever has the lower validation log-loss."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished run in --out."),
        report: bool = typer.Option(True, "--report/--no-report", help="Write report.html."),
    ):
        """Average runs' calibrated probabilities into one run that predict, report, explain, export and serve
        use like any run; its temperature and threshold are fitted on validation."""
        from medxfer.ensemble import build_ensemble

        run = build_ensemble(run_dirs, out_dir, method=method, overwrite=overwrite, report=report)
        t = run.metrics["test"]
        ci = f" (95% CI {t['auc_ci'][0]:.3f}-{t['auc_ci'][1]:.3f})" if t.get("auc_ci") else ""
        out.print(f"ensemble of {run.metrics['members']} runs ({run.metrics['ensemble']['method']} on validation): "
                  f"test AUC {t['auc']:.3f}{ci} -> {run.dir}", highlight=False)
