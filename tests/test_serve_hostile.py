"""``medxfer serve`` under hostile clients: head size, timeouts, the key before the body, the connection
cap, the memory budget for decoded pixels and disconnects, on the real server (uvicorn in a thread)
with small limits set through ServeConfig (the options of ``medxfer serve``)."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

KEY = "hostile-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
HEADER_TIMEOUT = BODY_TIMEOUT = 1.0
SLACK = 6.0  # a loaded 2-core machine may delay the server's timers and this process


class Logs(logging.Handler):
    """Every record of the server's loggers, with its level and any traceback."""

    NAMES = ("medxfer", "uvicorn", "uvicorn.error", "uvicorn.access")

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))

    def emit(self, record):
        self.records.append(record)

    def text(self, since: int = 0) -> str:
        return "\n".join(self.format(r) for r in self.records[since:])

    def __enter__(self):
        self.saved = {}
        for name in self.NAMES:
            lg = logging.getLogger(name)
            self.saved[name] = lg.level
            lg.addHandler(self)
            lg.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc):
        for name in self.NAMES:
            logging.getLogger(name).removeHandler(self)
            logging.getLogger(name).setLevel(self.saved[name])


@pytest.fixture(scope="module")
def logs():
    with Logs() as cap:
        yield cap


def serve(run_dir, **limits):
    from medxfer.serve.app import BackgroundServer, ServeConfig, create_app

    cfg = ServeConfig(run_dir=str(run_dir), engine="torch", api_key=KEY, max_upload_mb=4, **limits)
    return BackgroundServer(create_app(cfg))


@pytest.fixture(scope="module")
def server(tiny_run, logs):
    with serve(tiny_run, header_timeout=HEADER_TIMEOUT, body_timeout=BODY_TIMEOUT, keep_alive=1, max_header_kb=8,
               max_inflight_mb=8, queue_timeout=0.5) as srv:
        yield srv


def connect(srv) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=10)


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float, bool]:
    """Everything the server sends until it closes (or ``limit_s`` passes): (bytes, seconds, closed)."""
    t0 = time.monotonic()
    data = b""
    sock.settimeout(0.1)
    while time.monotonic() - t0 < limit_s:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return data, time.monotonic() - t0, True
        if not chunk:
            return data, time.monotonic() - t0, True
        data += chunk
    return data, time.monotonic() - t0, False


def status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body.strip() else {}


def png(side: int, channels: int = 3) -> bytes:
    from PIL import Image

    shape = (side, side, channels) if channels == 3 else (side, side)
    buf = io.BytesIO()
    Image.fromarray(np.zeros(shape, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def multipart(data: bytes, boundary: str = "B") -> tuple[bytes, bytes]:
    """(head of a POST /v1/predict with the key, its body) for one file."""
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head, body


# ------------------------------------------------------------------------------------------ request heads
def test_header_too_large_is_431_and_the_connection_is_closed(server):
    heads = {
        "one long line": b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n",
        "many lines": b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(2000)) + b"\r\n",
        "a head that never ends": b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * 100_000,
    }
    for name, head in heads.items():
        with connect(server) as s:
            s.sendall(head)
            raw, _, closed = read_until_closed(s, SLACK)
        assert raw.startswith(b"HTTP/1.1 431"), (name, raw[:80])
        assert closed, name
        status, body = status_and_json(raw)
        assert body["error"]["code"] == "header_too_large" and "--max-header-kb" in body["error"]["message"]
    ok = httpx.get(server.url + "/healthz", headers={"X-Pad": "a" * 4000})  # under the limit: served
    assert ok.status_code == 200


# ------------------------------------------------------------------------------------------ the key first
def send_body_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, int, bool]:
    """Keep sending body bytes (64 KB every 20 ms) and reading: (answer, bytes sent, closed by the server)."""
    t0 = time.monotonic()
    answer, sent = b"", 0
    sock.settimeout(0.02)
    while time.monotonic() - t0 < limit_s:
        try:
            chunk = sock.recv(65536)
            if not chunk:
                return answer, sent, True
            answer += chunk
        except socket.timeout:
            pass
        except ConnectionResetError:
            return answer, sent, True
        try:
            sent += sock.send(b"\x00" * 65536)
        except socket.timeout:
            pass
        except (BrokenPipeError, ConnectionResetError):
            return answer, sent, True
    return answer, sent, False


