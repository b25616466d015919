"""The HTTP app of ``medxfer serve``: routes, guards (API key, upload size, a memory budget for
decoding), batching, the page. Running it (uvicorn, workers) is :mod:`medxfer.serve.launch`; the
limits on connections (timeouts, head size, connection cap) are :mod:`medxfer.serve.protocol`.

Usage::

    from medxfer.serve.app import ServeConfig, create_app, run

    app = create_app(ServeConfig(run_dir="runs/breast"))   # an ASGI app (Starlette)
    run(ServeConfig(run_dir="runs/breast", port=8000))      # uvicorn; refuses a public host without a key

Routes: ``GET /`` (the page), ``GET /healthz``, ``GET /openapi.json`` (the API's OpenAPI 3.1 description),
``GET /v1/model``, ``POST /v1/predict[?explain=true]`` (images in the multipart field ``files``, or one in ``file``).
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
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import anyio
import numpy as np
import torch
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from medxfer.errors import MedxferError
from medxfer.serve.batching import Batcher
from medxfer.serve.budget import MemoryBudget
from medxfer.serve.errors import ApiError
from medxfer.serve.model import ServedModel
from medxfer.serve.openapi import FIELDS, openapi
from medxfer.serve.protocol import Limits
from medxfer.serve.uploads import UploadDir, png_size, safe_suffix

log = logging.getLogger("medxfer.serve")

_SNIFF_BYTES = 352  # enough for the DICOM preamble (132) and the NIfTI-1 magic (344)


@dataclass
class ServeConfig:
    """Everything ``medxfer serve`` takes; ``api_key`` None means no key (loopback only).

    ``api_key_file``: where the key came from; worker processes read it there themselves, so the
    key never travels through the environment or a command line. The limits against hostile
    clients (timeouts in seconds, sizes in KB / MB) are described in :mod:`medxfer.serve.protocol`
    and :mod:`medxfer.serve.budget`.
    """

    run_dir: str
    engine: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    api_key: str | None = field(default=None, repr=False)
    api_key_file: str | None = None
    max_upload_mb: float = 32.0
    max_files: int = 32
    max_batch: int = 32
    batch_wait_ms: float = 5.0
    threads: int | None = None
    log_level: str = "info"
    header_timeout: float = 10.0
    body_timeout: float = 20.0
    keep_alive: float = 5.0
    max_header_kb: float = 32.0
    max_connections: int = 1000
    max_inflight_mb: float = 512.0
    queue_timeout: float = 10.0
    graceful_timeout: float = 5.0
    worker_timeout: float = 60.0

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def limits(self) -> Limits:
        return Limits(header_timeout=float(self.header_timeout), body_timeout=float(self.body_timeout),
                      max_header_bytes=int(self.max_header_kb * 1024), max_connections=int(self.max_connections))

    def check(self) -> None:
        """Raise MedxferError for values no server can run with."""
        if not 1 <= int(self.port) <= 65535:
            raise MedxferError(f"The 'port' parameter must be between 1 and 65535. Got {self.port} instead.")
        for name in ("workers", "max_files", "max_batch", "max_connections"):
            if int(getattr(self, name)) < 1:
                raise MedxferError(f"The '{name.replace('_', '-')}' parameter must be >= 1. "
                                   f"Got {getattr(self, name)} instead.")
        for name in ("max_upload_mb", "header_timeout", "body_timeout", "keep_alive", "max_header_kb",
                     "max_inflight_mb", "worker_timeout"):
            if not float(getattr(self, name)) > 0:
                raise MedxferError(f"The '{name.replace('_', '-')}' parameter must be > 0. "
                                   f"Got {getattr(self, name)} instead.")
        for name in ("batch_wait_ms", "queue_timeout", "graceful_timeout"):
            if float(getattr(self, name)) < 0:
                raise MedxferError(f"The '{name.replace('_', '-')}' parameter must be >= 0. "
                                   f"Got {getattr(self, name)} instead.")
        if self.api_key is not None and not self.api_key.strip():
            raise MedxferError("the API key is empty. Pass a non-empty --api-key or --api-key-file.")
        check_host(self.host, self.api_key)


def read_key_file(path: str | Path) -> str:
    """The API key in ``path``: its first line, stripped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MedxferError(f"cannot read the API key file '{path}' ({type(e).__name__}).") from None
    key = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not key:
        raise MedxferError(f"the API key file '{path}' is empty.")
    return key


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
    headers = dict(err.headers)
    if err.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="medxfer"'
    return JSONResponse(err.body(), status_code=err.status, headers=headers or None)


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
        except ClientDisconnect:  # a normal event: the answer has nobody to go to
            log.info("%s %s: the client disconnected before its request was read", request.method,
                     request.url.path)
            return error_response(ApiError(400, "client_disconnected", "the client disconnected"))
        except Exception as e:  # noqa: BLE001
            _log_unexpected(f"{request.method} {request.url.path}", e)
            return error_response(ApiError(500, "internal_error", "internal error; the server log has the details"))
    wrapped.__name__ = endpoint.__name__
    return wrapped


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    codes = {404: "not_found", 405: "method_not_allowed"}
    msg = {404: f"no route '{request.url.path}': the routes are GET /, GET /healthz, GET /openapi.json, "
                "GET /v1/model, POST /v1/predict", 405: f"method {request.method} is not allowed on '{request.url.path}'"}
    return error_response(ApiError(exc.status_code, codes.get(exc.status_code, "http_error"),
                                   msg.get(exc.status_code, "request refused")))


