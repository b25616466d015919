"""``medxfer demo``: does transfer help when labels are few? Linear probe, full fine-tuning and scratch on 10% of
bundled BreastMNIST's labels, three seeds, the paired test and one sentence (:mod:`medxfer.demo`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medxfer.commands.base import Given, command, option_fields, out, print_wide
from medxfer.errors import MedxferError


def register(app: typer.Typer) -> None:
    @command(app, "demo", option_fields(("runtime",), only=("num_threads",)))
    def demo(given: Given,
             out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the demo's runs."),
             seeds: Optional[str] = typer.Option(None, "--seeds", "--seed", help="Training seeds, comma-separated "
                                                 "(e.g. 0,1,2); each also draws its own subset of the train labels; "
                                                 "the split is BreastMNIST's own.", show_default="0,1,2"),
             fraction: float = typer.Option(0.1, "--label-fraction", help="Fraction of BreastMNIST's 546 train "
                                            "labels to train on (1: all of them; about 5x longer).")):
        """Does transfer help when labels are few? Linear probe, full fine-tuning and scratch on bundled BreastMNIST,
        three seeds: test AUC with CIs, the paired test, and one sentence of what the numbers say."""
        from medxfer.demo import run_demo, table

        def echo(text: str) -> None:
            out.print(text, markup=False, highlight=False)

        summary = run_demo(out_dir, parse_seeds(seeds) if seeds is not None else None,
                           given.values["num_threads"], fraction=fraction, echo=echo)
        print_wide(table(summary), 120)  # CIs stay whole in logs and pipes
        echo(summary["sentence"])
        echo(f"The transfer arm tested against scratch (*) was chosen on validation. Runs in {out_dir}/<arm>/seed<k>, "
             f"the summary in {out_dir}/demo.json; {summary['seconds']:.0f} s.")


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; anything else is one line saying what to give."""
    parts = [p.strip() for p in str(text).split(",")]
    if not all(p.isdigit() for p in parts):
        raise MedxferError(f"The 'seeds' parameter must be comma-separated whole numbers of 0 or more (e.g. 0,1,2). "
                           f"Got {text!r} instead.")
    return [int(p) for p in parts]
