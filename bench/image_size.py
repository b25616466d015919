"""Which input size should ``medxfer train`` choose when the user gives none? Runs the default recipe at
several sizes on every data set at hand and reports validation (used to choose) beside test (read once).

    .venv/bin/python bench/image_size.py --data breast,pneumonia,cxr14,large --seeds 0 --out /tmp/size

Data sets: the bundled BreastMNIST and PneumoniaMNIST (28 px), the ChestX-ray14 sample (64 px,
multi-label, patient-grouped split made by medxfer), and ``large``: generated 256 px grey PNGs in class
folders whose classes differ by a small bright spot (a fine detail: what a too-small input loses).
Every run is a plain ``medxfer train`` in a subprocess with only ``--image-size`` (and the data's
labels) given, so the rest of the recipe is the default; finished runs are reused. CPU seconds are the
child's user + system time (comparable on a shared machine; wall time is not). Writes
OUT/image_size.csv and image_size.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import markdown, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = {"breast": (ROOT / "src/medxfer/datasets/breastmnist_28.npz", 28,
                   ["--label-names", "malignant,benign", "--positive-label", "malignant"]),
        "pneumonia": (ROOT / "data/pneumoniamnist_28.npz", 28,
                      ["--label-names", "normal,pneumonia", "--positive-label", "pneumonia"]),
        "cxr14": (ROOT / "data/cxr14_nih1000_64.npz", 64, []),
        "large": (None, 256, ["--positive-label", "spot"])}
SIZES = {"breast": "32,64,96", "pneumonia": "32,64,96", "cxr14": "64,96,128", "large": "64,128,224"}


def make_large(folder: Path, n: int = 500, side: int = 256, seed: int = 0) -> Path:
    """``folder/{spot,plain}/i.png``: smooth noise; the 'spot' class has a faint disc of radius side/40."""
    from PIL import Image

    if (folder / "done").exists():
        return folder
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    for i in range(n):
        cls = "spot" if i % 2 else "plain"
        base = rng.normal(0, 1, (side // 8, side // 8))
        img = np.kron(base, np.ones((8, 8))) * 18 + 110 + rng.normal(0, 6, (side, side))
        if cls == "spot":
            cy, cx = rng.integers(side // 6, side - side // 6, 2)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < (side / 40) ** 2] += 40
        (folder / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / cls / f"{i}.png")
    (folder / "done").write_text("")
    return folder


def one(data: str, size: int, seed: int, root: Path, threads: int) -> dict:
    path, native, extra = DATA[data]
    if path is None:
        path = make_large(root / "large_data")
    out = root / data / f"size{size}" / f"seed{seed}"
    cmd = [str(ROOT / ".venv/bin/medxfer"), "train", "--data", str(path), "--seed", str(seed), "--out", str(out),
           "--image-size", str(size), "--no-report", "--num-threads", str(threads), "-q", *extra]
    cpu = run(cmd, out, root / "log.txt")
    m = json.loads((out / "metrics.json").read_text())
    return {"data": data, "native": native, "size": size, "seed": seed, "val_auc": m["val"]["auc"],
            "val_nll": m["val"]["log_loss"], "test_auc": m["test"]["auc"], "epochs_run": m.get("epochs_run"),
            "cpu_s": round(cpu, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="breast,pneumonia,cxr14,large")
    ap.add_argument("--sizes", default="", help="data:SIZES;... to override, e.g. 'breast:64,96'")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/size")
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    sizes = dict(SIZES)
    for part in filter(None, args.sizes.split(";")):
        k, v = part.split(":")
        sizes[k] = v
    rows = []
    for data in args.data.split(","):
        for size in (int(s) for s in sizes[data].split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                rows.append(one(data, size, seed, root, args.threads))
                r = rows[-1]
                print(f"{data:<10} {size:>4} px seed {seed}: val AUC {r['val_auc']:.4f} NLL {r['val_nll']:.4f} | "
                      f"test AUC {r['test_auc']:.4f} | {r['epochs_run']} epochs, {r['cpu_s']:.0f} CPU s", flush=True)
                df = pd.DataFrame(rows)
                df.to_csv(root / "image_size.csv", index=False)
    mean = df.groupby(["data", "native", "size"], as_index=False)[["val_auc", "val_nll", "test_auc", "cpu_s"]].mean()
    (root / "image_size.md").write_text(markdown(mean))
    print(markdown(mean))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
