"""Run every CPU benchmark (``make bench``): bench_speed.py, then bench_cache.py; print all of it.

Usage::

    .venv/bin/python bench/run_all.py            # the full runs (~15+ min on 2 cores)
    .venv/bin/python bench/run_all.py --quick    # smoke runs of both (a few minutes)

Each script runs in its own process, one after the other (never in parallel: the machines have 2
cores); their output streams through, and the last JSON line of each is collected into one summary
JSON line printed at the end. ``bench/gpu.py`` is not run here (it needs a CUDA GPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script: str, args: list[str]) -> dict | None:
    cmd = [sys.executable, str(HERE / script), *args]
    print(f"\n==> {' '.join([Path(cmd[0]).name, *cmd[1:]])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    last = None
    for line in proc.stdout:
        print(line, end="", flush=True)
        if line.startswith("{"):
            last = line
    rc = proc.wait()
    print(f"<== {script}: exit {rc}, {time.perf_counter() - t0:.0f} s", flush=True)
    if rc != 0 or last is None:
        return {"script": script, "exit_code": rc}
    try:
        return json.loads(last)
    except ValueError:
        return {"script": script, "exit_code": rc, "unparsed": last.strip()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke runs (small data, few epochs)")
    ap.add_argument("--repeats", type=int, default=1, help="bench_speed: alternating runs per comparison")
    args = ap.parse_args()
    speed_args = ["--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
    cache_args = ["--files", "100", "--runs", "1"] if args.quick else []
    results = {"speed": run("bench_speed.py", speed_args), "cache": run("bench_cache.py", cache_args)}
    failed = [k for k, v in results.items() if v and "exit_code" in v and v["exit_code"] != 0]
    print("\n" + json.dumps({"bench": "all", "quick": args.quick, "results": results}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
