"""Benchmark: ``medxfer serve`` under hostile clients while well-behaved clients use it, CPU, loopback only.

Usage::

    .venv/bin/python bench/bench_serve_hostile.py                   # 60 s of load
    .venv/bin/python bench/bench_serve_hostile.py --seconds 20      # a shorter run
    .venv/bin/python bench/bench_serve_hostile.py --seconds 5 --idle 100 --bombs 1   # smoke run

The run (default ``runs/bench_serve_hostile``: timm ``test_resnet``, random init, 1 epoch on the bundled
BreastMNIST at 64 px, a few seconds) is trained when missing. The server is the real command,
``medxfer serve RUN --api-key-file KEY`` with its default limits, on a free 127.0.0.1 port in its own
process. From this one process (asyncio), for ``--seconds``:

- ``--clients`` well-behaved clients (16) post one real BreastMNIST test image at 64 px (PNG) per
  request with the key, in a closed loop on keep-alive connections (reopened only when the server
  closed them while idle, as HTTP clients do);
- ``--idle`` connections (1,000) that send nothing, each reopened 1 s after the server closes it;
- ``--slow`` connections (20) that send a request head a header line per second, never ending it;
- ``--slow`` connections (20) that send a head with the key and 60 bytes of a 1 MB body, then stop;
- 4 connections that send header lines as fast as they can (up to 200 MB each);
- 4 connections that declare a 30 MB body without the key and keep sending it;
- ``--bombs`` clients (4) that post a 200 kB PNG of 8000 x 8000 RGB pixels (about 250 MB decoded)
  with the key, one after another.

Reported: the well-behaved clients' requests, failures (target 0) and p50/p95/p99 latency (target
p95 < 1 s); for each hostile kind, the connections the server closed, their answers (408, 431, 401),
and the longest time to close against its limit (``--header-timeout`` 10 s, ``--body-timeout`` 20 s,
the 2 s linger after a refusal; 2 s slack for a loaded machine): every hostile connection must be
closed within it, and none may still be open past it at the end; the bombs' answers (200, or 503 with
Retry-After when the memory budget is full); and the server's peak RSS (``VmHWM``, target < 2 GB).

Prints a markdown summary and ONE JSON line (last line of stdout); writes the JSON to
``bench/results/<date>-serve-hostile.json``. Traffic goes to 127.0.0.1 only; every loop is bounded in
time and count.
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import Connection, free_port, peak_rss_mb  # noqa: E402 - the same minimal client as bench_serve

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "medxfer" / "datasets" / "breastmnist_28.npz"
MEDXFER = Path(sys.executable).with_name("medxfer")
BOUNDARY = "medxferhostileboundary"
KEY = "bench-hostile-key-" + os.urandom(8).hex()
HEADER_TIMEOUT, BODY_TIMEOUT, LINGER = 10.0, 20.0, 2.0  # medxfer serve's defaults
SLACK = 2.0
MAX_LOOPS = 1_000_000  # a hard cap on every client loop besides the duration


def ensure_run(run: Path) -> None:
    if (run / "model.safetensors").is_file():
        return
    cli = [str(MEDXFER)] if MEDXFER.exists() else [sys.executable, "-m", "medxfer"]
    print(f"training {run} (test_resnet, random init, 1 epoch, 64 px) ...", file=sys.stderr)
    subprocess.run([*cli, "train", "--data", str(DATA), "--label-names", "malignant,benign", "--positive-label",
                    "malignant", "--source", "test_resnet", "--weights", "none", "--image-size", "64", "--epochs", "1",
                    "--bootstrap", "0", "--no-report", "--duplicates", "allow", "--out", str(run), "--quiet"],
                   check=True)


def png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def multipart(data: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"image.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def payloads(n: int = 32) -> list[bytes]:
    from PIL import Image

    out = []
    for img in np.load(DATA)["test_images"][:n]:
        out.append(multipart(png(np.asarray(Image.fromarray(img).resize((64, 64), Image.Resampling.BILINEAR)))))
    return out


def bomb() -> bytes:
    """A PNG of 8000 x 8000 RGB pixels that compresses to about 200 kB."""
    a = np.zeros((8000, 8000, 3), np.uint8)
    a[::7, :, 0] = 255
    a[:, ::5, 1] = 128
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=9)
    return multipart(buf.getvalue())


class Hostile:
    """Every hostile connection: when it opened, when the server closed it, what it answered, bytes sent."""

    def __init__(self):
        self.records: dict[str, list[dict]] = {}

    def new(self, kind: str, bound: float) -> dict:
        rec = {"opened": time.monotonic(), "closed": None, "status": None, "sent": 0, "bound": bound}
        self.records.setdefault(kind, []).append(rec)
        return rec

    def summary(self, now: float) -> dict:
        out = {}
        for kind, recs in self.records.items():
            closed = [r for r in recs if r["closed"] is not None]
            times = [r["closed"] - r["opened"] for r in closed]
            late = [r for r in closed if r["closed"] - r["opened"] > r["bound"] + SLACK]
            overdue = [r for r in recs if r["closed"] is None and now - r["opened"] > r["bound"] + SLACK]
            statuses: dict[str, int] = {}
            for r in closed:
                statuses[str(r["status"] or "none")] = statuses.get(str(r["status"] or "none"), 0) + 1
            out[kind] = {"opened": len(recs), "closed": len(closed), "bound_s": recs[0]["bound"] if recs else None,
                         "max_s_to_close": round(max(times), 2) if times else None,
                         "closed_late": len(late), "open_past_bound": len(overdue), "answers": statuses,
                         "max_bytes_sent": max((r["sent"] for r in recs), default=0)}
        return out


async def read_answer(reader: asyncio.StreamReader, rec: dict, limit_s: float) -> None:
    """Read until the server closes (or ``limit_s``): the status of its answer, and when it closed."""
    data = b""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), max(0.01, deadline - time.monotonic()))
        except (asyncio.TimeoutError, TimeoutError):
            return
        except (ConnectionError, OSError):
            chunk = b""
        if not chunk:
            rec["closed"] = time.monotonic()
            break
        data += chunk
    if data.startswith(b"HTTP/1.1 "):
        rec["status"] = int(data[9:12])


async def run_hostile(port: int, args, hostile: Hostile, deadline: float) -> None:
    host = "127.0.0.1"
    end = deadline + HEADER_TIMEOUT + BODY_TIMEOUT  # hostile connections opened late are followed to their close

    async def connection(kind: str, bound: float, script, pause: float = 0.0):
        for _ in range(MAX_LOOPS):
            if time.monotonic() >= deadline:
                return
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                await asyncio.sleep(0.2)
                continue
            rec = hostile.new(kind, bound)
            try:
                await script(reader, writer, rec)
            except (ConnectionError, OSError):
                if rec["closed"] is None:
                    rec["closed"] = time.monotonic()
            finally:
                writer.close()
            await asyncio.sleep(pause)

    async def idle(reader, writer, rec):
        await read_answer(reader, rec, end - time.monotonic())

    async def slow_head(reader, writer, rec):
        reader_task = asyncio.ensure_future(read_answer(reader, rec, end - time.monotonic()))
        writer.write(b"GET /v1/model HTTP/1.1\r\nHost: x\r\n")
        for i in range(int(HEADER_TIMEOUT + BODY_TIMEOUT) * 2):
            await asyncio.wait([reader_task], timeout=1.0)
            if reader_task.done() or writer.is_closing():
                break
            writer.write(b"X-Drip-%d: 1\r\n" % i)
            rec["sent"] += 14
        await reader_task

    async def slow_body(reader, writer, rec):
        start = multipart(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200)[:60]  # a valid start: the parser waits for more
        writer.write((f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                      f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: 1000000\r\n\r\n")
                     .encode() + start)
        rec["sent"] = len(start)
        await read_answer(reader, rec, end - time.monotonic())

    async def flood(reader, writer, rec, head: bytes, chunk: bytes, cap: int):
        reader_task = asyncio.ensure_future(read_answer(reader, rec, end - time.monotonic()))
        try:
            writer.write(head)
            while not reader_task.done() and rec["sent"] < cap:
                writer.write(chunk)
                rec["sent"] += len(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # the server closed: read_answer sees it
        await reader_task

    async def big_head(reader, writer, rec):
        await flood(reader, writer, rec, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"X-Big: " + b"a" * 8183 + b"\r\n",
                    200 * 2**20)

    async def no_key(reader, writer, rec):
        await flood(reader, writer, rec, (f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                                          f"boundary={BOUNDARY}\r\nContent-Length: 30000000\r\n\r\n").encode(),
                    b"\x00" * 65536, 30_000_000)

    tasks = []
    for i in range(args.idle):
        tasks.append(connection("idle", HEADER_TIMEOUT, idle, pause=1.0))
    tasks += [connection("slow_head", HEADER_TIMEOUT, slow_head) for _ in range(args.slow)]
    tasks += [connection("slow_body", BODY_TIMEOUT, slow_body) for _ in range(args.slow)]
    tasks += [connection("big_head", LINGER, big_head, pause=0.5) for _ in range(4)]
    tasks += [connection("no_key_body", LINGER, no_key, pause=0.5) for _ in range(4)]
    await asyncio.gather(*tasks)


async def run_good(port: int, bodies: list[bytes], clients: int, deadline: float) -> dict:
    ctype = f"multipart/form-data; boundary={BOUNDARY}"
    latencies, failures = [], []

    async def client(k: int):
        conn = Connection("127.0.0.1", port, key=KEY)
        i = k
        try:
            for _ in range(MAX_LOOPS):
                if time.monotonic() >= deadline:
                    return
                t0 = time.perf_counter()
                try:
                    status, data = await asyncio.wait_for(conn.post("/v1/predict", bodies[i % len(bodies)], ctype), 60)
                    if status == 200 and len(json.loads(data)["predictions"]) == 1:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        failures.append(f"HTTP {status}")
                except Exception as e:  # noqa: BLE001 - counted, reported
                    failures.append(type(e).__name__)
                i += clients
        finally:
            await conn.close()

    await asyncio.gather(*(client(k) for k in range(clients)))
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"requests": len(latencies), "failed": len(failures), "failures": sorted(set(failures))[:5],
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p95_ms": round(float(np.percentile(lat, 95)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1), "max_ms": round(float(np.max(lat)), 1)}


async def run_bombs(port: int, body: bytes, clients: int, deadline: float) -> dict:
    ctype = f"multipart/form-data; boundary={BOUNDARY}"
    answers: dict[str, int] = {}
    retry_after = set()

    async def client():
        conn = Connection("127.0.0.1", port, key=KEY)
        try:
            for _ in range(MAX_LOOPS):
                if time.monotonic() >= deadline:
                    return
                try:
                    status, _ = await asyncio.wait_for(conn.post("/v1/predict", body, ctype), 120)
                    answers[str(status)] = answers.get(str(status), 0) + 1
                    if status == 503:
                        retry_after.add(conn.last_headers.get("retry-after"))
                        await asyncio.sleep(0.5)
                except Exception as e:  # noqa: BLE001 - counted, reported
                    answers[type(e).__name__] = answers.get(type(e).__name__, 0) + 1
        finally:
            await conn.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return {"clients": clients, "answers": answers, "retry_after": sorted(x for x in retry_after if x)}


async def sample_rss(pid: int, deadline: float) -> float:
    peak = 0.0
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        await asyncio.sleep(0.25)
    return peak


async def scenario(port: int, pid: int, args, bodies: list[bytes], bomb_body: bytes) -> dict:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.idle + 2 * args.slow + args.clients + args.bombs + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, want), hard))
    hostile = Hostile()
    t0 = time.monotonic()
    deadline = t0 + args.seconds
    hostile_task = asyncio.ensure_future(run_hostile(port, args, hostile, deadline))
    await asyncio.sleep(min(2.0, args.seconds / 4))  # the idle connections open first
    good, bombs, rss = await asyncio.gather(run_good(port, bodies, args.clients, deadline),
                                            run_bombs(port, bomb_body, args.bombs, deadline),
                                            sample_rss(pid, deadline + 1))
    # follow the hostile connections to their close (bounded: the longest limit plus slack)
    with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
        await asyncio.wait_for(hostile_task, BODY_TIMEOUT + 2 * SLACK)
    return {"good": good, "bombs": bombs, "hostile": hostile.summary(time.monotonic()),
            "max_sampled_rss_mb": round(rss, 1), "load_seconds": round(time.monotonic() - t0, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "bench_serve_hostile")
    ap.add_argument("--seconds", type=float, default=60.0, help="How long the well-behaved clients send.")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--idle", type=int, default=1000)
    ap.add_argument("--slow", type=int, default=20)
    ap.add_argument("--bombs", type=int, default=4)
    ap.add_argument("--server-args", default="", help="More options for the server, e.g. '--max-inflight-mb 512'.")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    ensure_run(args.run)
    meta = json.loads((args.run / "model.json").read_text())
    bodies, bomb_body = payloads(), bomb()
    port = free_port()
    key_file = Path(tempfile.mkdtemp(prefix="bench-hostile-")) / "key.txt"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    log_path = Path(tempfile.gettempdir()) / f"bench_serve_hostile_{port}.log"
    cli = [str(MEDXFER)] if MEDXFER.exists() else [sys.executable, "-m", "medxfer"]
    cmd = [*cli, "serve", str(args.run), "--port", str(port), "--api-key-file", str(key_file), "--log-level", "warning",
           *args.server_args.split()]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            import urllib.request

            for _ in range(900):
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited: see {log_path}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.1)
            else:
                raise RuntimeError(f"the server did not start: see {log_path}")
            print(f"  load: {args.clients} clients, {args.idle} idle, {args.slow}+{args.slow} slow, 4+4 floods, "
                  f"{args.bombs} bombs, {args.seconds:g} s", file=sys.stderr)
            result = asyncio.run(scenario(port, proc.pid, args, bodies, bomb_body))
            result["server_peak_rss_mb"] = round(peak_rss_mb(proc.pid) or float("nan"), 1)
        finally:
            t = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            result_stop = round(time.monotonic() - t, 1)
            key_file.unlink(missing_ok=True)
    log_text = log_path.read_text(errors="replace")
    result["server_exit_s"] = result_stop
    result["server_log_closed_lines"] = re.findall(r"closed connections: .*", log_text)[-3:]
    result["server_log_errors"] = len(re.findall(r"\bERROR\b", log_text))
    hostile = result["hostile"]
    report = {
        "benchmark": "serve-hostile", "date": dt.date.today().isoformat(), "seconds": args.seconds,
        "clients": args.clients, "idle": args.idle, "slow": args.slow, "bombs": args.bombs, "run": str(args.run),
        "arch": meta.get("arch"), "image_size": meta.get("image_size"), "server_args": args.server_args,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(), **result,
        "targets": {"no_failures": result["good"]["failed"] == 0, "p95_lt_1s": result["good"]["p95_ms"] < 1000,
                    "peak_rss_lt_2gb": result["server_peak_rss_mb"] < 2048,
                    "hostile_closed_within_limits": all(h["closed_late"] == 0 and h["open_past_bound"] == 0
                                                        for h in hostile.values())},
    }
    g = result["good"]
    print(f"\n`medxfer serve` under hostile clients, {args.seconds:g} s, {meta.get('arch')} at {meta.get('image_size')} px, "
          f"{report['cpus']} CPUs (load average at the end {report['loadavg_at_end'][0]})\n")
    print(f"well-behaved ({args.clients} clients): {g['requests']} requests, {g['failed']} failed, p50 {g['p50_ms']:.0f} ms, "
          f"p95 {g['p95_ms']:.0f} ms, p99 {g['p99_ms']:.0f} ms")
    print(f"bombs (8000x8000 RGB PNG): {result['bombs']['answers']}; server peak RSS {result['server_peak_rss_mb']:.0f} MB\n")
    print("| hostile | opened | closed | answers | limit s | longest to close s | late | open past limit |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind, h in hostile.items():
        print(f"| {kind} | {h['opened']} | {h['closed']} | {h['answers']} | {h['bound_s']:g} | {h['max_s_to_close']} "
              f"| {h['closed_late']} | {h['open_past_bound']} |")
    print(f"\ntargets: {report['targets']}")
    out = args.out or ROOT / "bench" / "results" / f"{report['date']}-serve-hostile.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
