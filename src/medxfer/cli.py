"""The ``medxfer`` command line. Each command parses options and calls the library.

``main(argv)`` runs in-process (tests call it); user mistakes print one ``medxfer: ...`` line and
return exit code 2, never a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from medxfer.errors import MedxferError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Transfer learning for medical image classification.")
console = Console(stderr=True)
out = Console(soft_wrap=True)

DEMO_DATA = Path(__file__).parent / "datasets" / "breastmnist_28.npz"


def _split_list(text: Optional[str]) -> Optional[tuple[str, ...]]:
    return tuple(s.strip() for s in text.split(",") if s.strip()) if text else None


def make_config(config: Optional[Path], **options):
    """TrainConfig from an optional YAML file, overridden by the options given on the command line."""
    from medxfer.config import config_from_dict, load_config

    base = load_config(config).to_dict() if config else {}
    given = {k: v for k, v in options.items() if v is not None}
    if "label_names" in given:
        given["label_names"] = _split_list(given["label_names"])
    base.update(given)
    base.pop("extra", None)
    if "data" not in base:
        raise MedxferError("no data given: pass --data PATH (an .npz, a folder, a CSV/Parquet manifest) or --config FILE.")
    return config_from_dict(base)


class EpochProgress:
    """A rich progress bar over epochs: loss, validation AUC, time left."""

    def __init__(self, total: int, title: str):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("epoch {task.completed}/{task.total}"),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                                 transient=False)
        self.task = self.progress.add_task(title, total=total, info="")

        self.started = False

    def set_total(self, total: int) -> None:
        self.progress.update(self.task, total=total)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.started:
            self.progress.__exit__(*exc)

    def __call__(self, record: dict) -> None:
        if not self.started:  # the bar appears with the first epoch, not before data checks
            self.progress.__enter__()
            self.started = True
        info = f"loss {record['train_loss']:.3f}  val AUC {record['val_auc']:.3f}"
        self.progress.update(self.task, completed=record["epoch"], info=info)


def run_training(cfg, quiet: bool = False) -> dict:
    from medxfer.pipeline import train

    log = (lambda *a, **k: None) if quiet else (lambda msg: console.print(f"[dim]{msg}[/dim]"))
    if quiet or cfg.strategy == "linear-probe":
        return train(cfg, log=log)
    with EpochProgress(cfg.resolved_epochs, f"{cfg.strategy}") as bar:
        return train(cfg, log=log, progress=bar)


@app.command()
def train(
    data: Optional[str] = typer.Option(None, help="npz, folder of class folders, CSV/Parquet manifest, or DICOM folder (with --labels)."),
    source: Optional[str] = typer.Option(None, help="Source model (see 'medxfer sources'), a timm name, or a pretrain directory."),
    weights: Optional[str] = typer.Option(None, help="Weights for a timm source: FILE, 'hub' or 'none'."),
    strategy: Optional[str] = typer.Option(None, help="linear-probe | partial | full | scratch."),
    unfreeze: Optional[int] = typer.Option(None, help="partial: how many of the last stages train."),
    image_size: Optional[int] = typer.Option(None, help="Input size in pixels (default: the source's)."),
    epochs: Optional[int] = typer.Option(None), batch_size: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None, help="Head learning rate."),
    backbone_lr_mult: Optional[float] = typer.Option(None), layer_decay: Optional[float] = typer.Option(None),
    weight_decay: Optional[float] = typer.Option(None), patience: Optional[int] = typer.Option(None),
    ema_epochs: Optional[float] = typer.Option(None, help="Keep an EMA of the weights over about E epochs (0: off)."),
    class_weights: Optional[str] = typer.Option(None, help="none | balanced."),
    augment: Optional[str] = typer.Option(None, help="none | light | strong."),
    head: Optional[str] = typer.Option(None, help="linear-probe head: logistic | linear."),
    feature_augment: Optional[int] = typer.Option(None, help="linear-probe: K cached augmented views."),
    grey_mode: Optional[str] = typer.Option(None, help="Grey input: sum (1-channel stem) | replicate."),
    label_names: Optional[str] = typer.Option(None, help="Comma-separated class names for index labels."),
    positive_label: Optional[str] = typer.Option(None), seed: Optional[int] = typer.Option(None),
    split_by: Optional[str] = typer.Option(None, help="Group splits by this column (default patient_id)."),
    precision: Optional[str] = typer.Option(None, help="auto | bf16 | fp16 | fp32."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile"),
    duplicates: Optional[str] = typer.Option(None, help="Images found in two splits: drop-from-train (default: keep "
                                             "val/test as given) | refuse | allow."),
    allow_duplicates: Optional[bool] = typer.Option(None, "--allow-duplicates/--refuse-duplicates",
                                                    help="Same as --duplicates allow / --duplicates refuse."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished run in --out (once the new one "
                                   "is complete)."),
    keep_paths: bool = typer.Option(False, "--keep-paths", help="Write paths.csv mapping sample ids to files "
                                    "(file names can hold patient names)."),
    on_unlabelled: Optional[str] = typer.Option(None, help="DICOM folder: files without a label: error | skip."),
    devices: int = typer.Option(1, help="Processes to launch with torchrun (DDP)."),
    num_threads: Optional[int] = typer.Option(None),
    on_bad_file: Optional[str] = typer.Option(None, help="error | skip (listed in skipped.csv)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Labels CSV for a DICOM folder."),
    window: Optional[str] = typer.Option(None), frame: Optional[str] = typer.Option(None),
    slice_: Optional[str] = typer.Option(None, "--slice"), intensity: Optional[str] = typer.Option(None),
    cache_dir: Optional[str] = typer.Option(None), no_cache: Optional[bool] = typer.Option(None, "--no-cache"),
    threshold: Optional[str] = typer.Option(None, help="youden | sensitivity=S | specificity=S | number."),
    calibrate: Optional[str] = typer.Option(None, help="temperature | none."),
    report: Optional[bool] = typer.Option(None, "--report/--no-report", help="Write report.html at the end."),
    bootstrap: Optional[int] = typer.Option(None), label_fraction: Optional[float] = typer.Option(None),
    out_dir: Optional[str] = typer.Option(None, "--out", help="Run directory to write."),
    config: Optional[Path] = typer.Option(None, help="YAML config; options given here override it."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUT.partial/checkpoint.pt "
                                "(same options; at most one epoch is lost)."),
):
    """Train a target model from a source model with a strategy; writes a run directory."""
    if devices > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_launch_torchrun(devices))
    if threshold is not None:
        from medxfer.evaluation.calibration import parse_threshold_rule

        parse_threshold_rule(threshold)
    cfg = make_config(config, data=data, source=source, weights=weights, strategy=strategy, unfreeze=unfreeze,
                      image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr,
                      backbone_lr_mult=backbone_lr_mult, layer_decay=layer_decay, weight_decay=weight_decay,
                      patience=patience, ema_epochs=ema_epochs, class_weights=class_weights, augment=augment, head=head,
                      feature_augment=feature_augment, grey_mode=grey_mode, label_names=label_names,
                      positive_label=positive_label, seed=seed, split_by=split_by, precision=precision,
                      compile=compile, duplicates=_duplicates(duplicates, allow_duplicates),
                      overwrite=overwrite or None, keep_paths=keep_paths or None, on_unlabelled=on_unlabelled,
                      devices=devices if devices > 1 else None, num_threads=num_threads, on_bad_file=on_bad_file,
                      labels_csv=labels, window=window, frame=frame, slice=slice_,
                      intensity=intensity, cache_dir=cache_dir, no_cache=no_cache, threshold=threshold,
                      calibrate=calibrate, report=report, bootstrap=bootstrap, label_fraction=label_fraction,
                      out=out_dir, resume=resume or None)
    result = run_training(cfg)
    if "metrics" in result:
        print_metrics(result["metrics"], result["run_dir"])


def _duplicates(policy: Optional[str], allow: Optional[bool]) -> Optional[str]:
    if allow is not None and policy is not None:
        raise MedxferError("give --duplicates or --allow-duplicates/--refuse-duplicates, not both.")
    return policy if allow is None else ("allow" if allow else "refuse")


def _launch_torchrun(devices: int) -> int:
    """Re-run this very command under torchrun with ``devices`` processes (PyTorch's own launcher)."""
    args = list(_ARGV)  # the arguments main() was given (also when called in-process)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
           "-m", "medxfer", *args]
    console.print(f"[dim]launching: {' '.join(cmd[2:])}[/dim]")
    return subprocess.call(cmd)


