"""``medxfer demo``: transfer learning on bundled BreastMNIST, linear-probe vs full fine-tuning vs scratch.

The demo itself is :func:`medxfer.demo.run_demo` (it trains and prints the table); until that module is
installed, :func:`demo_here` runs the three strategies as earlier releases did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medxfer.commands.base import Given, command, option_fields, out, print_wide
from medxfer.errors import MedxferError

DEMO_DATA = Path(__file__).resolve().parents[1] / "datasets" / "breastmnist_28.npz"


def register(app: typer.Typer) -> None:
    @command(app, "demo", option_fields(("runtime",), only=("num_threads",)))
    def demo(given: Given,
             out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the demo's runs."),
             seeds: Optional[str] = typer.Option(None, "--seeds", "--seed", help="Training seeds, comma-separated "
                                                 "(e.g. 0,1,2); the split is BreastMNIST's own.",
                                                 show_default="the demo's")):
        """Transfer learning on bundled BreastMNIST: linear-probe vs full fine-tuning vs scratch (test AUC with CIs)."""
        seed_list = parse_seeds(seeds) if seeds is not None else None
        try:
            from medxfer.demo import run_demo
        except ModuleNotFoundError as e:
            if e.name != "medxfer.demo":
                raise
            run_demo = demo_here
        run_demo(out_dir, seed_list, given.values["num_threads"])


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; anything else is one line saying what to give."""
    parts = [p.strip() for p in str(text).split(",")]
    if not all(p.isdigit() for p in parts):
        raise MedxferError(f"The 'seeds' parameter must be comma-separated whole numbers of 0 or more (e.g. 0,1,2). "
                           f"Got {text!r} instead.")
    return [int(p) for p in parts]


def demo_here(out_dir: Path, seeds: list[int] | None = None, num_threads: int | None = None, *,
              epochs: int | None = None, image_size: int = 64) -> None:
    """The demo as earlier releases ran it: three strategies per seed, then one table (runs in
    OUT/<strategy>, or OUT/seed_<k>/<strategy> for several seeds)."""
    from rich.table import Table

    from medxfer.config import TrainConfig
    from medxfer.pipeline import train

    seeds = seeds or [0]
    out.print("BreastMNIST (breast ultrasound: malignant vs normal/benign; MedMNIST v2, CC BY 4.0), source "
              f"efficientnet_lite0.in1k (ImageNet), {image_size} px, seed {','.join(map(str, seeds))}", highlight=False)
    rows = []
    for seed in seeds:
        where = Path(out_dir) if len(seeds) == 1 else Path(out_dir) / f"seed_{seed}"
        for strategy, n in (("linear-probe", None), ("full", epochs), ("scratch", epochs)):
            cfg = TrainConfig.create(data=str(DEMO_DATA), strategy=strategy, image_size=image_size, epochs=n,
                                     seed=seed, label_names=("malignant", "benign"), positive_label="malignant",
                                     overwrite=True, out=str(where / strategy), num_threads=num_threads)
            rows.append((strategy, seed, train(cfg).metrics))
    table = Table(title="Does transfer help? BreastMNIST test split (positive class: malignant)")
    for col in ("strategy", "seed", "AUC (95% CI)", "bal. acc", "sensitivity", "specificity", "train s"):
        table.add_column(col)
    for strategy, seed, m in rows:
        t = m["test"]
        ci = f" ({t['auc_ci'][0]:.3f}-{t['auc_ci'][1]:.3f})" if t.get("auc_ci") else ""
        table.add_row(strategy, str(seed), f"{t['auc']:.3f}{ci}", f"{t['balanced_accuracy']:.3f}",
                      f"{t['sensitivity']:.3f}", f"{t['specificity']:.3f}", f"{m['train_seconds']:.0f}")
    print_wide(table, 110)  # CIs stay whole in logs and pipes
    where = "<strategy>" if len(seeds) == 1 else "seed_<k>/<strategy>"
    out.print(f"Threshold chosen on validation (Youden). Runs in {out_dir}/{where}.", markup=False, highlight=False)
