"""``medxfer export RUN_DIR``: an ONNX (or TorchScript) model with its preprocessing contract, parity-checked."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medxfer.commands.base import Given, command, option_fields, out

FORMATS = ("onnx", "torchscript")  # medxfer.export.FORMATS, here so that --help needs no PyTorch


def register(app: typer.Typer) -> None:
    @command(app, "export", option_fields(("runtime",), only=("num_threads",)))
    def export(
        given: Given,
        run_dir: Path = typer.Argument(..., help="A run directory from 'medxfer train'."),
        fmt: str = typer.Option("onnx", "--format", help=" | ".join(FORMATS) + "."),
        out_file: Optional[Path] = typer.Option(None, "--out", help="File to write.",
                                                show_default="RUN_DIR/model.onnx or model.torchscript.pt"),
        check_data: list[str] = typer.Option([], "--check-data", help="Images/folders/npz to check parity on.",
                                             show_default="the run's test split"),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file that is not a "
                                       "medxfer export (never an input or a file inside a run)."),
    ):
        """Export a trained run for fast inference; checks it against PyTorch on real images first."""
        from medxfer.export import export_run

        r = export_run(run_dir, fmt=fmt, out=out_file, check_data=check_data or None, overwrite=overwrite)
        out.print(f"{fmt} vs PyTorch on {r['checked_on']}: max |prob diff| {r['max_prob_diff']:.2e}, max |logit diff| "
                  f"{r['max_logit_diff']:.2e}, same prediction {r['same_argmax']:.1%} (tolerance {r['tolerance']:g})",
                  markup=False, highlight=False)
        out.print(f"wrote {r['path']} ({r['bytes'] / 1e6:.1f} MB); input float32 (N, C, S, S) in [0, 1], output logits; "
                  "preprocessing contract in its metadata", markup=False, highlight=False)
