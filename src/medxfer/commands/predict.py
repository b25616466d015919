"""``medxfer predict RUN IMAGES... --out preds.csv``: calibrated probabilities from a run directory alone."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from medxfer.commands.base import Given, command, option_fields, out
from medxfer.files import first_line

#: the options predict shares with train, declared once in medxfer.config
OPTIONS = ("batch_size", "on_bad_file", "keep_paths", "num_threads")


def register(app: typer.Typer) -> None:
    @command(app, "predict", option_fields(only=OPTIONS, panel="runtime"))
    def predict(
        given: Given,
        run_dir: Path = typer.Argument(..., help="A run directory from 'medxfer train'."),
        inputs: list[str] = typer.Argument(..., help="Image files, folders or npz archives."),
        out_file: Path = typer.Option(Path("predictions.csv"), "--out", help="CSV to write."),
        engine: str = typer.Option("torch", help="torch | onnx (run 'medxfer export' first)."),
        adapt_prior: bool = typer.Option(False, "--adapt-prior", help="Estimate the class mix of these images "
                                         "(EM, labels unused) and re-weight the probabilities and decisions to it "
                                         "from the validation mix (prior_adapted column; conformal sets unchanged)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file that medxfer did "
                                       "not write (never an input or a file inside a run)."),
    ):
        """Predict calibrated class probabilities with a trained run, from the run directory alone.

        Rows are named by their input order (index) and a pseudonymous sample_id, never by file name."""
        import pandas as pd

        from medxfer.files import write_csv
        from medxfer.predict import Predictor
        from medxfer.runs import check_out

        cfg = given.config()  # the options' own checks: one line naming a bad value
        batch_size, on_bad_file, keep_paths = cfg.optim.batch_size, cfg.data.on_bad_file, cfg.data.keep_paths
        side = {"skipped": (out_file.with_name(out_file.stem + "_skipped.csv"), "sample_id,reason"),
                "paths": (out_file.with_name(out_file.stem + "_paths.csv"), "sample_id,path")}
        given_paths = [run_dir, *inputs]
        check_out(out_file, inputs=given_paths, overwrite=overwrite, ours=is_predictions_csv)  # before any work
        for name, (path, header) in side.items():
            if name == "paths" and keep_paths or name == "skipped" and on_bad_file == "skip":
                check_out(path, inputs=given_paths, overwrite=overwrite, ours=lambda p, h=header: first_line(p) == h)
        paths: list | None = [] if keep_paths else None
        skipped: list = []
        df = Predictor(run_dir, engine=engine, batch_size=batch_size).predict(inputs, on_bad_file, paths, skipped,
                                                                            adapt_prior=adapt_prior)
        write_csv(out_file, df)
        if skipped:
            name = side["skipped"][0]
            write_csv(name, pd.DataFrame([(s.sample_id, s.reason) for s in skipped], columns=["sample_id", "reason"]))
            logging.getLogger("medxfer").warning("skipped %d unreadable samples (see %s)", len(skipped), name.name)
        if paths:
            # a file name need not be UTF-8: the path stays a Python string (its bytes kept as surrogates, written
            # back as they were), never an Arrow string, which refuses it
            write_csv(side["paths"][0], pd.DataFrame(paths, columns=["sample_id", "path"], dtype=object))
        out.print(f"{len(df)} predictions -> {out_file}", markup=False, highlight=False)


def is_predictions_csv(path: Path) -> bool:
    """The mark of a CSV 'medxfer predict' wrote: its header (index, sample_id, the probabilities, [thresholds,
    conformal_set, prior_adapted,] predicted)."""
    header = first_line(path) or ""
    return header.startswith("index,sample_id,prob_") and header.endswith(",predicted")
