"""The HTTP app of ``medxfer serve``: routes, guards (API key, upload size), batching, the page.

Usage::

    from medxfer.serve.app import ServeConfig, create_app, run

    app = create_app(ServeConfig(run_dir="runs/breast"))   # an ASGI app (Starlette)
    run(ServeConfig(run_dir="runs/breast", port=8000))      # uvicorn; refuses a public host without a key

Routes: ``GET /`` (the page), ``GET /healthz``, ``GET /v1/model``, ``POST /v1/predict[?explain=true]``.
Every error is JSON ``{"error": {"code", "message"}}`` with a 4xx/5xx status; messages name the image
by its index in the request, never by its file name, and hold no header value and no traceback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anyio
import numpy as np
import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from medxfer.errors import MedxferError
from medxfer.serve.batching import Batcher
from medxfer.serve.errors import ApiError
from medxfer.serve.model import ServedModel
from medxfer.serve.uploads import UploadDir, png_size, safe_suffix

log = logging.getLogger("medxfer.serve")

_SNIFF_BYTES = 352  # enough for the DICOM preamble (132) and the NIfTI-1 magic (344)
_CONFIG_ENV = "MEDXFER_SERVE_CONFIG"


@dataclass
class ServeConfig:
    """Everything ``medxfer serve`` takes; ``api_key`` None means no key (loopback only)."""

    run_dir: str
    engine: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    api_key: str | None = field(default=None, repr=False)
    max_upload_mb: float = 32.0
    max_files: int = 32
    max_batch: int = 32
    batch_wait_ms: float = 5.0
    threads: int | None = None
    log_level: str = "info"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def check(self) -> None:
        """Raise MedxferError for values no server can run with."""
        if not 1 <= int(self.port) <= 65535:
            raise MedxferError(f"The 'port' parameter must be between 1 and 65535. Got {self.port} instead.")
        for name in ("workers", "max_files", "max_batch"):
            if int(getattr(self, name)) < 1:
                raise MedxferError(f"The '{name.replace('_', '-')}' parameter must be >= 1. "
                                   f"Got {getattr(self, name)} instead.")
        if not self.max_upload_mb > 0:
            raise MedxferError(f"The 'max-upload-mb' parameter must be > 0. Got {self.max_upload_mb} instead.")
        if self.batch_wait_ms < 0:
            raise MedxferError(f"The 'batch-wait-ms' parameter must be >= 0. Got {self.batch_wait_ms} instead.")
        if self.api_key is not None and not self.api_key.strip():
            raise MedxferError("the API key is empty. Pass a non-empty --api-key or --api-key-file.")
        check_host(self.host, self.api_key)


def is_loopback(host: str) -> bool:
    """True for 'localhost', 127.0.0.0/8 and ::1."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key."""
    if not is_loopback(host) and not api_key:
        raise MedxferError(f"refusing to listen on '{host}' without an API key: anyone who can reach it could "
                           "send images. Pass --api-key-file FILE (or --api-key KEY), or keep --host 127.0.0.1.")


