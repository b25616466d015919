"""Benchmark: decoding image files into the decoded store, from a thousand images up.

Usage::

    PYTHONPATH=src .venv/bin/python bench/bench_scale.py                 # N = 1k and 10k at 64 px (~3-5 min on 2 cores)
    PYTHONPATH=src .venv/bin/python bench/bench_scale.py --with-224      # also at 224 px
    PYTHONPATH=src .venv/bin/python bench/bench_scale.py --with-100k     # also N = 100k (needs ~16 GB of disk at
                                                                         # 256 px sources, ~30 GB with --with-224)

Generates its data once under ``--dir`` (default ``$TMPDIR/medxfer-scale``): ``--side`` x ``--side`` (256; 512
as in the issue with ``--side 512``, about 4x the disk and the generation time) 16-bit grey PNGs in two
class folders, class ``b`` with a brighter disc (a learnable signal), smooth background plus noise. For each N
and image size, each measurement runs in a fresh child process (so its peak memory is its own):

- first decode with 1 and with 2 workers (a new cache folder each): images/s of ``load_images`` (hashing,
  decoding, resizing, writing the store and the per-file cache), and the store's disk use;
- a warm run (the store of the 2-worker decode): the time to have the images (hash the files, map the store),
  then one pass over every image in batches of 256 (as an epoch reads them);
- CPU seconds of the decode (the process and its workers, from ``os.times``): on a machine shared with other
  work, images per CPU second say whether the workers waste anything, where the wall-clock ratio cannot;
- peak RssAnon of the process (its private memory, sampled every 20 ms from /proc/self/status; the page cache
  of the mapped store is not in it), and the peak Pss_Anon of a decoding worker (/proc/PID/smaps_rollup: its
  own anonymous memory, pages still shared copy-on-write with the parent counted by share).

Results: a table on stdout and JSON in ``--out``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def generate(root: Path, n: int, side: int) -> None:
    """n 16-bit PNGs in root/a and root/b (half each), made once (a 'done' file marks a finished set)."""
    if (root / "done").exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    chunks = [(root, side, list(range(i, min(n, i + 200)))) for i in range(0, n, 200)]
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_write_chunk, chunks))
    (root / "done").write_text(str(n))


def _write_chunk(job) -> None:
    from PIL import Image

    root, side, idx = job
    yy, xx = np.mgrid[:side, :side] / side
    for i in idx:
        rng = np.random.default_rng(i)
        cls = i % 2
        base = 20000 + 8000 * np.sin(6 * xx + rng.uniform(0, 6)) * np.cos(4 * yy + rng.uniform(0, 6))
        cx, cy, r = rng.uniform(0.3, 0.7, 2).tolist() + [rng.uniform(0.08, 0.15)]
        base += (12000 if cls else 3000) * (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r)
        img = np.clip(base + rng.normal(0, 1500, base.shape), 0, 65535).astype(np.uint16)
        Image.fromarray(img).save(root / "ab"[cls] / f"{i:07d}.png", compress_level=1)


# -- child: one measurement in its own process ------------------------------------------------------------------
def _rss_anon(pid: int | str = "self") -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _pss_anon(pid: int) -> int:
    """A worker's share of anonymous memory (pages shared copy-on-write with its parent count by share)."""
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss_Anon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children() -> list[int]:
    out = []
    for task in os.listdir("/proc/self/task"):
        try:
            out += [int(p) for p in open(f"/proc/self/task/{task}/children").read().split()]
        except OSError:
            pass
    return out


