"""Benchmark: ``medxfer serve`` under N concurrent clients, batched vs unbatched, ONNX engine, CPU.

Usage::

    .venv/bin/python bench/bench_serve.py                      # 16 clients, 60 s per mode (~3 min)
    .venv/bin/python bench/bench_serve.py --seconds 20         # shorter
    .venv/bin/python bench/bench_serve.py --clients 64 --run runs/other

The run (default ``runs/bench_serve``: EfficientNet-Lite0 linear probe on BreastMNIST at 64 px) is
trained and exported to ONNX first when it is missing::

    .venv/bin/medxfer train --data src/medxfer/datasets/breastmnist_28.npz --label-names malignant,benign \\
        --positive-label malignant --strategy linear-probe --image-size 64 --tta 1 --duplicates allow --out runs/bench_serve
    .venv/bin/medxfer export runs/bench_serve

Each mode has its own server process (``python -m medxfer serve RUN --engine onnx``, the same
command as ``medxfer serve``) on a free loopback port: ``batched`` (``--max-batch 32
--batch-wait-ms 5``, the defaults) and ``unbatched`` (``--no-batching``: one model call per image).
Both start and warm up first; then N clients (asyncio, one keep-alive connection each, in this
process) post one real BreastMNIST test PNG per request in a closed loop, against one server at a
time, in ``--rounds`` segments per mode in A B B A order (``--seconds`` per mode in all), so that
drift in the machine's load (a shared machine) hits both modes alike. Reported per mode:
requests/s, p50/p95/p99 latency, peak RSS of the server process (``VmHWM``), failed requests (must be
0), and the server's mean batch size (from its shutdown log line); and batched/unbatched throughput.
Targets at 16 clients, 64 px, 2 cores: batched >= 2x unbatched, p95 < 1 s.

Prints a markdown table and ONE JSON line (last line of stdout); writes the JSON to
``bench/results/<date>-serve.json``. Traffic goes to 127.0.0.1 only; every loop is bounded in time
and count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "medxfer" / "datasets" / "breastmnist_28.npz"
MEDXFER = Path(sys.executable).with_name("medxfer")
BOUNDARY = "medxferbenchboundary"
MAX_REQUESTS = 2_000_000  # a hard cap on each load loop besides its duration


def ensure_run(run: Path) -> None:
    """Train and export the benchmark run when it (or its model.onnx) is missing."""
    cli = [str(MEDXFER)] if MEDXFER.exists() else [sys.executable, "-m", "medxfer"]
    if not (run / "model.safetensors").is_file():
        print(f"training {run} (linear probe, 64 px) ...", file=sys.stderr)
        subprocess.run([*cli, "train", "--data", str(DATA), "--label-names", "malignant,benign",
                        "--positive-label", "malignant", "--strategy", "linear-probe", "--image-size", "64", "--tta", "1",
                        "--duplicates", "allow", "--out", str(run)], check=True)
    if not (run / "model.onnx").is_file():
        print(f"exporting {run} to ONNX ...", file=sys.stderr)
        subprocess.run([*cli, "export", str(run)], check=True)


def bodies(n: int = 64) -> list[bytes]:
    """Multipart bodies, one real BreastMNIST test image each, encoded once."""
    from PIL import Image

    out = []
    for img in np.load(DATA)["test_images"][:n]:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append((f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"image.png\"\r\n"
                    "Content-Type: image/png\r\n\r\n").encode() + buf.getvalue() + f"\r\n--{BOUNDARY}--\r\n".encode())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Connection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: the load generator shares the two
    cores with the server, so it must cost little (a full client library costs several times more per request)."""

    def __init__(self, host: str, port: int, key: str | None = None):
        self.host, self.port = host, port
        self.auth = f"Authorization: Bearer {key}\r\n" if key else ""
        self.reader = self.writer = None
        self.last_headers: dict = {}

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        if self.reader is not None and self.reader.at_eof():  # closed while idle (keep-alive timeout, eviction)
            await self.close()
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{self.auth}Content-Type: {content_type}"
                f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        try:
            self.writer.write(head + body)
            await self.writer.drain()
            raw = await self.reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            data = await self.reader.readexactly(int(headers.get("content-length", "0")))
            if headers.get("connection", "").lower() == "close":
                await self.close()
            self.last_headers = headers
            return status, data
        except BaseException:
            await self.close()
            raise

    async def close(self):
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def load(port: int, payloads: list[bytes], clients: int, seconds: float) -> dict:
    """``clients`` closed-loop clients posting for ``seconds``; latencies of the successful requests."""
    ctype = f"multipart/form-data; boundary={BOUNDARY}"
    latencies: list[float] = []
    failures: list[str] = []
    sent = 0
    deadline = time.perf_counter() + seconds

    async def client(k: int):
        nonlocal sent
        conn = Connection("127.0.0.1", port)
        i = k
        try:
            while time.perf_counter() < deadline and sent < MAX_REQUESTS:
                sent += 1
                t0 = time.perf_counter()
                try:
                    status, data = await asyncio.wait_for(conn.post("/v1/predict", payloads[i % len(payloads)], ctype), 60)
                    ok = status == 200 and len(json.loads(data)["predictions"]) == 1
                    if not ok:
                        failures.append(f"HTTP {status}")
                except Exception as e:  # noqa: BLE001 - counted, reported
                    ok = False
                    failures.append(type(e).__name__)
                if ok:
                    latencies.append(time.perf_counter() - t0)
                i += clients
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return {"latencies": latencies, "failures": failures, "wall": time.perf_counter() - t0}


