"""``medxfer serve RUN``: HTTP inference server (JSON API + a page), see :mod:`medxfer.serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medxfer.commands.base import command
from medxfer.errors import MedxferError


def read_key(api_key: Optional[str], api_key_file: Optional[Path]) -> Optional[str]:
    """The API key from --api-key or --api-key-file (first line, stripped); None when neither."""
    if api_key is not None and api_key_file is not None:
        raise MedxferError("pass either --api-key or --api-key-file, not both.")
    if api_key_file is not None:
        from medxfer.serve.app import read_key_file   # here, not at import: 'serve --help' needs no torch

        return read_key_file(api_key_file)
    if api_key is not None and not api_key.strip():
        raise MedxferError("the API key is empty. Pass a non-empty --api-key or --api-key-file.")
    return api_key.strip() if api_key is not None else None


def register(app: typer.Typer) -> None:
    @command(app, "serve")
    def serve(
        run_dir: Path = typer.Argument(..., help="A run directory from 'medxfer train'."),
        host: str = typer.Option("127.0.0.1", help="Address to listen on. Anything but loopback needs an API key."),
        port: int = typer.Option(8000),
        engine: str = typer.Option("auto", help="onnx | torch | auto (onnx when RUN/model.onnx exists; "
                                                "make it with 'medxfer export RUN')."),
        workers: int = typer.Option(1, help="Server processes (each loads the model and batches on its own)."),
        num_threads: Optional[int] = typer.Option(None, "--num-threads", min=1,
                                                  help="CPU threads for the model in each process.",
                                                  show_default="PyTorch's"),
        api_key: Optional[str] = typer.Option(None, help="Require this key on /v1/* (visible in 'ps': prefer "
                                                         "--api-key-file)."),
        api_key_file: Optional[Path] = typer.Option(None, help="File whose first line is the API key (each worker "
                                                               "reads it; it never enters the environment)."),
        max_upload_mb: float = typer.Option(32.0, help="Largest request body, in MB (413 above)."),
        max_files: int = typer.Option(32, help="Most files in one request."),
        max_batch: int = typer.Option(32, help="Most images in one model call (batched across requests)."),
        batch_wait_ms: float = typer.Option(5.0, help="How long a batch waits for more images, in ms."),
        batching: bool = typer.Option(True, "--batching/--no-batching",
                                      help="--no-batching: one model call per image (max batch 1)."),
        header_timeout: float = typer.Option(10.0, help="Seconds from connecting (or the last answer) to the end of "
                                                        "the request head; then the connection is closed (408)."),
        body_timeout: float = typer.Option(20.0, help="Longest pause, in seconds, while a request body arrives "
                                                      "(408 and close)."),
        keep_alive: float = typer.Option(5.0, help="Seconds an idle connection is kept between requests."),
        max_header_kb: float = typer.Option(32.0, help="Largest request head (request line and headers), in KB "
                                                       "(431 above)."),
        max_connections: int = typer.Option(1000, help="Connections held at once per process; above it the one "
                                                       "waiting longest for a request is closed."),
        max_inflight_mb: float = typer.Option(512.0, help="Memory for images being decoded at once per process, "
                                                           "in MB (estimated from each file's header); requests "
                                                           "beyond it wait."),
        queue_timeout: float = typer.Option(10.0, help="Seconds a request waits for --max-inflight-mb; then 503 "
                                                       "with Retry-After."),
        graceful_timeout: float = typer.Option(5.0, help="Seconds requests in flight get to finish on SIGTERM."),
        worker_timeout: float = typer.Option(60.0, help="Seconds a worker (--workers > 1) may take to start and to "
                                                        "answer a health check before it is restarted."),
        log_level: str = typer.Option("info", help="critical | error | warning | info | debug."),
    ):
        """Serve a run over HTTP: POST /v1/predict, GET /v1/model, GET /healthz, and a page at /."""
        from medxfer.serve.app import ServeConfig, run   # here, not at import: 'serve --help' needs no torch

        key = read_key(api_key, api_key_file)
        cfg = ServeConfig(run_dir=str(run_dir), engine=engine, host=host, port=port, workers=workers, api_key=key,
                          threads=num_threads,
                          api_key_file=str(api_key_file) if api_key_file is not None else None,
                          max_upload_mb=max_upload_mb, max_files=max_files,
                          max_batch=max_batch if batching else 1, batch_wait_ms=batch_wait_ms if batching else 0.0,
                          log_level=log_level.lower(), header_timeout=header_timeout, body_timeout=body_timeout,
                          keep_alive=keep_alive, max_header_kb=max_header_kb, max_connections=max_connections,
                          max_inflight_mb=max_inflight_mb, queue_timeout=queue_timeout,
                          graceful_timeout=graceful_timeout, worker_timeout=worker_timeout)
        cfg.check()  # refuse a public host without a key before loading anything
        run(cfg)