# --------------------------------------------------------------------------------- errors, JSON
def error_response(err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="medxfer"'} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _log_unexpected(where: str, exc: BaseException) -> None:
    """Log an unexpected exception by type and frames only: its message could quote file contents."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("%s: unexpected %s (message withheld)\n%s", where, type(exc).__name__, frames.rstrip())


def api(endpoint):
    """Turn ApiError into its JSON answer and anything unexpected into a 500 without a traceback."""
    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ApiError as e:
            log.info("%s %s -> %d %s: %s", request.method, request.url.path, e.status, e.code, e.message)
            return error_response(e)
        except Exception as e:  # noqa: BLE001
            _log_unexpected(f"{request.method} {request.url.path}", e)
            return error_response(ApiError(500, "internal_error", "internal error; the server log has the details"))
    wrapped.__name__ = endpoint.__name__
    return wrapped


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    codes = {404: "not_found", 405: "method_not_allowed"}
    msg = {404: f"no route '{request.url.path}': the routes are GET /, GET /healthz, GET /v1/model, "
                "POST /v1/predict", 405: f"method {request.method} is not allowed on '{request.url.path}'"}
    return error_response(ApiError(exc.status_code, codes.get(exc.status_code, "http_error"),
                                   msg.get(exc.status_code, "request refused")))


# --------------------------------------------------------------------------------- guard middleware
class UploadTooLarge(Exception):
    pass


class Guard:
    """Pure ASGI middleware: security headers everywhere; on ``/v1/*`` the API key and the upload limit.

    A body declared larger than the limit is read and discarded (up to a cap) before the 413 goes
    out, so that clients that send the whole body before reading the answer still get it.
    """

    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.key_digest = hashlib.sha256(self.key).digest() if self.key else None
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                            (b"x-frame-options", b"DENY")]
                if scope["path"].startswith("/v1/"):
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        if not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send_with_headers)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.key is not None:
            err = self._auth_error(headers)
            if err is not None:
                log.info("%s %s -> 401 unauthorized: %s", scope.get("method"), scope["path"], err.message)
                return await error_response(err)(scope, receive, send_with_headers)
        declared = headers.get(b"content-length")
        too_large = upload_too_large(self.max_bytes)
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                return await error_response(ApiError(400, "bad_request", "invalid Content-Length header"))(
                    scope, receive, send_with_headers)
            if n > self.max_bytes:
                log.info("%s %s -> 413 upload_too_large (%d bytes declared)", scope.get("method"), scope["path"], n)
                await drain(receive, cap=max(4 * self.max_bytes, 64 * 2**20))
                return await error_response(too_large)(scope, receive, send_with_headers)
        seen = 0
        tripped = False

        async def limited_receive():
            nonlocal seen, tripped
            message = await receive()
            if message["type"] == "http.request" and not tripped:
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    tripped = True
                    raise UploadTooLarge()
            return message

        await self.app(scope, limited_receive, send_with_headers)

    def _auth_error(self, headers: dict) -> ApiError | None:
        given = None
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        elif headers.get(b"x-api-key") is not None:
            given = headers[b"x-api-key"].strip()
        if not given:
            return ApiError(401, "unauthorized", "this server needs an API key: send 'Authorization: Bearer KEY' "
                            "or 'X-API-Key: KEY'")
        if not hmac.compare_digest(hashlib.sha256(given).digest(), self.key_digest):  # constant time, any length
            return ApiError(401, "unauthorized", "wrong API key")
        return None


def upload_too_large(max_bytes: int) -> ApiError:
    return ApiError(413, "upload_too_large", f"the upload is larger than the limit of {max_bytes / 2**20:g} MB "
                    "(--max-upload-mb); send fewer or smaller files")


async def drain(receive, cap: int) -> None:
    """Read and drop the rest of a request body, at most ``cap`` bytes."""
    total = 0
    while total <= cap:
        try:
            message = await receive()
        except UploadTooLarge:
            continue
        if message["type"] != "http.request":
            return
        total += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


# --------------------------------------------------------------------------------- the app
class Service:
    """The state of one server process: the model, its thread, the batcher, the upload folder."""

    def __init__(self, cfg: ServeConfig, model: ServedModel):
        self.cfg = cfg
        self.model = model
        self.allowed = model.suffixes()
        self.uploads = UploadDir()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medxfer-model")
        self.batcher = Batcher(model.predict, max_batch=cfg.max_batch, max_wait_ms=cfg.batch_wait_ms,
                               executor=self.executor)

    def decode_all(self, files: list[tuple[bytes, str]]) -> list[torch.Tensor]:
        """Uploads (bytes, safe suffix) -> uint8 (C, S, S) each; ApiError names the failing index.

        A list, not a stacked tensor: the event loop hands it on without calling torch (see Batcher)."""
        images = []
        for i, (data, suffix) in enumerate(files):
            path = self.uploads.write(data, suffix)
            try:
                images.append(self.model.decode(path))
            except ApiError as e:
                raise ApiError(e.status, e.code, f"file {i}: {e.message}") from None
            finally:
                path.unlink(missing_ok=True)
        return images


def _page(cfg: ServeConfig, model: ServedModel) -> str:
    from importlib.resources import files

    html = (files("medxfer.serve") / "page.html").read_text(encoding="utf-8")
    settings = {"auth": cfg.api_key is not None, "max_upload_mb": cfg.max_upload_mb, "max_files": cfg.max_files,
                "accept": model.suffixes()}
    return html.replace("/*MEDXFER_SETTINGS*/{}", json.dumps(settings).replace("<", "\\u003c"))


_PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
             "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}
#: Small PNG uploads (bytes in all, pixels per image from the header) are decoded on the event loop,
#: everything else in a worker thread. A 28 px PNG decodes in about 0.7 ms; handing it to a thread and
#: back cost more than that on 2 cores (bench/bench_serve.py: 297 -> 361 requests/s batched, same run).
#: The pixel bound keeps a small but highly compressed PNG from blocking the loop.
INLINE_DECODE_BYTES = 64 * 1024
INLINE_DECODE_PIXELS = 512 * 512


def cheap_to_decode(files: list[tuple[bytes, str]]) -> bool:
    """True when every upload is a PNG whose header says at most INLINE_DECODE_PIXELS, within INLINE_DECODE_BYTES."""
    if sum(len(data) for data, _ in files) > INLINE_DECODE_BYTES:
        return False
    for data, suffix in files:
        size = png_size(data[:24])
        if suffix != ".png" or size is None or size[0] * size[1] > INLINE_DECODE_PIXELS:
            return False
    return True


# long (75 lines): the routes are closures over one model and batcher; each route is a few lines
def create_app(cfg: ServeConfig, model: ServedModel | None = None) -> Starlette:
    """The ASGI app for ``cfg`` (the model is loaded now, so that a bad run fails before listening)."""
    cfg.check()
    model = model or ServedModel.from_run(cfg.run_dir, cfg.engine, threads=cfg.threads, max_batch=cfg.max_batch)
    svc = Service(cfg, model)
    page = _page(cfg, model)

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"content-security-policy": _PAGE_CSP, "cache-control": "no-cache"})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @api
    async def model_info(request: Request) -> Response:
        info = model.info()
        info["server"] = {"max_upload_mb": cfg.max_upload_mb, "max_files": cfg.max_files,
                          "max_batch": cfg.max_batch, "batch_wait_ms": cfg.batch_wait_ms,
                          "api_key_required": cfg.api_key is not None}
        return JSONResponse(info)

    @api
    async def predict(request: Request) -> Response:
        t0 = time.perf_counter()
        flag = request.query_params.get("explain", "false").strip().lower()
        if flag not in _TRUE | _FALSE:
            raise ApiError(400, "bad_parameter", "explain must be true or false")
        explain = flag in _TRUE
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise ApiError(415, "not_multipart", "send the images as multipart/form-data in the field 'files'")
        files = await _read_uploads(request, svc)
        if cheap_to_decode(files):
            images = svc.decode_all(files)  # about 1 ms: cheaper than a thread hop and its GIL hand-offs
        else:
            images = await anyio.to_thread.run_sync(svc.decode_all, files)
        probs = np.stack(await svc.batcher.submit(images))
        classes = model.predicted(probs)
        pngs = None
        if explain:
            loop = asyncio.get_running_loop()
            pngs = await loop.run_in_executor(svc.executor, lambda: model.explain(torch.stack(images), classes))
        decision = model.decision()
        out = []
        for i, (row, c) in enumerate(zip(probs, classes)):
            item = {"index": i, "probabilities": {lab: float(p) for lab, p in zip(model.labels, row)},
                    "predicted": model.labels[c], "predicted_probability": float(row[c])}
            if model.meta.task == "multilabel":  # every finding at its own threshold; 'predicted': the strongest
                item["findings"] = model.findings(row[None])[0]
            if pngs is not None:
                item["gradcam_png_base64"] = base64.b64encode(pngs[i]).decode("ascii")
            out.append(item)
        log.debug("predict: %d image(s)%s in %.0f ms", len(out), " with Grad-CAM" if explain else "",
                 1000 * (time.perf_counter() - t0))
        return JSONResponse({"model_id": model.model_id, "threshold": decision["threshold"],
                             "positive_label": decision["positive_label"], "decision_rule": decision["rule"],
                             "labels": model.labels, "predictions": out})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await svc.batcher.start()
        app.state.service = svc
        log.info("serving model %s (%s engine, %d classes, %d px) from %s; batching: max %d images, wait %g ms",
                 model.model_id, model.engine, len(model.labels), model.image_size, Path(cfg.run_dir).name,
                 cfg.max_batch, cfg.batch_wait_ms)
        try:
            yield
        finally:
            st = svc.batcher.stats()
            log.info("stopping: %d images predicted in %d model calls (mean batch %.1f)", st["images"], st["calls"],
                     st["mean_batch"])
            await svc.batcher.stop()
            svc.executor.shutdown(wait=False, cancel_futures=True)
            svc.uploads.cleanup()

    routes = [Route("/", index, methods=["GET"]), Route("/healthz", healthz, methods=["GET"]),
              Route("/v1/model", model_info, methods=["GET"]), Route("/v1/predict", predict, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_exception})
    app.state.service = svc
    app.add_middleware(Guard, api_key=cfg.api_key, max_bytes=cfg.max_upload_bytes)
    return app