def summary(segments: list[dict]) -> dict:
    """Requests/s over all segments of one mode, and percentiles of all their latencies."""
    latencies = [x for s in segments for x in s["latencies"]]
    failures = [x for s in segments for x in s["failures"]]
    wall = sum(s["wall"] for s in segments)
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"requests": len(latencies), "failed": len(failures), "failures": sorted(set(failures))[:5],
            "seconds": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p95_ms": round(float(np.percentile(lat, 95)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "segments_requests_per_s": [round(len(s["latencies"]) / s["wall"], 1) for s in segments]}


class Server:
    """``python -m medxfer serve RUN --engine onnx`` on a free loopback port, in its own process."""

    def __init__(self, run: Path, name: str, extra: list[str]):
        self.name, self.extra = name, extra
        self.port = free_port()
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_serve_{name}_{self.port}.log"
        cmd = [sys.executable, "-m", "medxfer", "serve", str(run), "--port", str(self.port), "--engine", "onnx",
               "--log-level", "info", *extra]
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 90.0) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {self.name} server exited: see {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the {self.name} server did not start in {timeout:g} s: see {self.log_path}")

    def stop(self) -> dict:
        """SIGTERM (graceful: the server logs its batch statistics); its peak RSS and mean batch."""
        out = {"peak_rss_mb": round(peak_rss_mb(self.proc.pid) or float("nan"), 1)}
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()
        found = re.findall(r"(\d+) images predicted in (\d+) model calls \(mean batch ([\d.]+)\)",
                           self.log_path.read_text())
        if found:
            _, calls, mean = found[-1]
            out["model_calls"], out["mean_batch"] = int(calls), float(mean)
        return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "bench_serve")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=4, help="Segments per mode, alternating A B B A (seconds are split).")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--server-args", default="", help="More options for both servers, e.g. '--log-level warning'.")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    ensure_run(args.run)
    meta = json.loads((args.run / "model.json").read_text())
    payloads = bodies()
    modes = [("batched", ["--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms)]),
             ("unbatched", ["--no-batching"])]
    more = args.server_args.split()
    servers = {name: Server(args.run, name, extra + more) for name, extra in modes}
    segments: dict[str, list[dict]] = {name: [] for name, _ in modes}
    try:
        for srv in servers.values():
            srv.wait_ready()
            asyncio.run(load(srv.port, payloads, args.clients, args.warmup))
        # both servers stay up (the idle one costs no CPU); the load alternates between them in
        # A B B A order, so that drift in the machine's load hits both modes alike
        order = [m for r in range(args.rounds) for m in (("batched", "unbatched") if r % 2 == 0 else ("unbatched", "batched"))]
        for name in order:
            print(f"  {name}: {args.clients} clients x {args.seconds / args.rounds:g} s", file=sys.stderr)
            segments[name].append(asyncio.run(load(servers[name].port, payloads, args.clients,
                                                   args.seconds / args.rounds)))
    finally:
        stopped = {name: srv.stop() for name, srv in servers.items()}
    results = []
    for name, extra in modes:
        r = summary(segments[name]) if segments[name] else {}
        r.update(stopped[name])
        r.update({"mode": name, "server_args": extra + more, "server_log": str(servers[name].log_path)})
        results.append(r)
    by = {r["mode"]: r for r in results}
    ratio = by["batched"]["requests_per_s"] / by["unbatched"]["requests_per_s"] if by["unbatched"]["requests_per_s"] else None
    report = {
        "benchmark": "serve", "date": dt.date.today().isoformat(), "clients": args.clients, "seconds": args.seconds,
        "rounds": args.rounds, "engine": "onnx", "run": str(args.run), "arch": meta.get("arch"), "image_size": meta.get("image_size"),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(), "modes": results,
        "batched_over_unbatched": round(ratio, 2) if ratio else None,
        "targets": {"ratio_ge_2": bool(ratio and ratio >= 2), "batched_p95_lt_1s": by["batched"]["p95_ms"] < 1000,
                    "no_failures": all(r["failed"] == 0 for r in results)},
    }
    print(f"\n`medxfer serve`, {args.clients} clients x {args.seconds:g} s per mode, ONNX engine, "
          f"{meta.get('arch')} at {meta.get('image_size')} px, {report['cpus']} CPUs\n")
    print("| mode | requests/s | p50 ms | p95 ms | p99 ms | peak RSS MB | failed | mean batch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['mode']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} "
              f"| {r['peak_rss_mb']:.0f} | {r['failed']} | {r.get('mean_batch', float('nan')):.1f} |")
    print(f"\nbatched / unbatched throughput: {report['batched_over_unbatched']}x (target >= 2x); "
          f"batched p95 {by['batched']['p95_ms']:.0f} ms (target < 1000 ms)")
    out = args.out or ROOT / "bench" / "results" / f"{report['date']}-serve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
