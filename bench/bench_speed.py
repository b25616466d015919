"""Benchmark: medxfer vs the plain timm + PyTorch peer (bench/peer.py) on PneumoniaMNIST, CPU.

Usage::

    .venv/bin/python bench/bench_speed.py                 # the full comparison (~15 min on 2 cores)
    .venv/bin/python bench/bench_speed.py --quick         # a smoke run on a small subset (~2-3 min)
    .venv/bin/python bench/bench_speed.py --repeats 3     # medians of 3 alternating runs

Same data (``data/pneumoniamnist_28.npz``), source (EfficientNet-Lite0, ImageNet), image size
(64 px), batch size (64) and seed for both tools. Every run is its own subprocess (a clean
interpreter), started through a tiny wrapper that reports the child's own peak RSS
(``getrusage(RUSAGE_CHILDREN)`` inside the wrapper covers that one child only); wall time is measured
around the subprocess, so it includes Python start-up and imports for both tools. medxfer and peer
runs alternate (m, p, then p, m, ...) so drift in machine load hits both.

Comparisons:

1. ``linear-probe``: medxfer ``train --strategy linear-probe`` (default head: scikit-learn logistic
   regression, C chosen on validation) and ``--head linear --epochs 20`` (a 20-epoch AdamW head,
   like-for-like with the peer) vs ``peer.py --mode frozen --epochs 20``. Each medxfer run gets an
   empty feature cache (a fresh ``--cache-dir``), so features are extracted once per run, never read
   from an earlier one. Targets: wall time >= 10x shorter, test AUC >= the peer's.
2. ``full``: medxfer ``train --strategy full --epochs 3 --augment none --weight-decay 0.01 --lr 0.001``
   (head lr 1e-3, backbone 1e-4 = the peer's, not medxfer's default head 1e-2; medxfer keeps its 1-epoch warm-up + cosine schedule and picks the
   best validation epoch) vs ``peer.py --mode full --epochs 3``: training images/s, peak RSS (target
   <= peer + 20%), test AUC (within 0.01).
3. ``predict``: ``Predictor(engine="onnx")`` vs ``engine="torch"`` on the 624 test images at batch 64,
   the test set passed several times after one warm-up pass; target onnx >= 1.5x images/s.

Prints a markdown table and ONE JSON line (last line of stdout); writes the JSON to
``bench/results/<date>-speed[-quick][-<parts>].json`` (parts only when ``--only`` picks some).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "pneumoniamnist_28.npz"


def _shown(path) -> str:
    """A path as results record it: relative to the repository when inside it (no machine's absolute paths)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else p.name
PEER = ROOT / "bench" / "peer.py"
SOURCE = "efficientnet_lite0.in1k"

# runs one command; prints the child's peak RSS (KiB) as the last stderr line
WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[1:])\n"
    "print('BENCH_MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def run_child(cmd: list[str], log) -> dict:
    """Run ``cmd`` in a clean subprocess: wall seconds, peak RSS (MB), last JSON line of stdout."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    rss = None
    for line in proc.stderr.splitlines()[::-1]:
        if line.startswith("BENCH_MAXRSS_KB"):
            rss = int(line.split()[1]) / 1024
            break
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        raise SystemExit(f"bench: command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    parsed = None
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            try:
                parsed = json.loads(line)
                break
            except ValueError:
                pass
    log(f"  {wall:7.1f} s  {rss or 0:7.0f} MB  {' '.join(Path(c).name if i < 2 else c for i, c in enumerate(cmd))}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(rss, 1) if rss else None, "json": parsed}


def medxfer_train(data: Path, out: Path, cache: Path, extra: list[str], log) -> dict:
    cmd = [sys.executable, "-m", "medxfer", "train", "--data", str(data), "--source", SOURCE, "--image-size", "64",
           "--seed", "0", "--batch-size", "64", "--cache-dir", str(cache / "decode"), "--out", str(out),
           # the peer trains on the same images (MedMNIST has a few exact duplicates across splits) and
           # writes no report: the comparison is the training job itself
           "--duplicates", "allow", "--no-report", "--tta", "1", *extra]  # the peer evaluates one view
    r = run_child(cmd, log)
    m = json.loads((out / "metrics.json").read_text())
    r.update({"tool": "medxfer", "test_auc": m["test"]["auc"], "balanced_accuracy": m["test"].get("balanced_accuracy"),
              "train_images_per_s": m.get("train_images_per_s") or None, "train_seconds": m.get("train_seconds"),
              "feature_seconds": m.get("feature_seconds"), "own_seconds": m.get("total_seconds"),
              "epochs_run": m.get("epochs_run")})
    r.pop("json")
    return r


def peer_train(data: Path, mode: str, epochs: int, limit: int | None, log) -> dict:
    cmd = [sys.executable, str(PEER), "--data", str(data), "--mode", mode, "--epochs", str(epochs), "--seed", "0",
           "--image-size", "64", "--batch-size", "64"] + (["--limit", str(limit)] if limit else [])
    r = run_child(cmd, log)
    j = r.pop("json") or {}
    r.update({"tool": "peer", "test_auc": j.get("test_auc"), "balanced_accuracy": j.get("balanced_accuracy"),
              "train_images_per_s": j.get("train_images_per_s"), "train_seconds": j.get("train_seconds"),
              "own_seconds": j.get("seconds"), "torch_threads": j.get("torch_threads")})
    return r


def predict_child(run_dir: str, engine: str, passes: int, data: str) -> None:
    """In a child process: images/s of Predictor.probabilities over the test set, batch 64."""
    import numpy as np
    import torch

    from medxfer.data.loading import arrays_to_uint8
    from medxfer.data.readers import ReadOptions
    from medxfer.predict import Predictor

    p = Predictor(run_dir, engine=engine, batch_size=64)
    x = arrays_to_uint8(np.load(data)["test_images"], p.meta.image_size, ReadOptions(**p.meta.read))
    p.probabilities(x)  # warm-up (onnxruntime allocations, torch first-call costs)
    t0 = time.perf_counter()
    for _ in range(passes):
        probs = p.probabilities(x)
    sec = time.perf_counter() - t0
    print(json.dumps({"engine": engine, "images": len(x) * passes, "seconds": round(sec, 3),
                      "images_per_s": round(len(x) * passes / sec, 1), "torch_threads": torch.get_num_threads(),
                      "checksum": float(probs[:, 1].sum())}))


def median(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(vals), 4) if vals else None


def subset(src: Path, out: Path, n: tuple[int, int, int]) -> Path:
    import numpy as np

    z = np.load(src)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = z[f"{split}_images"][:k], z[f"{split}_labels"][:k]
    np.savez(out, **arrays)
    return out


def machine() -> dict:
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"nproc": os.cpu_count(), "cpu": model, "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "load_avg_1min_at_start": load}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs per comparison; medians when > 1")
    ap.add_argument("--quick", action="store_true", help="small subset and fewer epochs: checks the script works")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--only", default="linear-probe,full,predict", help="comma-separated parts to run")
    ap.add_argument("--passes", type=int, default=5, help="predict: passes over the test set")
    ap.add_argument("--run-dir", default=None, help="predict: time this existing run (default: the full run made here)")
    ap.add_argument("--child-predict", nargs=3, metavar=("RUN_DIR", "ENGINE", "DATA"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_predict:
        predict_child(args.child_predict[0], args.child_predict[1], args.passes, args.child_predict[2])
        return {}

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    parts = set(args.only.split(","))
    lp_epochs, full_epochs = (2, 1) if args.quick else (20, 3)
    if args.quick:
        args.passes = min(args.passes, 2)
    work = Path(tempfile.mkdtemp(prefix="medxfer-bench-"))
    data = Path(args.data)
    if args.quick:
        data = subset(data, work / "quick.npz", (512, 128, 128))
    result = {"bench": "speed", "date": dt.date.today().isoformat(), "quick": args.quick, "data": _shown(args.data),
              "image_size": 64, "source": SOURCE, "repeats": args.repeats, "machine": machine(), "results": {}}
    log(f"bench_speed: {result['machine']}; work dir {work}")

    def alternate(name: str, runs: dict) -> dict:
        """runs: label -> callable(i) -> record; alternate their order per repeat."""
        out = {k: [] for k in runs}
        labels = list(runs)
        for i in range(args.repeats):
            for k in (labels if i % 2 == 0 else labels[::-1]):
                log(f"[{name}] {k} (repeat {i + 1}/{args.repeats})")
                out[k].append(runs[k](i))
        return out

    if "linear-probe" in parts:
        lp = alternate("linear-probe", {
            "medxfer_logistic": lambda i: medxfer_train(data, work / f"lp_log_{i}", work / f"cache_lp_log_{i}",
                                                        ["--strategy", "linear-probe"], log),
            "medxfer_linear": lambda i: medxfer_train(data, work / f"lp_lin_{i}", work / f"cache_lp_lin_{i}",
                                                      ["--strategy", "linear-probe", "--head", "linear",
                                                       "--epochs", str(lp_epochs)], log),
            "peer_frozen": lambda i: peer_train(data, "frozen", lp_epochs, None, log),
        })
        result["results"]["linear-probe"] = summarize(lp, "peer_frozen", f"{lp_epochs} epochs")
    full_runs = None
    if "full" in parts:
        full_runs = alternate("full", {
            "medxfer_full": lambda i: medxfer_train(data, work / f"full_{i}", work / f"cache_full_{i}",
                                                    ["--strategy", "full", "--epochs", str(full_epochs),
                                                     "--augment", "none", "--weight-decay", "0.01",
                                                     "--lr", "0.001"], log),
            "peer_full": lambda i: peer_train(data, "full", full_epochs, None, log),
        })
        result["results"]["full"] = summarize(full_runs, "peer_full", f"{full_epochs} epochs")
    if "predict" in parts:
        run_dir = Path(args.run_dir) if args.run_dir else work / "full_0" if full_runs else work / "pred_run"
        if not full_runs and not args.run_dir:
            medxfer_train(data, run_dir, work / "cache_pred", ["--strategy", "linear-probe"], log)
        exp = run_child([sys.executable, "-m", "medxfer", "export", str(run_dir), "--format", "onnx"], log)
        pr = alternate("predict", {
            eng: (lambda i, eng=eng: {**run_child([sys.executable, str(Path(__file__).resolve()), "--passes",
                                                   str(args.passes), "--child-predict", str(run_dir), eng,
                                                   str(data)], log)})
            for eng in ("torch", "onnx")})
        rows = {eng: [{**r["json"], "peak_rss_mb": r["peak_rss_mb"]} for r in rs] for eng, rs in pr.items()}
        ips = {eng: median(rs, "images_per_s") for eng, rs in rows.items()}
        result["results"]["predict"] = {
            "runs": rows, "export_wall_s": exp["wall_s"], "batch_size": 64, "passes": args.passes,
            "test_images": rows["torch"][0]["images"] // args.passes, "run_dir": Path(run_dir).name,
            "images_per_s": ips, "onnx_speedup": round(ips["onnx"] / ips["torch"], 2) if ips["torch"] else None,
            "same_probabilities": abs(rows["onnx"][0]["checksum"] - rows["torch"][0]["checksum"]) < 1e-3,
        }
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    only = "" if parts == {"linear-probe", "full", "predict"} else "-" + "-".join(sorted(parts))
    out_file = out_dir / f"{result['date']}-speed{'-quick' if args.quick else ''}{only}.json"
    out_file.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nwritten to {out_file.relative_to(ROOT)}")
    print(json.dumps(result))
    return result


def summarize(runs: dict, peer_key: str, what: str) -> dict:
    out = {"what": what, "runs": runs, "median": {}}
    for k, rows in runs.items():
        out["median"][k] = {key: median(rows, key) for key in ("wall_s", "own_seconds", "train_seconds", "feature_seconds",
                                                               "train_images_per_s", "peak_rss_mb", "test_auc")}
    peer = out["median"][peer_key]
    for k, m in out["median"].items():
        if k == peer_key:
            continue
        m["wall_ratio_peer_over_medxfer"] = round(peer["wall_s"] / m["wall_s"], 2) if m["wall_s"] else None
        m["auc_minus_peer"] = round(m["test_auc"] - peer["test_auc"], 4) if None not in (m["test_auc"], peer["test_auc"]) else None
        if m.get("train_images_per_s") and peer.get("train_images_per_s"):
            m["images_per_s_ratio"] = round(m["train_images_per_s"] / peer["train_images_per_s"], 2)
        if m.get("peak_rss_mb") and peer.get("peak_rss_mb"):
            m["rss_ratio"] = round(m["peak_rss_mb"] / peer["peak_rss_mb"], 2)
    return out


def markdown(result: dict) -> str:
    mc = result["machine"]
    lines = [f"### bench_speed {result['date']}{' (quick)' if result['quick'] else ''}: PneumoniaMNIST, "
             f"{result['source']}, 64 px, {mc['nproc']} CPUs ({mc['cpu']}), torch {mc['torch']}, "
             f"repeats {result['repeats']} (medians)", "",
             "| comparison | run | wall s | train img/s | peak RSS MB | test AUC | vs peer |",
             "|---|---|---|---|---|---|---|"]

    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    for name in ("linear-probe", "full"):
        part = result["results"].get(name)
        if not part:
            continue
        for k, m in part["median"].items():
            vs = []
            if "wall_ratio_peer_over_medxfer" in m:
                vs.append(f"{m['wall_ratio_peer_over_medxfer']}x shorter wall")
            if m.get("images_per_s_ratio"):
                vs.append(f"{m['images_per_s_ratio']}x img/s")
            if m.get("rss_ratio"):
                vs.append(f"RSS x{m['rss_ratio']}")
            if m.get("auc_minus_peer") is not None:
                vs.append(f"AUC {m['auc_minus_peer']:+.4f}")
            lines.append(f"| {name} ({part['what']}) | {k} | {f(m['wall_s'])} | {f(m['train_images_per_s'])} | "
                         f"{f(m['peak_rss_mb'], '{:.0f}')} | {f(m['test_auc'], '{:.4f}')} | {'; '.join(vs) or '-'} |")
    pr = result["results"].get("predict")
    if pr:
        for eng in ("torch", "onnx"):
            rss = median(pr["runs"][eng], "peak_rss_mb")
            vs = f"{pr['onnx_speedup']}x torch" if eng == "onnx" else "-"
            lines.append(f"| predict (batch 64, {pr['passes']} x {pr['test_images']} test images) | {eng} | - | "
                         f"{f(pr['images_per_s'][eng])} (inference) | {f(rss, '{:.0f}')} | - | {vs} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
