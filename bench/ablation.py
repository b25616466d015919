"""The issue-12 ablation: each element of the recipe added one at a time, kept only when validation says so.

    .venv/bin/python bench/ablation.py --data breast --seeds 0,1,2 --out /tmp/abl
    .venv/bin/python bench/ablation.py --data pneumonia --seeds 0 --out /tmp/abl

Rows, in order (each starts from the best recipe so far):

  scratch            the reference: random init, same epochs rule
  full               the old default: select auc, no averaging, augment light, no TTA
  lp-ft              head fitted on frozen features first, then everything
  select loss        best epoch and early stopping on validation NLL
  average ema        exponential moving average of the weights
  augment <preset>   the modality preset (ultrasound for BreastMNIST, xray for PneumoniaMNIST)
  tta 4              logits averaged over 4 fixed views
  select calibrated-loss  best epoch on the validation NLL after the best single temperature
  ensemble           ``medxfer ensemble`` of every run of this seed above (greedy on validation)
  size 96 / 128      the chosen recipe at a larger input

An element is kept when the mean validation log-loss over the seeds goes down (validation AUC breaks
ties). Test results are read once per row and printed beside it, never used to choose. Every run is a
plain ``medxfer train`` (or ``ensemble``) in a subprocess; finished runs are reused, so the script
can be stopped and started again. Writes OUT/<data>/ablation.csv and ablation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DATA = {"breast": (ROOT / "src/medxfer/datasets/breastmnist_28.npz", "ultrasound",
                   ["--label-names", "malignant,benign", "--positive-label", "malignant"]),
        "pneumonia": (ROOT / "data/pneumoniamnist_28.npz", "xray",
                      ["--label-names", "normal,pneumonia", "--positive-label", "pneumonia"])}
BASE = {"strategy": "full", "select": "auc", "average": "none", "augment": "light", "tta": "1", "image-size": "64"}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(cmd: list[str], out: Path, log: Path) -> float:
    """Run one medxfer command unless ``out`` is finished; returns the CPU seconds it took (0 when reused)."""
    if (out / "metrics.json").is_file():
        return float(json.loads((out / "cpu.json").read_text())["cpu_seconds"]) if (out / "cpu.json").is_file() else 0
    t0 = cpu_seconds()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)
    cpu = cpu_seconds() - t0
    (out / "cpu.json").write_text(json.dumps({"cpu_seconds": cpu}))
    return cpu


def train(data: str, recipe: dict, seed: int, out: Path, log: Path, threads: int) -> tuple[dict, float]:
    path, _, extra = DATA[data]
    cmd = [str(ROOT / ".venv/bin/medxfer"), "train", "--data", str(path), "--seed", str(seed), "--out", str(out),
           "--no-report", "--num-threads", str(threads), "--duplicates", "allow", "-q", *extra]
    for key, value in recipe.items():
        cmd += [f"--{key}", value]
    cpu = run(cmd, out, log)
    return json.loads((out / "metrics.json").read_text()), cpu


def ensemble(members: list[Path], out: Path, log: Path) -> tuple[dict, float]:
    cmd = [str(ROOT / ".venv/bin/medxfer"), "ensemble", *map(str, members), "--out", str(out), "--no-report"]
    cpu = run(cmd, out, log)
    return json.loads((out / "metrics.json").read_text()), cpu


def summary(name: str, recipe: dict, results: list[tuple[int, dict, float]], kept: str) -> dict:
    ms = [m for _, m, _ in results]
    first = ms[0]["test"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"row": name, "kept": kept, "seeds": ",".join(str(s) for s, _, _ in results),
            "val_auc": mean([m["val"]["auc"] for m in ms]), "val_nll": mean([m["val"]["log_loss"] for m in ms]),
            "test_auc": mean([m["test"]["auc"] for m in ms]),
            "test_auc_per_seed": " ".join(f"{m['test']['auc']:.3f}" for m in ms),
            "test_auc_ci_first_seed": f"{first['auc_ci'][0]:.3f}-{first['auc_ci'][1]:.3f}",
            "test_bal_acc": mean([m["test"]["balanced_accuracy"] for m in ms]),
            "test_acc_argmax": mean([m["test"]["argmax"]["accuracy"] for m in ms]),
            "cpu_s": mean([c for _, _, c in results]), "recipe": " ".join(f"--{k} {v}" for k, v in recipe.items())}


def better(a: dict, b: dict) -> bool:
    """Is row ``a`` better than row ``b`` on validation (log-loss, then AUC)?"""
    if abs(a["val_nll"] - b["val_nll"]) > 1e-4:
        return a["val_nll"] < b["val_nll"]
    return a["val_auc"] > b["val_auc"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=sorted(DATA), required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="/tmp/abl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="96,128")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    root = Path(args.out) / args.data
    root.mkdir(parents=True, exist_ok=True)
    log = root / "log.txt"
    rows, runs_of_seed = [], {s: [] for s in seeds}

    def trial(name: str, recipe: dict, keep: bool = True) -> dict:
        results = []
        for s in seeds:
            out = root / name.replace(" ", "_") / f"seed{s}"
            m, cpu = train(args.data, recipe, s, out, log, args.threads)
            results.append((s, m, cpu))
            if keep:
                runs_of_seed[s].append(out)
        return summary(name, recipe, results, "")

    def emit(row: dict) -> None:
        rows.append(row)
        print(f"{row['row']:<18} {row['kept']:<8} val AUC {row['val_auc']:.4f} NLL {row['val_nll']:.4f} | "
              f"test AUC {row['test_auc']:.3f} ({row['test_auc_per_seed']}) bal.acc {row['test_bal_acc']:.3f} "
              f"acc {row['test_acc_argmax']:.3f} | {row['cpu_s']:.0f} CPU s", flush=True)
        df = pd.DataFrame(rows)
        df.to_csv(root / "ablation.csv", index=False)
        (root / "ablation.md").write_text(markdown(df))

    emit({**trial("scratch", {**BASE, "strategy": "scratch"}, keep=False), "kept": "reference"})
    best = trial("full", dict(BASE))
    emit({**best, "kept": "base"})
    preset = DATA[args.data][1]
    for name, change in (("lp-ft", {"strategy": "lp-ft"}), ("select loss", {"select": "loss"}),
                         ("average ema", {"average": "ema"}), (f"augment {preset}", {"augment": preset}),
                         ("tta 4", {"tta": "4"}), ("select calibrated-loss", {"select": "calibrated-loss"})):
        row = trial(name, {**_recipe(best), **change})
        kept = better(row, best)
        emit({**row, "kept": "kept" if kept else "dropped"})
        if kept:
            best = row
    results = []
    for s in seeds:
        m, cpu = ensemble(runs_of_seed[s], root / "ensemble" / f"seed{s}", log)
        results.append((s, m, cpu))
    emit({**summary("ensemble", {"members": f"{len(runs_of_seed[seeds[0]])} runs per seed"}, results, ""),
          "kept": "final"})
    for size in [s for s in args.sizes.split(",") if s]:
        row = trial(f"size {size}", {**_recipe(best), "image-size": size}, keep=False)
        emit({**row, "kept": "better" if better(row, best) else "not better"})
    print(f"best single-model recipe on validation: {best['recipe']}")
    (root / "best.json").write_text(json.dumps(best, indent=1))


def markdown(df: pd.DataFrame) -> str:
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _recipe(row: dict) -> dict:
    parts = row["recipe"].split()
    return {parts[i][2:]: parts[i + 1] for i in range(0, len(parts), 2)}


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
