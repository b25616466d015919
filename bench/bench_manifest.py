"""Large manifests: reading, the existence check, the splits and duplicate grouping at 100k-1M rows.

    .venv/bin/python bench/bench_manifest.py --n 100000
    .venv/bin/python bench/bench_manifest.py            # 1,000,000 rows
    .venv/bin/python bench/bench_manifest.py --n 100000 --save-split /tmp/split_after.npy

Generates (once, cached under --work, default /tmp/medxfer_bench_manifest/<n>) 1000 tiny PNG files and one
hard link per row to them, spread over 1000 folders (every row names its own file, as medxfer requires; the
links cost directory entries, not disk), and manifests of N rows as CSV and Parquet: path, label (2 classes,
30% positive, per patient), patient_id (~3 images per patient), and a multi-label CSV with 14 label columns.
Each stage runs in this process, one after the other; for each, wall seconds and the peak growth of private
memory (RssAnon, sampled every 5 ms by a thread) over what the process held before the stage. The last line
of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from medxfer.data import duplicates, sources  # noqa: E402
from medxfer.data.splits import assign_splits  # noqa: E402

N_FILES = 1000
N_DIRS = 1000
N_LABELS = 14


def rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Peak:
    """Wall time and peak RssAnon growth of a block."""

    def __enter__(self):
        gc.collect()
        self.base = rss_anon_mb()
        self.peak = self.base
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _watch(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, rss_anon_mb())

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, rss_anon_mb())
        self.mb = self.peak - self.base


def generate(n: int, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    done = work / "done"
    out = {"csv": work / "manifest.csv", "parquet": work / "manifest.parquet", "multilabel": work / "multilabel.csv"}
    if done.exists():
        return out
    from PIL import Image

    src = work / "src"
    src.mkdir(exist_ok=True)
    for i in range(N_FILES):
        Image.fromarray(np.full((8, 8), i % 256, np.uint8)).save(src / f"{i}.png")
    rng = np.random.default_rng(0)
    rel = []
    for d in range(N_DIRS):
        (work / "img" / f"{d:04d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        r = f"img/{i % N_DIRS:04d}/{i:07d}.png"
        dst = work / r
        if not dst.exists():
            os.link(src / f"{i % N_FILES}.png", dst)
        rel.append(r)
    patient = np.sort(rng.integers(0, max(3, n // 3), n))  # ~3 images per patient, rows of a patient together
    pos = rng.random(patient.max() + 1) < 0.3
    df = pd.DataFrame({"path": rel, "label": pos[patient].astype(int), "patient_id": [f"PAT{p:07d}" for p in patient]})
    df.to_csv(out["csv"], index=False)
    df.to_parquet(out["parquet"], index=False)
    rates = np.linspace(0.01, 0.3, N_LABELS)
    ml = rng.random((patient.max() + 1, N_LABELS)) < rates
    multi = pd.DataFrame(ml[patient].astype(np.int8), columns=[f"f{k}" for k in range(N_LABELS)])
    multi.insert(0, "patient_id", df["patient_id"])
    multi.insert(0, "path", rel)
    multi.to_csv(out["multilabel"], index=False)
    done.touch()
    return out


def existence(csv: Path) -> int:
    """The existence check alone: every listed file resolved and checked, as load_manifest does it."""
    rel = pd.read_csv(csv, usecols=["path"])["path"].astype(str).tolist()
    if hasattr(sources, "resolve_files"):
        files, absent = sources.resolve_files(csv.parent, rel)
        return int(len(absent))
    listed = [csv.parent / p for p in rel]  # the code before this benchmark's changes
    files = [Path(os.path.realpath(f)) for f in listed]
    return sum(not f.exists() for f in files)


def plant_hashes(manifest, n_groups: int, seed: int = 0) -> list[str]:
    """One distinct hash per row, then ``n_groups`` pairs made identical across splits."""
    hashes = [f"{i:032x}" for i in range(len(manifest.table))]
    split = manifest.table["split"].to_numpy()
    rng = np.random.default_rng(seed)
    train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    for a, b in zip(rng.choice(train, n_groups, replace=False), rng.choice(test, n_groups, replace=False)):
        hashes[b] = hashes[a]
    return hashes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--save-split", type=Path, default=None, help="write the binary split (npy) to compare runs")
    ap.add_argument("--skip", default="", help="comma-separated stages to leave out")
    args = ap.parse_args()
    work = args.work or Path(f"/tmp/medxfer_bench_manifest/{args.n}")
    skip = set(filter(None, args.skip.split(",")))
    t0 = time.perf_counter()
    paths = generate(args.n, work)
    results = {"n": args.n, "generate_s": round(time.perf_counter() - t0, 1), "stages": {}}

    def stage(name, fn):
        if name in skip:
            return None
        with Peak() as p:
            value = fn()
        results["stages"][name] = {"s": round(p.seconds, 2), "rss_anon_mb": round(p.mb, 1)}
        print(f"{name:28s} {p.seconds:8.2f} s  {p.mb:8.1f} MB", flush=True)
        return value

    m = stage("load_manifest csv", lambda: sources.load_manifest(paths["csv"]))
    stage("load_manifest parquet", lambda: sources.load_manifest(paths["parquet"]))
    stage("existence check", lambda: existence(paths["csv"]))
    split = stage("assign_splits (patients)", lambda: assign_splits(m, seed=0))
    if split is not None and args.save_split:
        np.save(args.save_split, split.table["split"].to_numpy().astype(str))
    cols = [f"f{k}" for k in range(N_LABELS)]
    ml = stage("load_manifest multi-label", lambda: sources.load_manifest(paths["multilabel"], label_columns=cols))
    if ml is not None:
        mls = stage("multi-label split (patients)", lambda: assign_splits(ml, seed=0))
        if mls is not None and args.save_split:
            np.save(args.save_split.with_name(args.save_split.stem + "_multilabel.npy"),
                    mls.table["split"].to_numpy().astype(str))
    if split is not None:
        hashes = plant_hashes(split, n_groups=1000)
        dummy = np.zeros((len(hashes), 1), np.uint8)
        original = duplicates.pixel_hashes
        duplicates.pixel_hashes = lambda images: hashes  # measure the grouping, not the hashing of pixels
        try:
            keep_table = stage("duplicates (grouping)", lambda: duplicates.handle_duplicates(split, dummy))
        finally:
            duplicates.pixel_hashes = original
        if keep_table is not None:
            results["duplicates_dropped"] = int((~keep_table[0]).sum())
    results["peak_rss_anon_mb"] = round(rss_anon_mb(), 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