def print_metrics(metrics: dict, run_dir: str) -> None:
    table = Table(title=f"{metrics['strategy']} from {metrics['source']} (seed {metrics['seed']})")
    for col in ("split", "AUC", "bal. acc", "sens", "spec", "F1"):
        table.add_column(col)
    for split in ("val", "test"):
        m = metrics[split]
        table.add_row(split, *(_fmt(m.get(k)) for k in ("auc", "balanced_accuracy", "sensitivity", "specificity", "f1")))
    out.print(table)
    t = metrics["test"]
    if t.get("auc_ci"):
        out.print(f"test AUC {t['auc']:.3f} (95% CI {t['auc_ci'][0]:.3f}-{t['auc_ci'][1]:.3f}); "
                  f"threshold {_fmt(metrics.get('threshold'))} chosen on validation; train {metrics['train_seconds']:.1f} s")
    out.print(f"run directory: {run_dir}")


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


@app.command()
def sources(source_dir: list[Path] = typer.Option([], "--dir", help="Also list sources made by 'medxfer pretrain' here.")):
    """List source models: architecture, where the weights come from, availability, input contract."""
    from medxfer.models.catalog import list_sources

    def vec(v) -> str:
        return f"{v[0]:.3g}" if len(set(v)) == 1 else "/".join(f"{x:.3g}" for x in v)

    for s in list_sources(source_dir):
        ok, why = s.available()
        out.print(f"[bold]{s.name}[/bold]  ({'available' if ok else 'NOT available'}: {why})", highlight=False)
        out.print(f"  architecture {s.arch}; weights {s.weights}; learned on {s.domain}", highlight=False)
        out.print(f"  input contract: {s.input_size} px, {s.in_chans} channels, mean {vec(s.mean)}, std {vec(s.std)}"
                  " (grey images: stem summed to 1 channel, or --grey-mode replicate)", highlight=False)
    out.print("Any timm architecture also works: --source NAME --weights FILE|hub|none.")


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="A run directory from 'medxfer train'."),
    inputs: list[str] = typer.Argument(..., help="Image files, folders or npz archives."),
    out_file: Path = typer.Option(Path("predictions.csv"), "--out"),
    engine: str = typer.Option("torch", help="torch | onnx (run 'medxfer export' first)."),
    batch_size: int = typer.Option(64), on_bad_file: str = typer.Option("error", help="error | skip."),
    keep_paths: bool = typer.Option(False, "--keep-paths", help="Also write OUT_paths.csv mapping sample ids to "
                                    "files (file names can hold patient names: keep it private)."),
):
    """Predict calibrated class probabilities with a trained run, from the run directory alone.

    Rows are named by their input order (index) and a pseudonymous sample_id, never by file name."""
    import pandas as pd

    from medxfer.predict import Predictor
    from medxfer.runs import write_csv

    if out_file.exists() and out_file.is_dir():
        raise MedxferError(f"--out '{out_file}' is a folder; give a CSV file name.")
    paths: list | None = [] if keep_paths else None
    df, skipped = Predictor(run_dir, engine=engine, batch_size=batch_size).predict_paths(inputs, on_bad_file, paths)
    write_csv(out_file, df)
    if skipped:
        name = out_file.with_name(out_file.stem + "_skipped.csv")
        write_csv(name, pd.DataFrame([(s.sample_id, s.reason) for s in skipped], columns=["sample_id", "reason"]))
        console.print(f"skipped {len(skipped)} unreadable samples (see {name.name})")
    if paths:
        write_csv(out_file.with_name(out_file.stem + "_paths.csv"), pd.DataFrame(paths, columns=["sample_id", "path"]))
    out.print(f"{len(df)} predictions -> {out_file}")