# --------------------------------------------------------------------------------- guard middleware
class UploadTooLarge(Exception):
    pass


class Guard:
    """Pure ASGI middleware: security headers everywhere; on ``/v1/*`` the API key and the upload limit.

    Both are checked from the request head, before any of the body is read. An answer that goes out
    before the request's body was read says ``Connection: close``: the server does not read a body it
    has refused (the connection layer, :mod:`medxfer.serve.protocol`, lets the client finish sending
    for a moment so that it can read the answer, then closes).
    """

    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.key_digest = hashlib.sha256(self.key).digest() if self.key else None
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        body_left = headers.get(b"content-length", b"0").strip() not in (b"0", b"") or b"transfer-encoding" in headers
        seen = 0
        tripped = False

        async def limited_receive():
            nonlocal seen, tripped, body_left
            message = await receive()
            if message["type"] == "http.request":
                body_left = bool(message.get("more_body", False))
                if not tripped:
                    seen += len(message.get("body", b""))
                    if seen > self.max_bytes:
                        tripped = True
                        raise UploadTooLarge()
            return message

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                            (b"x-frame-options", b"DENY")]
                if scope["path"].startswith("/v1/"):
                    headers.append((b"cache-control", b"no-store"))
                if body_left:  # answered before the body was read: do not read it
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        if not scope["path"].startswith("/v1/"):
            return await self.app(scope, limited_receive, send_with_headers)
        if self.key is not None:
            err = self._auth_error(headers)
            if err is not None:
                log.info("%s %s -> 401 unauthorized: %s", scope.get("method"), scope["path"], err.message)
                return await error_response(err)(scope, receive, send_with_headers)
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                return await error_response(ApiError(400, "bad_request", "invalid Content-Length header"))(
                    scope, receive, send_with_headers)
            if n > self.max_bytes:
                log.info("%s %s -> 413 upload_too_large (%d bytes declared)", scope.get("method"), scope["path"], n)
                return await error_response(upload_too_large(self.max_bytes))(scope, receive, send_with_headers)
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


