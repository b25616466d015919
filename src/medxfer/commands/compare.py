"""``medxfer compare``: strategies x seeds on one split; comparison.json, comparison.html, a table."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command(name="compare", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(compare)


def compare(
    ctx: typer.Context,
    strategies: str = typer.Option("linear-probe,partial,full,scratch", help="Comma-separated strategies to compare."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated training seeds (the split stays the same)."),
    sources: Optional[str] = typer.Option(None, help="Comma-separated sources to transfer from, one row per strategy "
                                          "and source (e.g. efficientnet_lite0.in1k,runs/src_pneu). Default: --source."),
    split_seed: int = typer.Option(0, help="Seed of the train/val/test split, fixed across all runs."),
    label_fraction: Optional[str] = typer.Option(None, help="Learning curve: comma-separated fractions of the train labels, e.g. 0.01,0.1,1.0."),
    out_dir: Path = typer.Option(Path("runs/compare"), "--out", help="Folder for the runs and comparison.json/.html."),
    retrain: bool = typer.Option(False, "--retrain", help="Retrain runs even when a finished run of the same config is there."),
    quiet: bool = typer.Option(False, "--quiet", help="No per-run progress bars."),
):
    """Compare strategies over seeds on one split: mean ± sd, a paired test vs scratch, a learning curve.

    Pass --data and any 'medxfer train' option (see 'medxfer train --help'); it applies to every run.
    """
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from medxfer import compare as lib
    from medxfer.cli import console, make_config, out, print_wide, run_training
    from medxfer.commands.cv import train_options
    from medxfer.errors import MedxferError

    names, seed_list = lib.parse_strategies(strategies), lib.parse_seeds(seeds)
    fractions = lib.parse_fractions(label_fraction) if label_fraction is not None else None
    options, config = train_options(ctx.args, command="medxfer compare")
    for key in ("strategy", "seed", "compile"):
        if options.pop(key, None) not in (None, False):
            raise MedxferError(f"medxfer compare sets --{key} itself: use --strategies / --seeds instead.")
    if options.pop("resume", False):
        raise MedxferError("medxfer compare resumes interrupted runs and reuses finished ones by itself: leave out "
                           "--resume (use --retrain to start every run again).")
    source_list = lib.parse_sources(sources) if sources is not None else None
    if source_list is not None:
        if options.get("source") is not None:
            raise MedxferError("give either --source or --sources, not both.")
        options["source"] = source_list[0]
    cfg = make_config(config, strategy=names[0], **options)
    log = (lambda msg: None) if quiet else (lambda msg: console.print(f"[dim]{msg}[/dim]", highlight=False))
    result = lib.compare(cfg, names, seed_list, out_dir, split_seed=split_seed, label_fractions=fractions,
                         train_fn=lambda c: run_training(c, quiet=quiet), log=log, resume=not retrain,
                         sources=source_list)

    st = result["settings"]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  title=f"{lib.sources_text(st['source'])} on {st['data']}: test split, mean ± sd over seeds "
                        f"{st['seeds']}")
    table.add_column("strategy" if source_list is None else escape("strategy [source]"), no_wrap=True)
    for name in ("AUC", "bal. acc", "sens", "spec", "train s"):  # total s: in comparison.json / .html
        table.add_column(name, justify="right", no_wrap=True)
    for row in lib.table_rows(result):
        table.add_row(*(escape(c.replace(" ± ", "±")) for c in row[:6]))  # "full [src]" is text, not markup
    print_wide(table, 140)  # rows like 'full [efficientnet_lite0.in1k]' need more than 80 columns
    pt = result["paired_test"] or {}
    out.print(escape(pt.get("conclusion") or pt.get("skipped") or ""), highlight=False)
    if "learning_curve" in result:
        for s, pts in result["learning_curve"].items():
            cells = ", ".join(f"{f}: {lib.mean_sd(v)}" for f, v in pts.items())
            out.print(escape(f"learning curve {s} (label fraction: test AUC) {cells}"), highlight=False)
    out.print(f"comparison: {out_dir / 'comparison.json'}, {out_dir / 'comparison.html'}", highlight=False)