class Peak(threading.Thread):
    """Samples this process's RssAnon and its children's (the decoding workers) Pss_Anon every 20 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.self_peak = self.worker_peak = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.self_peak = max(self.self_peak, _rss_anon())
            for pid in _children():
                self.worker_peak = max(self.worker_peak, _pss_anon(pid))
            time.sleep(0.02)


def child(args) -> dict:
    import torch

    from medxfer.data.cache import DecodeCache
    from medxfer.data.loading import load_images
    from medxfer.data.sources import load_manifest

    torch.set_num_threads(1)
    peak = Peak()
    peak.start()
    base = _rss_anon()
    t0 = time.perf_counter()
    manifest = load_manifest(args.data)
    t1 = time.perf_counter()
    c1 = os.times()
    kw = {"workers": args.workers} if "workers" in inspect.signature(load_images).parameters else {}  # --before
    loaded = load_images(manifest, args.size, cache=DecodeCache(args.cache), **kw)
    t2 = time.perf_counter()
    c2 = os.times()
    cpu = sum(getattr(c2, k) - getattr(c1, k) for k in ("user", "system", "children_user", "children_system"))
    total = 0
    for start in range(0, len(loaded.images), 256):        # one pass over every image, as an epoch reads them
        total += int(loaded.images[start:start + 256].float().sum())
    t3 = time.perf_counter()
    time.sleep(0.05)
    peak.stop.set()
    peak.join()
    held = _rss_anon()     # what the process keeps once the images are loaded and read
    stores = Path(args.cache) / "stores"
    store = sum(p.stat().st_size for p in stores.glob("*.npy")) if stores.is_dir() else 0
    per_file = sum(p.stat().st_size for p in Path(args.cache).glob("??/*.npy"))
    n = len(loaded.images)
    return {"n": n, "manifest_s": t1 - t0, "load_s": t2 - t1, "images_per_s": n / (t2 - t1),
            "cpu_s": cpu, "images_per_cpu_s": n / max(cpu, 1e-9), "epoch_s": t3 - t2,
            "rss_anon_start": base, "rss_anon_held": held, "rss_anon_peak": peak.self_peak,
            "worker_pss_anon_peak": peak.worker_peak,
            "store_bytes": store, "per_file_cache_bytes": per_file, "hits": loaded.cache_hits}


def run_child(data: Path, cache: Path, size: int, workers: int, src: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--data", str(data), "--cache", str(cache), "--size", str(size),
           "--workers", str(workers)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": src or str(Path(__file__).resolve().parents[1] / "src")})
    return json.loads(out.stdout.strip().splitlines()[-1])


def mb(b: float) -> str:
    return f"{b / 2 ** 20:.0f} MB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data"), p.add_argument("--cache")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--n", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--with-224", action="store_true", help="also at 224 px")
    p.add_argument("--with-100k", action="store_true", help="also N = 100k (disk: see the docstring)")
    p.add_argument("--side", type=int, default=256, help="side of the generated PNGs")
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "medxfer-scale"))
    p.add_argument("--out", default="bench/results/scale.json")
    p.add_argument("--before", metavar="SRC", help="also a first decode (1 worker) with the medxfer in SRC (e.g. an "
                   "earlier release's src/, from git archive), for the memory before the store")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    sizes = [64] + ([224] if args.with_224 else [])
    ns = sorted(set(args.n + ([100_000] if args.with_100k else [])))
    root = Path(args.dir)
    rows = []
    for n in ns:
        data = root / f"png{args.side}-{n}"
        t = time.perf_counter()
        generate(data, n, args.side)
        gen = time.perf_counter() - t
        src = sum(f.stat().st_size for f in data.rglob("*.png"))
        for size in sizes:
            caches = {w: root / f"cache-{n}-{size}-w{w}" for w in (1, 2)}
            for c in caches.values():
                shutil.rmtree(c, ignore_errors=True)
            first = {w: run_child(data, caches[w], size, w) for w in (1, 2)}
            warm = run_child(data, caches[2], size, 2)
            before = None
            if args.before:
                shutil.rmtree(root / "cache-before", ignore_errors=True)
                before = run_child(data, root / "cache-before", size, 1, src=args.before)
                shutil.rmtree(root / "cache-before", ignore_errors=True)
                print(f"N={n} {size}px before: {before['images_per_s']:.0f} img/s, peak RssAnon "
                      f"{mb(before['rss_anon_peak'])}, held {mb(before['rss_anon_held'])} (start "
                      f"{mb(before['rss_anon_start'])})", flush=True)
            row = {"before": before, "n": n, "size": size, "side": args.side, "source_bytes": src, "generate_s": gen,
                   "first_w1": first[1], "first_w2": first[2], "warm": warm,
                   "speedup_2_workers": first[2]["images_per_s"] / first[1]["images_per_s"]}
            rows.append(row)
            print(f"N={n} {size}px: first decode {first[1]['images_per_s']:.0f} img/s (1 worker), "
                  f"{first[2]['images_per_s']:.0f} img/s (2 workers, x{row['speedup_2_workers']:.2f}); per CPU second "
                  f"{first[1]['images_per_cpu_s']:.0f} and {first[2]['images_per_cpu_s']:.0f} images; warm load "
                  f"{warm['load_s']:.2f} s, epoch pass {warm['epoch_s']:.2f} s; peak RssAnon first "
                  f"{mb(first[2]['rss_anon_peak'])} (start {mb(first[2]['rss_anon_start'])}), warm "
                  f"{mb(warm['rss_anon_peak'])}; worker Pss_Anon peak {mb(first[2]['worker_pss_anon_peak'])}; store "
                  f"{mb(warm['store_bytes'])}, per-file cache {mb(warm['per_file_cache_bytes'])}", flush=True)
            for c in caches.values():
                shutil.rmtree(c, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "cores": len(os.sched_getaffinity(0))}, indent=1))
    print("| N | px | 1 worker img/s | 2 workers img/s | x | img per CPU s (1 / 2 workers) | warm load s | epoch pass s "
          "| peak RssAnon first / warm | store | per-file cache |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, b, w = r["first_w1"], r["first_w2"], r["warm"]
        print(f"| {r['n']} | {r['size']} | {a['images_per_s']:.0f} | {b['images_per_s']:.0f} | "
              f"{r['speedup_2_workers']:.2f} | {a['images_per_cpu_s']:.0f} / {b['images_per_cpu_s']:.0f} | "
              f"{w['load_s']:.2f} | {w['epoch_s']:.2f} | "
              f"{mb(b['rss_anon_peak'])} / {mb(w['rss_anon_peak'])} | {mb(w['store_bytes'])} | "
              f"{mb(w['per_file_cache_bytes'])} |")


if __name__ == "__main__":
    main()