async def _read_uploads(request: Request, svc: Service) -> list[tuple[bytes, str]]:
    """The multipart field ``files`` -> [(bytes, safe suffix)]; client names are dropped here."""
    from starlette.datastructures import UploadFile

    cfg = svc.cfg
    try:
        form = await request.form(max_files=cfg.max_files, max_fields=64)
    except UploadTooLarge:
        await drain(request.receive, cap=max(4 * cfg.max_upload_bytes, 64 * 2**20))
        raise upload_too_large(cfg.max_upload_bytes) from None
    except HTTPException as e:  # starlette turns multipart errors into HTTP 400
        if "too many files" in str(e.detail).lower():
            raise ApiError(413, "too_many_files", f"too many files: at most {cfg.max_files} per request "
                           "(--max-files)") from None
        raise ApiError(400, "bad_multipart", "malformed multipart body") from None
    try:
        items = form.getlist("files")
        if not items:
            raise ApiError(400, "no_files", "no file uploaded: send one or more images in the multipart field 'files'")
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, UploadFile):
                raise ApiError(400, "not_a_file", f"file {i}: the field 'files' must hold file uploads, not text")
            data = await item.read()
            if not data:
                raise ApiError(400, "empty_file", f"file {i} is empty (0 bytes)")
            suffix = safe_suffix(item.filename, data[:_SNIFF_BYTES], svc.allowed)
            if suffix is None:
                raise ApiError(415, "unsupported_type", f"file {i} is not an image type this server reads "
                               f"(by extension or content); accepted: {' '.join(svc.allowed)}, and DICOM "
                               "without an extension")
            out.append((data, suffix))
        return out
    finally:
        await form.close()


