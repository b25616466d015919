"""``medxfer compare``: strategies x seeds on one split; comparison.json, comparison.html, a table."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from medxfer.commands.base import RERUN, Given, command, option_fields, out, print_wide
from medxfer.errors import MedxferError

PANEL = "Comparison"


def register(app: typer.Typer) -> None:
    @command(app, "compare", option_fields(exclude=("strategy", "seed", "out", "resume", "overwrite", "devices",
                                                    "label_fraction")), interrupted=RERUN)
    def compare(
        given: Given,
        strategies: str = typer.Option("linear-probe,partial,full,scratch", help="Comma-separated strategies.",
                                       rich_help_panel=PANEL),
        seeds: str = typer.Option("0,1,2", help="Comma-separated training seeds (the split stays the same).",
                                  rich_help_panel=PANEL),
        sources: Optional[str] = typer.Option(None, help="Comma-separated sources, one row per strategy and source "
                                              "(e.g. efficientnet_lite0.in1k,runs/src_pneu).", show_default="--source",
                                              rich_help_panel=PANEL),
        views: Optional[str] = typer.Option(None, help="Volumes: comma-separated views, one row per strategy and view "
                                            "on the same split: slice (middle slice), 2.5d (three orthogonal "
                                            "mid-planes), mip, 3d (a 3-D network). --image-size applies to each.",
                                            rich_help_panel=PANEL),
        label_fractions: Optional[str] = typer.Option(None, help="Learning curve: comma-separated fractions of the "
                                                      "train labels, e.g. 0.01,0.1,1.0 (--label-fraction is one "
                                                      "fraction for one run).", rich_help_panel=PANEL),
        out_dir: Path = typer.Option(Path("runs/compare"), "--out", help="Folder for the runs and comparison.json/"
                                     ".html.", rich_help_panel=PANEL),
        retrain: bool = typer.Option(False, "--retrain", help="Retrain runs even when a finished run of the same "
                                     "config is there.", rich_help_panel=PANEL),
        config: Optional[Path] = typer.Option(None, help="A config.yaml; options given here override it.",
                                              rich_help_panel="Run"),
        resume: bool = typer.Option(False, "--resume", hidden=True),
    ):
        """Compare strategies over seeds on one split: mean ± sd, a paired test vs scratch (of the strategy best
        on validation), a learning curve. Every 'medxfer train' option below applies to every run."""
        from medxfer import comparison as lib

        if resume:
            raise MedxferError("medxfer compare resumes interrupted runs and reuses finished ones by itself: leave out "
                               "--resume (use --retrain to start every run again).")
        names, seed_list = lib.parse_strategies(strategies), lib.parse_seeds(seeds)
        fractions = lib.parse_fractions(label_fractions) if label_fractions is not None else None
        split_seed = given.values["split_seed"] or 0  # one split for every run: seed 0 unless given
        source_list = lib.parse_sources(sources) if sources is not None else None
        if source_list is not None and "source" in given.explicit:
            raise MedxferError("give either --source or --sources, not both.")
        clash = sorted({"slice", "spatial_dims"} & set(given.explicit)) if views is not None else []  # --inflate: fine
        if clash:
            flag = clash[0].replace("_", "-")
            raise MedxferError(f"--views sets how volumes are read; leave out --{flag} (each view sets it: slice, 2.5d "
                               "and mip are 2-D, 3d is --spatial-dims 3).")
        fixed = {"strategy": names[0]} | ({"source": source_list[0]} if source_list else {})
        result = lib.compare(given.config(config, **fixed), names, seed_list, out_dir, split_seed=split_seed,
                             label_fractions=fractions, resume=not retrain, sources=source_list,
                             views=lib.parse_views(views) if views is not None else None)
        print_table(result, source_list is not None, views is not None)
        out.print(f"comparison: {out_dir / 'comparison.json'}, {out_dir / 'comparison.html'}", highlight=False)


def print_table(result: dict, several_sources: bool, several_views: bool = False) -> None:
    """The comparison on stdout; paths stay out of the title (they would wrap with the width)."""
    from medxfer import comparison as lib

    st = result["settings"]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  title=f"test split, mean ± sd over seeds {st['seeds']}")
    first = "strategy [source]" if several_sources else "strategy [view]" if several_views else "strategy"
    table.add_column(escape(first), no_wrap=True)
    for name in ("AUC", "bal. acc", "sens", "spec", "train s"):  # total s: in comparison.json / .html
        table.add_column(name, justify="right", no_wrap=True)
    for row in lib.table_rows(result):
        table.add_row(*(escape(c.replace(" ± ", "±")) for c in row[:6]))  # "full [src]" is text, not markup
    print_wide(table, 140)  # rows like 'full [efficientnet_lite0.in1k]' need more than 80 columns
    pt = result["paired_test"] or {}
    out.print(escape(pt.get("conclusion") or pt.get("skipped") or ""), highlight=False)
    for s, pts in (result.get("learning_curve") or {}).items():
        cells = ", ".join(f"{f}: {lib.mean_sd(v)}" for f, v in pts.items())
        out.print(escape(f"learning curve {s} (label fraction: test AUC) {cells}"), highlight=False)
