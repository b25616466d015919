"""``medxfer explain RUN_DIR IMAGE... --out DIR``: Grad-CAM heat-map overlays, one PNG per image."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medxfer.commands.base import Given, command, option_fields, out


def register(app: typer.Typer) -> None:
    @command(app, "explain", option_fields(only=("keep_paths", "num_threads"), panel="runtime"))
    def explain(
        given: Given,
        run_dir: Path = typer.Argument(..., help="A run directory from 'medxfer train'."),
        inputs: list[str] = typer.Argument(..., help="Image files, folders or npz archives."),
        out_dir: Path = typer.Option(Path("gradcam"), "--out", help="Folder for the overlay PNGs."),
        layer: Optional[str] = typer.Option(None, help="Target layer, a name in model.net.",
                                            show_default="the last feature stage at least 4x4 at the run's size"),
        target_class: Optional[str] = typer.Option(None, "--class", help="Explain this class.",
                                                   show_default="each image's predicted class"),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing PNGs in --out that medxfer did "
                                       "not write (never an input or a file inside a run)."),
    ):
        """Grad-CAM overlays: the image, the jet heat map, the predicted class and its probability (files are
        named by sample id: file names can hold patient names)."""
        from medxfer.explain import explain_paths

        keep_paths = given.values["keep_paths"]
        paths, name, size = explain_paths(run_dir, inputs, out_dir, layer=layer, target_class=target_class,
                                          overwrite=overwrite, keep_paths=keep_paths)
        note = "; coarse: --layer NAME takes another stage" if size and min(size) < 8 else ""
        out.print(f"{len(paths)} Grad-CAM overlays -> {out_dir} (layer {name}, {'x'.join(map(str, size))} map{note})"
                  + (f"; ids to files: {out_dir / 'paths.csv'}" if keep_paths else ""), markup=False, highlight=False)