# --------------------------------------------------------------------------------- running
def log_config(level: str = "info") -> dict:
    """uvicorn's logging config plus the ``medxfer.serve`` logger on the same handler."""
    from uvicorn.config import LOGGING_CONFIG

    conf = json.loads(json.dumps(LOGGING_CONFIG))
    conf["loggers"]["medxfer"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return conf


def app_from_env() -> Starlette:
    """App factory for uvicorn worker processes (``--workers N``): the config comes in the environment."""
    cfg = ServeConfig(**json.loads(os.environ[_CONFIG_ENV]))
    return create_app(cfg)


def run(cfg: ServeConfig) -> None:
    """Serve until interrupted (uvicorn)."""
    import uvicorn

    cfg.check()
    common = dict(host=cfg.host, port=int(cfg.port), log_config=log_config(cfg.log_level), log_level=cfg.log_level,
                  server_header=False, forwarded_allow_ips="")
    if cfg.workers > 1:
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        cfg.threads = cfg.threads or max(1, cores // cfg.workers)
        ServedModel.from_run(cfg.run_dir, cfg.engine, threads=1, max_batch=1)  # fail here, not in N workers
        os.environ[_CONFIG_ENV] = json.dumps(asdict(cfg))
        uvicorn.run("medxfer.serve.app:app_from_env", factory=True, workers=cfg.workers, **common)
    else:
        uvicorn.run(create_app(cfg), **common)


class BackgroundServer:
    """uvicorn in a thread on a free loopback port, for tests, benchmarks and notebooks::

        with BackgroundServer(create_app(cfg)) as srv:
            httpx.get(srv.url + "/healthz")
    """

    def __init__(self, app, host: str = "127.0.0.1", log_level: str = "info", access_log: bool = True):
        import socket
        import threading

        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_config=None, log_level=log_level, access_log=access_log,
                                server_header=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="medxfer-serve", daemon=True)

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