# --------------------------------------------------------------------------------- the app
class Service:
    """The state of one server process: the model, its thread, the batcher, the upload folder, the
    memory budget for decoding."""

    def __init__(self, cfg: ServeConfig, model: ServedModel):
        self.cfg = cfg
        self.model = model
        self.allowed = model.suffixes()
        self.uploads = UploadDir()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medxfer-model")
        self.batcher = Batcher(model.predict, max_batch=cfg.max_batch, max_wait_ms=cfg.batch_wait_ms,
                               executor=self.executor)
        self.budget = MemoryBudget(int(cfg.max_inflight_mb * 2**20), wait=cfg.queue_timeout)

    def decode_all(self, files: list[tuple[bytes | BinaryIO, str]]) -> list[torch.Tensor]:
        """Uploads (bytes or binary file, safe suffix) -> uint8 (C, S, S) each; ApiError names the
        failing index. One file at a time: one decoded image in memory at once.

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

    def decode_cost(self, files: list[tuple[BinaryIO, str]]) -> int:
        """Peak bytes of :meth:`decode_all` for these files (the largest one's, from its header)."""
        cost = 0
        for i, (f, suffix) in enumerate(files):
            try:
                cost = max(cost, self.model.decode_cost(f, suffix))
            except ApiError as e:
                raise ApiError(e.status, e.code, f"file {i}: {e.message}") from None
        return cost

    async def decode(self, uploads: list[tuple[UploadFile, str]]) -> list[torch.Tensor]:
        """Decode a request's uploads: small PNGs on the event loop, the rest in a thread within the
        memory budget (ApiError 503 with Retry-After when it stays full for --queue-timeout)."""
        if sum(f.size or 0 for f, _ in uploads) <= INLINE_DECODE_BYTES:
            small = [(await f.read(), suffix) for f, suffix in uploads]
            if cheap_to_decode(small):
                return self.decode_all(small)  # about 1 ms: cheaper than a thread hop and its GIL hand-offs
        files = [(f.file, suffix) for f, suffix in uploads]
        cost = await anyio.to_thread.run_sync(self.decode_cost, files)
        async with self.budget.hold(cost):
            return await anyio.to_thread.run_sync(self.decode_all, files)


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

    schema = openapi(model.labels, model.model_id, cfg.api_key is not None)

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(schema)

    @api
    async def model_info(request: Request) -> Response:
        info = model.info()
        info["server"] = {"max_upload_mb": cfg.max_upload_mb, "max_files": cfg.max_files,
                          "max_batch": cfg.max_batch, "batch_wait_ms": cfg.batch_wait_ms,
                          "max_header_kb": cfg.max_header_kb, "max_inflight_mb": cfg.max_inflight_mb,
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
        async with _uploads(request, svc) as files:
            images = await svc.decode(files)
        probs = np.stack(await svc.batcher.submit(images))
        classes, sets = model.predicted(probs), model.conformal_sets(probs)
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
            if sets is not None:
                item["conformal_set"] = sets[i]
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
        log.info("serving model %s (%s engine, %d classes, %d px) from %s; batching: max %d images, wait %g ms; "
                 "limits: head %g KB in %g s, body pauses %g s, %d connections, %g MB decoding",
                 model.model_id, model.engine, len(model.labels), model.image_size, Path(cfg.run_dir).name,
                 cfg.max_batch, cfg.batch_wait_ms, cfg.max_header_kb, cfg.header_timeout, cfg.body_timeout,
                 cfg.max_connections, cfg.max_inflight_mb)
        try:
            yield
        finally:
            st = svc.batcher.stats()
            log.info("stopping: %d images predicted in %d model calls (mean batch %.1f); decoding memory peak %.0f MB, "
                     "%d requests refused busy", st["images"], st["calls"], st["mean_batch"],
                     svc.budget.peak / 2**20, svc.budget.refused)
            await svc.batcher.stop()
            svc.executor.shutdown(wait=False, cancel_futures=True)
            svc.uploads.cleanup()

    routes = [Route("/", index, methods=["GET"]), Route("/healthz", healthz, methods=["GET"]),
              Route("/v1/model", model_info, methods=["GET"]), Route("/v1/predict", predict, methods=["POST"]),
              Route("/openapi.json", openapi_json, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_exception})
    app.state.service = svc
    app.add_middleware(Guard, api_key=cfg.api_key, max_bytes=cfg.max_upload_bytes)
    return app


@contextlib.asynccontextmanager
async def _uploads(request: Request, svc: Service):
    """The multipart field ``files`` -> [(UploadFile, safe suffix)], open while the block runs; client
    names are dropped here. Parts above 1 MB wait on disk (Starlette's spooling), not in memory."""
    cfg = svc.cfg
    try:
        form = await request.form(max_files=cfg.max_files, max_fields=64)
    except UploadTooLarge:
        raise upload_too_large(cfg.max_upload_bytes) from None
    except HTTPException as e:  # starlette turns multipart errors into HTTP 400
        if "too many files" in str(e.detail).lower():
            raise ApiError(413, "too_many_files", f"too many files: at most {cfg.max_files} per request "
                           "(--max-files)") from None
        raise ApiError(400, "bad_multipart", "malformed multipart body") from None
    try:
        items = [item for name in FIELDS for item in form.getlist(name)]
        if not items:
            raise ApiError(400, "no_files", "no file uploaded: send one or more images in the multipart field 'files' "
                           "(or one in 'file')")
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, UploadFile):
                raise ApiError(400, "not_a_file", f"file {i}: the fields 'files' and 'file' must hold file uploads, "
                               "not text")
            head = await item.read(_SNIFF_BYTES)
            await item.seek(0)
            if not head:
                raise ApiError(400, "empty_file", f"file {i} is empty (0 bytes)")
            suffix = safe_suffix(item.filename, head, svc.allowed)
            if suffix is None:
                raise ApiError(415, "unsupported_type", f"file {i} is not an image type this server reads "
                               f"(by extension or content); accepted: {' '.join(svc.allowed)}, and DICOM "
                               "without an extension")
            out.append((item, suffix))
        yield out
    finally:
        await form.close()


# --------------------------------------------------------------------------------- running
from medxfer.serve.launch import BackgroundServer, log_config, run  # noqa: E402,F401 - the public names, kept here
