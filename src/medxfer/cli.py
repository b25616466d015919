"""The ``medxfer`` command line. Commands parse options and call the library; the options of train,
cv, compare, pretrain and features are generated from the fields of :mod:`medxfer.config`, so each is
declared once, with its help, real default and allowed values.

``main(argv)`` runs in-process (tests call it); user mistakes print one ``medxfer: ...`` line and
return exit code 2, never a traceback; an interrupted command returns 130.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Optional

import click
import pandas as pd
import typer
from rich.table import Table

from medxfer.commands import COMMAND_MODULES, base
from medxfer.commands.base import (
    Given,
    command,
    console,
    launch_torchrun,
    option_fields,
    out,
    print_wide,
    setup_logging,
)
from medxfer.config import TrainConfig
from medxfer.errors import MedxferError
from medxfer.files import first_line, write_csv
from medxfer.models.catalog import list_sources
from medxfer.pipeline import train
from medxfer.predict import Predictor
from medxfer.runs import check_out

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Transfer learning for medical image classification.")


TRAIN_FIELDS = option_fields()


# ------------------------------------------------------------------------------------ train, demo, sources
@command(app, "train", TRAIN_FIELDS)
def train_command(given: Given, config: Optional[Path] = typer.Option(
        None, help="A config.yaml (a run's own replays it); options given here override it.",
        rich_help_panel="Run")):
    """Train a target model from a source model with a strategy; writes a run directory."""
    cfg = given.config(config)
    code = launch_torchrun(cfg.runtime.devices)
    if code is not None:
        raise typer.Exit(code)
    print_metrics(train(cfg))


#: the summary columns per task: (heading, metrics.json key)
SUMMARY = {"multilabel": (("macro AUC", "auc"), ("micro AUC", "micro_auc"), ("macro AP", "macro_average_precision"),
                          ("macro F1", "macro_f1")),
           "ordinal": (("cut AUC", "auc"), ("QWK", "qwk"), ("MAE", "mae"), ("accuracy", "accuracy")),
           "other": (("AUC", "auc"), ("bal. acc", "balanced_accuracy"), ("sens", "sensitivity"),
                     ("spec", "specificity"), ("F1", "f1"))}


def print_metrics(run) -> None:
    if run is None:  # a DDP rank other than 0
        return
    m = run.metrics
    task = m.get("task", "binary")
    cols = SUMMARY.get(task, SUMMARY["other"])
    table = Table(title=f"{m['strategy']} from {m['source']} (seed {m['seed']}, {task})")
    for col in ("split", *(c for c, _ in cols)):
        table.add_column(col)
    for split in ("val", "test"):
        table.add_row(split, *(_fmt(m[split].get(k)) for _, k in cols))
    print_wide(table, 80)
    t = m["test"]
    if task == "multilabel":
        per = Table(title="test, per finding (thresholds chosen on validation)")
        for col in ("finding", "positives", "AUC (95% CI)", "sens", "spec", "note"):
            per.add_column(col)
        for name, r in t["per_label"].items():
            ci = f" ({r['auc_ci'][0]:.3f}-{r['auc_ci'][1]:.3f})" if r.get("auc_ci") else ""
            per.add_row(name, str(r["n_pos"]), _fmt(r["auc"]) + ci, _fmt(r["sensitivity"]), _fmt(r["specificity"]),
                        "too rare" if not r["evaluable"] else "")
        print_wide(per, 80)
    if t.get("auc_ci"):
        what = {"multilabel": "thresholds per finding chosen on validation",
                "ordinal": "predicted grade: the median of the calibrated grade probabilities"}.get(
            task, f"threshold {_fmt(m.get('threshold'))} chosen on validation")
        out.print(f"test {cols[0][0]} {t['auc']:.3f} (95% CI {t['auc_ci'][0]:.3f}-{t['auc_ci'][1]:.3f}); "
                  f"{what}; train {m['train_seconds']:.1f} s", highlight=False)
    out.print(f"run directory: {run.dir}", highlight=False)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


DEMO_DATA = Path(__file__).parent / "datasets" / "breastmnist_28.npz"


@command(app, "demo")
def demo(out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the three runs."),
         seed: int = typer.Option(0, help="Training seed (the split is BreastMNIST's own)."),
         epochs: Optional[int] = typer.Option(None, help="Epochs for full and scratch.",
                                              show_default="the strategy's, data-aware"),
         image_size: int = typer.Option(64, help="Input size in pixels.")):
    """Transfer learning on bundled BreastMNIST: linear-probe vs full fine-tuning vs scratch (test AUC with CIs)."""
    out.print("BreastMNIST (breast ultrasound: malignant vs normal/benign; MedMNIST v2, CC BY 4.0), "
              f"source efficientnet_lite0.in1k (ImageNet), {image_size} px, seed {seed}", highlight=False)
    rows = []
    for strategy, n in (("linear-probe", None), ("full", epochs), ("scratch", epochs)):
        cfg = TrainConfig.create(data=str(DEMO_DATA), strategy=strategy, image_size=image_size, epochs=n, seed=seed,
                                 label_names=("malignant", "benign"), positive_label="malignant", overwrite=True,
                                 out=str(out_dir / strategy))
        rows.append((strategy, train(cfg).metrics))
    table = Table(title="Does transfer help? BreastMNIST test split (positive class: malignant)")
    for col in ("strategy", "AUC (95% CI)", "bal. acc", "sensitivity", "specificity", "train s"):
        table.add_column(col)
    for strategy, m in rows:
        t = m["test"]
        ci = f" ({t['auc_ci'][0]:.3f}-{t['auc_ci'][1]:.3f})" if t.get("auc_ci") else ""
        table.add_row(strategy, f"{t['auc']:.3f}{ci}", f"{t['balanced_accuracy']:.3f}", f"{t['sensitivity']:.3f}",
                      f"{t['specificity']:.3f}", f"{m['train_seconds']:.0f}")
    print_wide(table, 100)  # CIs stay whole in logs and pipes
    out.print(f"Threshold chosen on validation (Youden). Runs in {out_dir}/<strategy>.", highlight=False)


@command(app, "sources")
def sources(source_dir: list[Path] = typer.Option([], "--dir", help="Also list sources made by 'medxfer pretrain' here.")):
    """List source models: architecture, where the weights come from, availability, input contract."""

    def vec(v) -> str:
        return f"{v[0]:.3g}" if len(set(v)) == 1 else "/".join(f"{x:.3g}" for x in v)

    for s in list_sources(source_dir):
        ok, why = s.available()
        out.print(f"[bold]{s.name}[/bold]  ({'available' if ok else 'NOT available'}: {why})", highlight=False)
        out.print(f"  architecture {s.arch}; weights {s.weights}; learned on {s.domain}", highlight=False)
        out.print(f"  input contract: {s.input_size} px, {s.in_chans} channels, mean {vec(s.mean)}, std {vec(s.std)}"
                  " (grey images: stem summed to 1 channel, or --grey-mode replicate)", highlight=False)
    out.print("Any timm architecture also works: --source NAME --weights FILE|hub|none.")


@command(app, "predict")
def predict(
    run_dir: Path = typer.Argument(..., help="A run directory from 'medxfer train'."),
    inputs: list[str] = typer.Argument(..., help="Image files, folders or npz archives."),
    out_file: Path = typer.Option(Path("predictions.csv"), "--out", help="CSV to write."),
    engine: str = typer.Option("torch", help="torch | onnx (run 'medxfer export' first)."),
    batch_size: int = typer.Option(64, help="Images per model call."),
    on_bad_file: str = typer.Option("error", help="error | skip (listed in OUT_skipped.csv)."),
    keep_paths: bool = typer.Option(False, "--keep-paths", help="Also write OUT_paths.csv mapping sample ids to "
                                    "files (file names can hold patient names: keep it private)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file that medxfer did not "
                                   "write (never an input or a file inside a run)."),
):
    """Predict calibrated class probabilities with a trained run, from the run directory alone.

    Rows are named by their input order (index) and a pseudonymous sample_id, never by file name."""
    side = {"skipped": (out_file.with_name(out_file.stem + "_skipped.csv"), "sample_id,reason"),
            "paths": (out_file.with_name(out_file.stem + "_paths.csv"), "sample_id,path")}
    given = [run_dir, *inputs]
    check_out(out_file, inputs=given, overwrite=overwrite, ours=_is_predictions_csv)  # before any work
    for name, (path, header) in side.items():
        if name == "paths" and keep_paths or name == "skipped" and on_bad_file == "skip":
            check_out(path, inputs=given, overwrite=overwrite, ours=lambda p, h=header: first_line(p) == h)
    paths: list | None = [] if keep_paths else None
    skipped: list = []
    df = Predictor(run_dir, engine=engine, batch_size=batch_size).predict(inputs, on_bad_file, paths, skipped)
    write_csv(out_file, df)
    if skipped:
        name = side["skipped"][0]
        write_csv(name, pd.DataFrame([(s.sample_id, s.reason) for s in skipped], columns=["sample_id", "reason"]))
        logging.getLogger("medxfer").warning("skipped %d unreadable samples (see %s)", len(skipped), name.name)
    if paths:
        write_csv(side["paths"][0], pd.DataFrame(paths, columns=["sample_id", "path"]))
    out.print(f"{len(df)} predictions -> {out_file}", highlight=False)


def _is_predictions_csv(path: Path) -> bool:
    """The mark of a CSV 'medxfer predict' wrote: its header (index, sample_id, the probabilities, predicted)."""
    header = first_line(path) or ""
    return header.startswith("index,sample_id,prob_") and header.endswith(",predicted")


def _register_commands() -> None:
    """The command modules register themselves; each is a small file beside its job."""
    for name in COMMAND_MODULES:
        importlib.import_module(f"medxfer.commands.{name}").register(app)


_register_commands()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    argv = list(argv if argv is not None else sys.argv[1:])
    base.ARGV[:] = argv
    setup_logging()
    try:
        result = app(args=argv, prog_name="medxfer", standalone_mode=False)
    except MedxferError as e:
        console.print(f"medxfer: {e}", markup=False, highlight=False, soft_wrap=True)
        return e.exit_code
    except (click.exceptions.Exit, typer.Exit) as e:  # typer bundles its own click: catch both
        return e.exit_code
    except (click.ClickException, typer.TyperException) as e:
        msg = e.format_message()
        if msg:
            console.print(f"medxfer: {msg}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):
        console.print("medxfer: interrupted", markup=False, highlight=False)
        return 130
    return result if isinstance(result, int) else 0
