"""Running ``medxfer serve``: uvicorn with the guarded connection protocol, in one process or several.

Usage::

    from medxfer.serve.launch import BackgroundServer, run

    run(ServeConfig(run_dir="runs/breast", workers=2, api_key_file="key.txt"))   # until SIGINT / SIGTERM
    with BackgroundServer(create_app(cfg)) as srv:                            # tests, notebooks
        httpx.get(srv.url + "/healthz")

Every server here speaks HTTP through :class:`~medxfer.serve.protocol.GuardedProtocol` with the
limits of its :class:`~medxfer.serve.app.ServeConfig` (timeouts, head size, connection cap).

Several workers (``--workers N``): uvicorn's supervisor starts N processes (spawn) sharing one
socket. Each imports PyTorch and loads the model before it answers the supervisor's first health
check, which takes many seconds on a loaded machine; uvicorn's default wait (5 s) killed every
worker before it was ready, so the wait is ``--worker-timeout``. The configuration reaches the
workers inside the pickled uvicorn config (a pipe), and a key given as ``--api-key-file`` is read
from that file by each worker: the key is in no process's environment (readable in
``/proc/PID/environ``) and on no command line. On SIGTERM the supervisor stops the workers, each
gives its requests in flight ``--graceful-timeout`` seconds, and the command exits.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
from dataclasses import replace

from medxfer.serve.protocol import GuardedProtocol, Limits

log = logging.getLogger("medxfer.serve")
_SPARE_FILES = 256  # open files a server needs besides its connections (model, libraries, uploads)


def log_config(level: str = "info") -> dict:
    """uvicorn's logging config plus the ``medxfer.serve`` logger on the same handler."""
    from uvicorn.config import LOGGING_CONFIG

    conf = json.loads(json.dumps(LOGGING_CONFIG))
    conf["loggers"]["medxfer"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return conf


def uvicorn_config(cfg, app, **overrides):
    """A uvicorn Config for ``cfg`` (a ServeConfig) serving ``app`` through the guarded protocol."""
    import uvicorn

    kwargs = dict(host=cfg.host, port=int(cfg.port), http=GuardedProtocol, ws="none", lifespan="on",
                  log_config=log_config(cfg.log_level), log_level=cfg.log_level, server_header=False,
                  forwarded_allow_ips="", timeout_keep_alive=float(cfg.keep_alive),
                  timeout_graceful_shutdown=float(cfg.graceful_timeout))
    if "timeout_worker_healthcheck" in inspect.signature(uvicorn.Config).parameters:  # uvicorn >= 0.36
        kwargs["timeout_worker_healthcheck"] = float(cfg.worker_timeout)
    kwargs.update(overrides)
    config = uvicorn.Config(app, **kwargs)
    config.medxfer_limits = cfg.limits()  # read by GuardedProtocol; pickled with the config to workers
    return config


class WorkerApp:
    """The app factory of a worker process (picklable): reads the key file, loads the model."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self):
        from medxfer.serve.app import create_app, read_key_file

        cfg = self.cfg
        if cfg.api_key_file and cfg.api_key is None:
            cfg = replace(cfg, api_key=read_key_file(cfg.api_key_file))
        log.info("worker %d: loading the model", os.getpid())
        return create_app(cfg)


def raise_file_limit(connections: int) -> None:
    """Raise this process's open-file limit (soft, up to the hard one) to hold ``connections``."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    want = connections + _SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(hard, want)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warning("the open-file limit (%d) is below --max-connections + %d: connections beyond it are refused "
                    "by the system; raise it (ulimit -n) or lower --max-connections", soft, _SPARE_FILES)


def run(cfg) -> None:
    """Serve ``cfg`` until interrupted (uvicorn; a supervisor and ``cfg.workers`` processes when > 1)."""
    import uvicorn

    from medxfer.serve.app import create_app
    from medxfer.serve.model import ServedModel

    cfg.check()
    raise_file_limit(int(cfg.max_connections))
    if cfg.workers <= 1:
        uvicorn.Server(uvicorn_config(cfg, create_app(cfg))).run()
        return
    from uvicorn.supervisors import Multiprocess

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    cfg = replace(cfg, threads=cfg.threads or max(1, cores // cfg.workers))
    ServedModel.from_run(cfg.run_dir, cfg.engine, threads=1, max_batch=1)  # fail here, not in N workers
    shipped = replace(cfg, api_key=None) if cfg.api_key_file else cfg  # workers read the file themselves
    config = uvicorn_config(cfg, WorkerApp(shipped), factory=True, workers=cfg.workers)
    sock = config.bind_socket()
    log.info("starting %d workers: each imports PyTorch and loads the model (up to --worker-timeout %g s each)",
             cfg.workers, cfg.worker_timeout)
    Multiprocess(config, sockets=[sock]).run()


class BackgroundServer:
    """uvicorn in a thread on a free loopback port, for tests, benchmarks and notebooks::

        with BackgroundServer(create_app(cfg)) as srv:
            httpx.get(srv.url + "/healthz")

    The connection limits come from the app's ServeConfig (``app.state.service.cfg``).
    """

    def __init__(self, app, host: str = "127.0.0.1", log_level: str = "info", access_log: bool = True):
        import socket
        import threading

        import uvicorn

        from medxfer.serve.app import ServeConfig

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        service = getattr(getattr(app, "state", None), "service", None)
        cfg = getattr(service, "cfg", None) or ServeConfig(run_dir="")
        config = uvicorn_config(cfg, app, host=host, log_config=None, log_level=log_level, access_log=access_log)
        self.limits: Limits = config.medxfer_limits
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
