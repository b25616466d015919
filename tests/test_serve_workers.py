"""``medxfer serve --workers 2``: both workers start and serve, share the key without the environment,
and the whole server stops on SIGTERM (the real command, in its own process group)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

KEY = "workers-test-key-5f1e0c9a77"
READY_S = 60   # a 2-core machine under load: each worker imports PyTorch and loads the model
STOP_S = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_two_workers_start_share_the_key_outside_the_environment_and_stop_on_sigterm(tiny_run, tmp_path):
    key_file = tmp_path / "key.txt"
    key_file.write_text(KEY + "\n")
    port = free_port()
    medxfer = Path(sys.executable).with_name("medxfer")
    cmd = [str(medxfer)] if medxfer.exists() else [sys.executable, "-m", "medxfer"]
    log = open(tmp_path / "serve.log", "wb")
    env = {k: v for k, v in os.environ.items() if k != "MEDXFER_SERVE_CONFIG"}
    proc = subprocess.Popen([*cmd, "serve", str(tiny_run), "--workers", "2", "--port", str(port), "--api-key-file",
                             str(key_file)], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        ready = False
        while time.monotonic() - t0 < READY_S and proc.poll() is None:
            try:
                ready = httpx.get(url + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                pass
            if ready:
                break
            time.sleep(0.5)
        text = (tmp_path / "serve.log").read_text(errors="replace")
        assert ready, f"/healthz did not answer within {READY_S} s:\n{text[-3000:]}"
        # both workers up (the supervisor restarts none), each loaded the model
        deadline = time.monotonic() + READY_S
        while text.count("Application startup complete") < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            text = (tmp_path / "serve.log").read_text(errors="replace")
        assert text.count("Application startup complete") == 2 and "died" not in text, text[-3000:]
        assert httpx.get(url + "/v1/model", timeout=10).status_code == 401
        for _ in range(4):
            assert httpx.get(url + "/v1/model", headers={"X-API-Key": KEY}, timeout=10).status_code == 200
        procs = [proc.pid, *descendants(proc.pid)]
        assert len(procs) >= 3, procs
        for pid in procs:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert KEY.encode() not in environ and b"MEDXFER_SERVE_CONFIG" not in environ, pid
            assert KEY.encode() not in cmdline, pid
        assert KEY not in text
        t1 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not exit within {STOP_S} s of SIGTERM")
        while any(alive(p) for p in procs[1:]) and time.monotonic() - t1 < STOP_S:
            time.sleep(0.1)
        assert not any(alive(p) for p in procs[1:]), "a worker outlived its parent"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