@app.command()
def demo(out_dir: Path = typer.Option(Path("runs/demo"), "--out"), seed: int = typer.Option(0),
         epochs: Optional[int] = typer.Option(None, help="Epochs for full and scratch (default: medxfer's, data-aware)."),
         image_size: int = typer.Option(64)):
    """The seed's story on bundled BreastMNIST: linear-probe vs full fine-tuning vs scratch."""
    from medxfer.config import TrainConfig

    out.print("BreastMNIST (breast ultrasound: malignant vs normal/benign; MedMNIST v2, CC BY 4.0), "
              f"source efficientnet_lite0.in1k (ImageNet), {image_size} px, seed {seed}")
    rows = []
    for strategy, n in (("linear-probe", None), ("full", epochs), ("scratch", epochs)):
        cfg = TrainConfig(data=str(DEMO_DATA), strategy=strategy, image_size=image_size, epochs=n, seed=seed,
                          label_names=("malignant", "benign"), positive_label="malignant",
                          overwrite=True, out=str(out_dir / strategy))
        m = run_training(cfg)["metrics"]
        rows.append((strategy, m))
    table = Table(title="Does transfer help? BreastMNIST test split (positive class: malignant)")
    for col in ("strategy", "AUC (95% CI)", "bal. acc", "sensitivity", "specificity", "train s"):
        table.add_column(col)
    for strategy, m in rows:
        t = m["test"]
        ci = f" ({t['auc_ci'][0]:.3f}-{t['auc_ci'][1]:.3f})" if t.get("auc_ci") else ""
        table.add_row(strategy, f"{t['auc']:.3f}{ci}", f"{t['balanced_accuracy']:.3f}", f"{t['sensitivity']:.3f}",
                      f"{t['specificity']:.3f}", f"{m['train_seconds']:.0f}")
    print_wide(table, 100)  # CIs stay whole in logs and pipes
    out.print(f"Threshold chosen on validation (Youden). Runs in {out_dir}/<strategy>.")


def print_wide(renderable, width: int) -> None:
    """Print to stdout at least ``width`` columns wide when it is not a terminal (logs and pipes default
    to 80 columns, which cuts table cells); on a terminal, its own width."""
    from rich.console import Console

    (out if out.is_terminal else Console(width=max(out.width, width))).print(renderable)


def _register_commands() -> None:
    import importlib

    from medxfer.commands import COMMAND_MODULES

    for name in COMMAND_MODULES:
        importlib.import_module(f"medxfer.commands.{name}").register(app)


_register_commands()


_ARGV: list[str] = []


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 user error)."""
    global _ARGV
    argv = list(argv if argv is not None else sys.argv[1:])
    _ARGV = argv
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
    except (click.exceptions.Abort, typer.Abort):
        return 130
    return result if isinstance(result, int) else 0
