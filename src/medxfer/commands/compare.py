"""``medxfer compare``: strategies x seeds on one split; comparison.json, comparison.html, a table."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command(name="compare")(compare)


def compare(
    data: Optional[str] = typer.Option(None, help="npz, folder of class folders, CSV/Parquet manifest, or DICOM folder (with --labels)."),
    strategies: str = typer.Option("linear-probe,partial,full,scratch", help="Comma-separated strategies to compare."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated training seeds (the split stays the same)."),
    split_seed: int = typer.Option(0, help="Seed of the train/val/test split, fixed across all runs."),
    label_fraction: Optional[str] = typer.Option(None, help="Learning curve: comma-separated fractions of the train labels, e.g. 0.01,0.1,1.0."),
    out_dir: Path = typer.Option(Path("runs/compare"), "--out", help="Folder for the runs and comparison.json/.html."),
    retrain: bool = typer.Option(False, "--retrain", help="Retrain runs even when a finished run of the same config is there."),
    source: Optional[str] = typer.Option(None, help="Source model (see 'medxfer sources'), a timm name, or a pretrain directory."),
    weights: Optional[str] = typer.Option(None, help="Weights for a timm source: FILE, 'hub' or 'none'."),
    unfreeze: Optional[int] = typer.Option(None, help="partial: how many of the last stages train."),
    image_size: Optional[int] = typer.Option(None, help="Input size in pixels (default: the source's)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs for every strategy (default: per-strategy)."),
    batch_size: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None, help="Head learning rate (default: per-strategy)."),
    backbone_lr_mult: Optional[float] = typer.Option(None), layer_decay: Optional[float] = typer.Option(None),
    weight_decay: Optional[float] = typer.Option(None), patience: Optional[int] = typer.Option(None),
    class_weights: Optional[str] = typer.Option(None, help="none | balanced."),
    augment: Optional[str] = typer.Option(None, help="none | light | strong."),
    head: Optional[str] = typer.Option(None, help="linear-probe head: logistic | linear."),
    feature_augment: Optional[int] = typer.Option(None, help="linear-probe: K cached augmented views."),
    grey_mode: Optional[str] = typer.Option(None, help="Grey input: sum (1-channel stem) | replicate."),
    label_names: Optional[str] = typer.Option(None, help="Comma-separated class names for index labels."),
    positive_label: Optional[str] = typer.Option(None),
    split_by: Optional[str] = typer.Option(None, help="Group splits by this column (default patient_id)."),
    precision: Optional[str] = typer.Option(None, help="auto | bf16 | fp16 | fp32."),
    num_threads: Optional[int] = typer.Option(None),
    on_bad_file: Optional[str] = typer.Option(None, help="error | skip (listed in skipped.csv)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Labels CSV for a DICOM folder."),
    window: Optional[str] = typer.Option(None), frame: Optional[str] = typer.Option(None),
    slice_: Optional[str] = typer.Option(None, "--slice"), intensity: Optional[str] = typer.Option(None),
    cache_dir: Optional[str] = typer.Option(None), no_cache: Optional[bool] = typer.Option(None, "--no-cache"),
    threshold: Optional[str] = typer.Option(None, help="youden | sensitivity=S | specificity=S | number."),
    calibrate: Optional[str] = typer.Option(None, help="temperature | none."),
    bootstrap: Optional[int] = typer.Option(None, help="Bootstrap resamples for CIs and the paired test."),
    config: Optional[Path] = typer.Option(None, help="YAML config with common train options; options given here override it."),
    quiet: bool = typer.Option(False, "--quiet", help="No per-run progress bars."),
    allow_duplicates: Optional[bool] = typer.Option(None, "--allow-duplicates/--refuse-duplicates",
                                                    help="Keep exact duplicate images found across splits (warns)."),
    report: Optional[bool] = typer.Option(None, "--report/--no-report", help="Write report.html for every run."),
):
    """Compare strategies over seeds on one split: mean ± sd, a paired test vs scratch, a learning curve."""
    from rich import box
    from rich.table import Table

    from medxfer import compare as lib
    from medxfer.cli import console, make_config, out, run_training

    names, seed_list = lib.parse_strategies(strategies), lib.parse_seeds(seeds)
    fractions = lib.parse_fractions(label_fraction) if label_fraction is not None else None
    if threshold is not None:
        from medxfer.evaluation.calibration import parse_threshold_rule

        parse_threshold_rule(threshold)
    cfg = make_config(config, data=data, source=source, weights=weights, strategy=names[0], unfreeze=unfreeze,
                      image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr,
                      backbone_lr_mult=backbone_lr_mult, layer_decay=layer_decay, weight_decay=weight_decay,
                      patience=patience, class_weights=class_weights, augment=augment, head=head,
                      feature_augment=feature_augment, grey_mode=grey_mode, label_names=label_names,
                      positive_label=positive_label, split_by=split_by, precision=precision,
                      num_threads=num_threads, on_bad_file=on_bad_file, labels_csv=labels, window=window,
                      frame=frame, slice=slice_, intensity=intensity, cache_dir=cache_dir, no_cache=no_cache,
                      threshold=threshold, calibrate=calibrate, bootstrap=bootstrap,
                      allow_duplicates=allow_duplicates, report=report)
    log = (lambda msg: None) if quiet else (lambda msg: console.print(f"[dim]{msg}[/dim]", highlight=False))
    result = lib.compare(cfg, names, seed_list, out_dir, split_seed=split_seed, label_fractions=fractions,
                         train_fn=lambda c: run_training(c, quiet=quiet), log=log, resume=not retrain)

    st = result["settings"]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  title=f"{st['source']} on {st['data']}: test split, mean ± sd over seeds {st['seeds']}")
    table.add_column("strategy", no_wrap=True)
    for name in ("AUC", "bal. acc", "sens", "spec", "train s"):  # total s: in comparison.json / .html
        table.add_column(name, justify="right", no_wrap=True)
    for row in lib.table_rows(result):
        table.add_row(*(c.replace(" ± ", "±") for c in row[:6]))  # fits 80 columns
    out.print(table)
    pt = result["paired_test"] or {}
    out.print(pt.get("conclusion") or pt.get("skipped") or "", highlight=False)
    if "learning_curve" in result:
        for s, pts in result["learning_curve"].items():
            cells = ", ".join(f"{f}: {lib.mean_sd(v)}" for f, v in pts.items())
            out.print(f"learning curve {s} (label fraction: test AUC) {cells}", highlight=False)
    out.print(f"comparison: {out_dir / 'comparison.json'}, {out_dir / 'comparison.html'}", highlight=False)
