"""``medxfer export RUN_DIR``: an ONNX (or TorchScript) model with its preprocessing contract, parity-checked."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        run_dir: Path = typer.Argument(..., help="A run directory from 'medxfer train'."),
        fmt: str = typer.Option("onnx", "--format", help="onnx | torchscript."),
        out_file: Optional[Path] = typer.Option(None, "--out",
                                                help="File to write (default RUN_DIR/model.onnx or model.torchscript.pt)."),
        check_data: list[str] = typer.Option([], "--check-data",
                                             help="Images/folders/npz to check parity on (default: the run's test split)."),
    ):
        """Export a trained run for fast inference; checks it against PyTorch on real images first."""
        from rich.console import Console
        from rich.table import Table

        from medxfer.export import export_run

        out = Console()
        r = export_run(run_dir, fmt=fmt, out=out_file, check_data=check_data or None)
        table = Table(title=f"{fmt} vs PyTorch on {r['checked_on']}")
        for col in ("max |prob diff|", "max |logit diff|", "same prediction", "tolerance"):
            table.add_column(col)
        table.add_row(f"{r['max_prob_diff']:.2e}", f"{r['max_logit_diff']:.2e}", f"{r['same_argmax']:.1%}",
                      f"{r['tolerance']:g}")
        out.print(table)
        out.print(f"wrote {r['path']} ({r['bytes'] / 1e6:.1f} MB); input float32 (N, C, S, S) in [0, 1], output logits; "
                  "preprocessing contract in its metadata")