def test_request_without_key_is_refused_before_its_body_is_read(server, tiny_run):
    head = (b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=B\r\n"
            b"Content-Length: 50000000\r\n\r\n")
    for name, extra in (("no key", b""), ("key, but 50 MB declared", f"X-API-Key: {KEY}\r\n".encode())):
        with connect(server) as s:
            s.sendall(head.replace(b"Host: t\r\n", b"Host: t\r\n" + extra))
            answer, sent, closed = send_body_until_closed(s, SLACK)  # a client that goes on sending its body
        assert answer.startswith(b"HTTP/1.1 401" if name == "no key" else b"HTTP/1.1 413"), (name, answer[:80])
        assert b"connection: close" in answer.lower(), name
        assert closed, f"{name}: the server went on reading a body it had refused ({sent} bytes)"
    # a client that sends its whole body before reading still gets the answer, not a reset
    big = np.random.default_rng(0).integers(0, 255, 3 * 2**20, dtype=np.uint8).tobytes()
    r = httpx.post(server.url + "/v1/predict", files=[("files", ("a.png", big, "image/png"))], timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


# ------------------------------------------------------------------------------------------ timeouts
def test_idle_and_slow_heads_are_closed_after_the_header_timeout(server):
    with connect(server) as s:  # sends nothing at all
        raw, seconds, closed = read_until_closed(s, HEADER_TIMEOUT + SLACK)
    assert closed and raw == b"", raw[:80]
    assert 0.5 * HEADER_TIMEOUT <= seconds, seconds
    with connect(server) as s:  # a head that stops half-way
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        raw, seconds, closed = read_until_closed(s, HEADER_TIMEOUT + SLACK)
    assert closed and raw.startswith(b"HTTP/1.1 408"), raw[:80]
    assert status_and_json(raw)[1]["error"]["code"] == "request_timeout"
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_a_body_that_stops_is_closed_after_the_body_timeout(server):
    head, body = multipart(png(64))
    with connect(server) as s:
        s.sendall(head + body[:60])
        raw, seconds, closed = read_until_closed(s, BODY_TIMEOUT + SLACK)
    assert closed and raw.startswith(b"HTTP/1.1 408"), raw[:80]
    assert "--body-timeout" in status_and_json(raw)[1]["error"]["message"]
    with connect(server) as s:  # the same request sent whole is answered
        s.sendall(head + body)
        s.settimeout(SLACK)
        assert s.recv(12) == b"HTTP/1.1 200"


def test_a_client_that_goes_away_mid_upload_is_one_line_without_a_stack(server, logs):
    head, body = multipart(png(64) + b"\x00" * 100_000)
    since = len(logs.records)
    with connect(server) as s:
        s.sendall(head + body[:1000])
        time.sleep(0.2)
    deadline = time.monotonic() + SLACK
    while "disconnected" not in logs.text(since) and time.monotonic() < deadline:
        time.sleep(0.05)
    text = logs.text(since)
    lines = [r for r in logs.records[since:] if "disconnected" in r.getMessage()]
    assert len(lines) == 1, text
    assert lines[0].levelno in (logging.INFO, logging.WARNING)
    assert not any(r.levelno >= logging.ERROR for r in logs.records[since:]), text
    assert "Traceback" not in text and 'File "' not in text and "ClientDisconnect" not in text


def read_response(sock: socket.socket, limit_s: float) -> tuple[int, bytes]:
    """One HTTP response (status, body) with a Content-Length, read from ``sock``."""
    sock.settimeout(limit_s)
    data = b""
    deadline = time.monotonic() + limit_s
    while b"\r\n\r\n" not in data and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection after {data[:80]!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next(v for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n")[1:])
                      if k.strip().lower() == b"content-length"))
    while len(rest) < length and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection in the middle of an answer"
        rest += chunk
    return int(head.split(b" ", 2)[1]), rest


def test_a_pipelined_upload_survives_the_answer_to_the_request_before_it(server):
    head, body = multipart(png(64))
    with connect(server) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" + head + body[:100])  # 2nd body half sent
        assert read_response(s, SLACK)[0] == 200
        time.sleep(0.2)
        s.sendall(body[100:])
        status, answer = read_response(s, SLACK)
    assert status == 200 and len(json.loads(answer)["predictions"]) == 1, answer[:200]


# ------------------------------------------------------------------------------------------ connection cap
def test_connections_over_the_cap_close_the_one_waiting_longest(tiny_run):
    with serve(tiny_run, max_connections=12, header_timeout=60) as srv:
        idle = [connect(srv) for _ in range(12)]
        try:
            time.sleep(0.3)
            r = httpx.get(srv.url + "/healthz")  # a 13th connection: served, the oldest idle one makes room
            assert r.status_code == 200
            _, _, closed = read_until_closed(idle[0], SLACK)
            assert closed, "the connection waiting longest was not closed"
            _, _, newest_closed = read_until_closed(idle[-1], 0.3)
            assert not newest_closed
        finally:
            for s in idle:
                s.close()


# ------------------------------------------------------------------------------------------ memory budget
def test_decoded_pixels_over_the_budget_get_503_with_retry_after(server):
    svc = server.app.state.service
    decode = svc.model.decode
    entered, release = threading.Event(), threading.Event()

    def slow_decode(path):
        entered.set()
        release.wait(30)
        return decode(path)

    image = png(1100)  # about 5 MB decoded (RGB): one fits the 8 MB budget, two do not
    first: dict = {}

    def post_first():
        first["r"] = httpx.post(server.url + "/v1/predict", files=[("files", ("a.png", image, "image/png"))],
                                headers=AUTH, timeout=60)

    svc.model.decode = slow_decode
    t = threading.Thread(target=post_first)
    try:
        t.start()
        assert entered.wait(30), "the first request never reached decoding"
        r = httpx.post(server.url + "/v1/predict", files=[("files", ("b.png", image, "image/png"))], headers=AUTH,
                       timeout=30)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "busy" and int(r.headers["retry-after"]) >= 1
    finally:
        release.set()
        t.join(60)
        svc.model.decode = decode
    assert first["r"].status_code == 200, first["r"].text
    assert svc.budget.used == 0
    r = httpx.post(server.url + "/v1/predict", files=[("files", ("c.png", png(2000), "image/png"))], headers=AUTH,
                   timeout=30)  # about 18 MB decoded: above the whole budget
    assert r.status_code == 413 and "--max-inflight-mb" in r.json()["error"]["message"], r.text


def test_decode_cost_is_estimated_from_the_header(tiny_run, tmp_path):
    from medxfer.serve.errors import ApiError
    from medxfer.serve.model import ServedModel

    model = ServedModel.from_run(tiny_run, engine="torch")
    grey, rgb = png(1000, channels=1), png(1000)
    cost = {name: model.decode_cost(io.BytesIO(data), ".png") for name, data in (("grey", grey), ("rgb", rgb))}
    assert 1e6 <= cost["grey"] - 2**20 < 2e6 and 4e6 <= cost["rgb"] - 2**20 < 5e6, cost
    bomb = io.BytesIO(png(16)[:16] + (9000).to_bytes(4, "big") * 2 + png(16)[24:])  # header claims 9000 x 9000
    with pytest.raises(ApiError) as e:
        model.decode_cost(bomb, ".png")
    assert e.value.status == 413
    assert model.decode_cost(io.BytesIO(b"not an image at all"), ".png") == 2 * 19
    # volumes and arrays as the server holds them (Starlette's spooled upload files), from their headers
    nibabel = pytest.importorskip("nibabel")
    import tempfile

    vol = nibabel.Nifti1Image(np.zeros((200, 200, 100), np.int16), np.eye(4))
    for suffix in (".nii", ".nii.gz"):
        nibabel.save(vol, tmp_path / f"v{suffix}")
        spooled = tempfile.SpooledTemporaryFile(max_size=2**20)
        spooled.write((tmp_path / f"v{suffix}").read_bytes())
        voxels = 200 * 200 * 100
        assert model.decode_cost(spooled, suffix) > 4 * voxels, suffix  # a few bytes per voxel, not the file's size
        assert spooled.tell() == 0
    arr = io.BytesIO()
    np.save(arr, np.zeros((300, 400), np.float64))
    assert model.decode_cost(arr, ".npy") > 2 * 8 * 300 * 400


# ------------------------------------------------------------------------------------------ options
def test_limits_are_options_with_checked_values(tiny_run):
    from typer.testing import CliRunner

    from medxfer.cli import app
    from medxfer.errors import MedxferError
    from medxfer.serve.app import ServeConfig

    out = CliRunner().invoke(app, ["serve", "--help"]).output
    for opt in ("--header-timeout", "--body-timeout", "--keep-alive", "--max-header-kb", "--max-connections",
                "--max-inflight-mb", "--queue-timeout", "--graceful-timeout", "--worker-timeout"):
        assert opt in out, opt
    for name, bad in (("header_timeout", 0), ("body_timeout", -1), ("max_header_kb", 0), ("max_connections", 0),
                      ("max_inflight_mb", 0), ("queue_timeout", -1), ("worker_timeout", 0)):
        with pytest.raises(MedxferError) as e:
            ServeConfig(run_dir=str(tiny_run), **{name: bad}).check()
        msg = str(e.value)
        assert name.replace("_", "-") in msg and str(bad) in msg and "\n" not in msg
