"""MLflow tracking: a finished run's options, curves, results and files in an MLflow store, offline.

Usage::

    from medxfer.tracking import log_run, tracked

    run_id = log_run(Run.load("runs/breast"))                 # a finished run, afterwards (./mlruns)
    run_id = log_run(run, "sqlite:///mlflow.db", experiment="breast", artifacts=False)

    with tracked(uri, "breast", "full-seed0") as t:           # live: epochs while training, results at the end
        t.log_config(cfg)                                     # optional: the options before training starts
        run = train(cfg, handlers=[t.handler])
        t.log_run(run)

    medxfer track runs/breast [--tracking-uri URI] [--experiment NAME] [--no-artifacts]

What is logged
--------------
* params: the run's options, flattened (``optim.lr``, ``data.path``...; values as text, at most 500
  characters), and what they resolved to (``resolved.image_size``, ``resolved.lr``, ``resolved.epochs``,
  ``resolved.source``, ``resolved.source_domain``, ``resolved.arch``);
* per-epoch metrics (step = epoch): every number of history.csv (``train_loss``, ``val_loss``, ``val_auc``,
  ``lr``, ``seconds``...), live from :class:`MLflowHandler` or afterwards from history.csv;
* final metrics: ``val/<name>`` and ``test/<name>`` for each number of metrics.json's val and test results
  (``test/auc``, ``test/auc_ci_low``, ``test/auc_ci_high``, ``test/sensitivity``, ``test/brier``,
  ``test/ece``...), and the run's ``threshold``, ``temperature``, ``best_epoch``, ``epochs_run``, ``train_seconds``;
* tags: ``medxfer.version``, ``medxfer.strategy``, ``medxfer.source``, ``medxfer.weights_sha256`` (first 16
  hex digits of the trained weights; ``medxfer.source_weights_sha256`` for the source's), ``medxfer.run_dir``;
* files: config.yaml, model.json, metrics.json, history.csv, report.html, model_card.md (written from the run
  when the run has none) and, with ``artifacts`` (the default), the model files model.safetensors and
  model.onnx when present. predictions.csv, split.csv and paths.csv (sample and patient ids) are never sent.

The store
---------
Default: the local folder ``./mlruns`` as an absolute ``file:`` URI (``$MLFLOW_TRACKING_URI`` when set).
A plain folder path is taken as a file store too; ``sqlite:///file.db`` needs ``sqlalchemy`` and ``alembic``
(the full ``mlflow`` package has them); ``http(s)://`` is a tracking server. MLflow 3 keeps its file store
in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE=true``: medxfer sets it for file stores (unless the
environment says otherwise). MLflow's usage telemetry is switched off (``MLFLOW_DISABLE_TELEMETRY=true``
unless set): with a local store nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import importlib.metadata
import logging
import math
import os
import re
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch

from medxfer import files
from medxfer.config import TrainConfig
from medxfer.engine.loop import Handler, Loop
from medxfer.errors import MedxferError
from medxfer.evaluation.card import CARD_FILE, card_text
from medxfer.runs import Run

__all__ = ["DEFAULT_STORE", "MLflowHandler", "Tracking", "config_params", "final_metrics", "log_run",
           "resolve_tracking_uri", "run_params", "run_tags", "store_location", "tracked", "tracking_for"]

log = logging.getLogger(__name__)
DEFAULT_STORE = "mlruns"
MAX_PARAM_LENGTH = 500           # the limit of older MLflow servers (6000 now): every store takes the values
RECORD_FILES = ("config.yaml", "model.json", "metrics.json", "history.csv", "report.html")
MODEL_FILES = ("model.safetensors", "model.onnx")
_BATCH = 100                     # MLflow: at most 100 params or tags (1000 metrics) per log_batch


# ------------------------------------------------------------------------------------------ the store
def _mlflow():
    """Import MLflow with its telemetry off (no network from a local store); one clear line when missing."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow
        from mlflow.tracking import MlflowClient  # noqa: F401
    except ImportError:
        raise MedxferError("MLflow tracking needs the 'mlflow-skinny' package (or 'mlflow'): "
                           "pip install mlflow-skinny") from None
    return mlflow


def _has_scheme(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return len(scheme) > 1  # 'C:' is a Windows drive, not a scheme


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The store's URI: ``uri``, else ``$MLFLOW_TRACKING_URI``, else ``./mlruns``; a folder path or a relative
    ``file:`` URI becomes an absolute ``file:`` URI (so the store does not move with the working folder)."""
    uri = str(uri) if uri else (os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_STORE)
    if not _has_scheme(uri):
        return Path(uri).expanduser().resolve().as_uri()
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        path = unquote(parsed.path) if parsed.netloc in ("", "localhost") else unquote(parsed.netloc + parsed.path)
        return Path(path or DEFAULT_STORE).expanduser().resolve().as_uri()
    if parsed.scheme == "sqlite":
        try:
            import alembic  # noqa: F401
            import sqlalchemy  # noqa: F401
        except ImportError:
            raise MedxferError(f"the tracking URI '{uri}' is an SQLite store, which needs the 'sqlalchemy' and "
                               "'alembic' packages (pip install sqlalchemy alembic, or the full mlflow). A folder "
                               "(e.g. --tracking-uri mlruns) needs nothing more.") from None
        rest = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if rest and not rest.startswith("/") and rest != ":memory:":  # sqlite:///rel.db -> sqlite:////abs/rel.db
            return "sqlite:///" + str(Path(rest).expanduser().resolve())
    return uri


def store_location(uri: str) -> str:
    """Where the store is, for people: the folder of a file store, else the URI."""
    parsed = urlparse(uri)
    return unquote(parsed.path) if parsed.scheme == "file" else uri


def _client(uri: str | None):
    uri = resolve_tracking_uri(uri)
    if urlparse(uri).scheme == "file":
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    _mlflow()
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri=uri), uri
    except Exception as e:  # noqa: BLE001 - MLflow raises its own types for a bad store
        raise MedxferError(f"cannot open the MLflow store '{uri}' ({_reason(e)}).") from None


def _reason(e: Exception) -> str:
    msg = getattr(e, "message", None) or str(e) or type(e).__name__
    return msg.strip().splitlines()[0][:300]


def _experiment_id(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # made by another process meanwhile
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise MedxferError(f"the MLflow experiment '{name}' was deleted in this store: restore it "
                           f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or choose another "
                           "--experiment.")
    return exp.experiment_id


# ------------------------------------------------------------------------------------------ what is logged
def _version() -> str:
    try:
        return importlib.metadata.version("medxfer")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _text(v) -> str:
    if isinstance(v, (list, tuple)):
        v = ",".join(map(str, v))
    s = str(v)
    return s if len(s) <= MAX_PARAM_LENGTH else s[:MAX_PARAM_LENGTH - 3] + "..."


def _safe(name: str) -> str:
    """A name MLflow takes as a metric key (alphanumerics, _ - . and spaces)."""
    return re.sub(r"[^\w.\- ]", "_", str(name)).strip(". ") or "_"


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "item"):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def config_params(cfg: TrainConfig) -> dict[str, str]:
    """A config's options, flattened (``optim.lr``), values as text of at most 500 characters."""
    return {k: _text(v) for k, v in files.flatten(cfg.to_dict()).items()}


def run_params(run: Run) -> dict[str, str]:
    """The run's options (flattened) and what they resolved to, as MLflow params."""
    params = config_params(run.config)
    res, src = run.resolved, run.resolved.get("source") or {}
    extra = {"resolved.image_size": res.get("image_size", run.model.image_size), "resolved.lr": res.get("lr"),
             "resolved.epochs": res.get("epochs"), "resolved.source": src.get("name", run.model.source),
             "resolved.source_domain": src.get("domain"), "resolved.arch": src.get("arch", run.model.arch)}
    params.update({k: _text(v) for k, v in extra.items() if v is not None})
    return params


def run_tags(run: Run) -> dict[str, str]:
    src = run.resolved.get("source") or {}
    tags = {"medxfer.version": _version(), "medxfer.strategy": run.config.optim.strategy,
            "medxfer.source": str(run.metrics.get("source") or src.get("name") or run.model.source),
            "medxfer.arch": run.model.arch, "medxfer.labels": ",".join(map(str, run.model.labels)),
            "medxfer.run_dir": str(Path(run.dir).resolve())}
    if run.model.weights_sha256:
        tags["medxfer.weights_sha256"] = run.model.weights_sha256[:16]
    if src.get("weights_sha256"):
        tags["medxfer.source_weights_sha256"] = str(src["weights_sha256"])[:16]
    if run.model.positive_label:
        tags["medxfer.positive_label"] = str(run.model.positive_label)
    return tags


def final_metrics(run: Run) -> dict[str, float]:
    """``val/<name>``, ``test/<name>`` (intervals as ``_ci_low``/``_ci_high``, one level of dicts as
    ``name.key``) and the run's top-level numbers, finite values only."""
    out: dict[str, float] = {}
    for split in ("val", "test"):
        for k, v in (run.metrics.get(split) or {}).items():
            if k.endswith("_ci") and isinstance(v, (list, tuple)) and len(v) == 2:
                for end, x in zip(("low", "high"), v):
                    if _number(x) is not None:
                        out[f"{split}/{_safe(k)}_{end}"] = _number(x)
            elif isinstance(v, dict):
                for kk, vv in v.items():
                    if _number(vv) is not None:
                        out[f"{split}/{_safe(k)}.{_safe(kk)}"] = _number(vv)
            elif _number(v) is not None:
                out[f"{split}/{_safe(k)}"] = _number(v)
    for k, v in run.metrics.items():
        if k not in ("val", "test", "seed", "patience", "processes") and _number(v) is not None:
            out[_safe(k)] = _number(v)
    return out


def _epoch_metrics(record: dict) -> dict[str, float]:
    return {_safe(k): _number(v) for k, v in record.items() if k != "epoch" and _number(v) is not None}


def _log_batch(client, run_id: str, metrics=(), params=None, tags=None) -> None:
    from mlflow.entities import Param, RunTag

    params = [Param(k, v) for k, v in (params or {}).items()]
    tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    metrics = list(metrics)
    for i in range(0, len(params), _BATCH):
        client.log_batch(run_id, params=params[i:i + _BATCH])
    for i in range(0, len(tags), _BATCH):
        client.log_batch(run_id, tags=tags[i:i + _BATCH])
    for i in range(0, len(metrics), 10 * _BATCH):
        client.log_batch(run_id, metrics=metrics[i:i + 10 * _BATCH])


def _metric(key: str, value: float, ms: int, step: int = 0):
    from mlflow.entities import Metric

    return Metric(key, value, ms, step)


def _times(run: Run) -> tuple[int, int]:
    """(start, end) of the training in ms: metrics.json's write time minus the run's total seconds."""
    try:
        end = (Path(run.dir) / "metrics.json").stat().st_mtime
    except OSError:
        end = time.time()
    total = _number(run.metrics.get("total_seconds")) or _number(run.metrics.get("train_seconds")) or 0.0
    return int((end - total) * 1000), int(end * 1000)


def _new_params(client, run_id: str, params: dict[str, str]) -> dict[str, str]:
    """The params the MLflow run does not hold yet (MLflow refuses to change one; a value that changed since
    :meth:`Tracking.log_config` is kept as first logged, with a warning)."""
    held = client.get_run(run_id).data.params
    changed = sorted(k for k, v in params.items() if k in held and held[k] != v)
    if changed:
        log.warning("MLflow: param %s changed during the run (%r -> %r); the first value is kept", changed[0],
                    held[changed[0]], params[changed[0]])
    return {k: v for k, v in params.items() if k not in held}


def _log_results(client, run_id: str, run: Run, artifacts: bool, skip_epochs=frozenset()) -> None:
    start, end = _times(run)
    metrics = []
    if run.history is not None and "epoch" in run.history:
        elapsed = 0.0
        for record in run.history.to_dict("records"):
            elapsed += _number(record.get("seconds")) or 0.0
            epoch = int(record["epoch"])
            if epoch in skip_epochs:
                continue
            ms = min(end, start + int(elapsed * 1000))
            metrics += [_metric(k, v, ms, epoch) for k, v in _epoch_metrics(record).items()]
    metrics += [_metric(k, v, end) for k, v in final_metrics(run).items()]
    _log_batch(client, run_id, metrics, _new_params(client, run_id, run_params(run)), run_tags(run))
    d = Path(run.dir)
    for name in RECORD_FILES + (MODEL_FILES if artifacts else ()):
        if (d / name).is_file():
            client.log_artifact(run_id, str(d / name))
    if (d / CARD_FILE).is_file():
        client.log_artifact(run_id, str(d / CARD_FILE))
    else:
        client.log_text(run_id, card_text(run), CARD_FILE)


def log_run(run: Run | str | Path, tracking_uri: str | None = None, experiment: str = "medxfer",
            artifacts: bool = True, run_name: str | None = None, *, run_id: str | None = None,
            _skip_epochs=frozenset()) -> str:
    """Log a finished run to MLflow; returns the MLflow run id.

    A new MLflow run named ``run_name`` (default: the run folder's name) in ``experiment`` is made, with the
    training's start and end times; with ``run_id`` the results go into that existing MLflow run instead
    (what :func:`tracked` does). ``artifacts``: also upload the model files (weights, ONNX).
    """
    run = run if isinstance(run, Run) else Run.load(run)
    client, uri = _client(tracking_uri)
    try:
        if run_id is not None:
            _log_results(client, run_id, run, artifacts, _skip_epochs)
            return run_id
        start, end = _times(run)
        mrun = client.create_run(_experiment_id(client, experiment), start_time=start,
                                 run_name=run_name or Path(run.dir).name, tags=_base_tags())
        new_id = mrun.info.run_id
        try:
            _log_results(client, new_id, run, artifacts)
        except BaseException:
            client.set_terminated(new_id, "FAILED")
            raise
        client.set_terminated(new_id, "FINISHED", end_time=max(end, start))
        return new_id
    except MedxferError:
        raise
    except Exception as e:  # noqa: BLE001 - a store that refuses is one line, not a traceback
        raise MedxferError(f"cannot log '{run.dir}' to the MLflow store {store_location(uri)} ({_reason(e)}).") from e


def _base_tags() -> dict[str, str]:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = "unknown"
    return {"mlflow.user": user, "mlflow.source.type": "LOCAL", "mlflow.source.name": "medxfer",
            "medxfer.version": _version()}


# ------------------------------------------------------------------------------------------ live
def _main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_rank() != 0)


class MLflowHandler(Handler):
    """Logs each epoch's record (train loss, validation loss and AUC, learning rate, seconds...) to the MLflow
    run ``run_id`` as it ends (step = epoch). Only the main process logs under DDP. A store that fails is
    reported once as a warning and logging stops: tracking never ends a training."""

    def __init__(self, run_id: str | None, tracking_uri: str | None = None, *, client=None, enabled: bool = True):
        self.run_id, self.enabled = run_id, enabled and run_id is not None
        self.client = client if client is not None or not self.enabled else _client(tracking_uri)[0]
        self.logged: set[int] = set()

    def on_epoch_end(self, loop: Loop, record: dict) -> None:
        if not self.enabled or not _main_process():
            return
        epoch, ms = int(record["epoch"]), int(time.time() * 1000)
        try:
            _log_batch(self.client, self.run_id, [_metric(k, v, ms, epoch) for k, v in _epoch_metrics(record).items()])
            self.logged.add(epoch)
        except Exception as e:  # noqa: BLE001 - the training goes on without tracking
            log.warning("MLflow: epoch %d not logged (%s); tracking stops for this run", epoch, _reason(e))
            self.enabled = False


@dataclasses.dataclass
class Tracking:
    """An open MLflow run (from :func:`tracked`): ``handler`` for the training loop, ``log_run(run)`` for the
    results. Disabled (``run_id`` None) everything is a no-op."""

    client: object
    uri: str | None
    run_id: str | None
    experiment: str
    artifacts: bool = True
    handler: MLflowHandler = None

    def __post_init__(self):
        if self.handler is None:
            self.handler = MLflowHandler(self.run_id, client=self.client, enabled=self.run_id is not None)

    def log_config(self, cfg: TrainConfig) -> None:
        """Log the options as params now, before training (so that a run that fails still shows them)."""
        if self.run_id is not None:
            try:
                _log_batch(self.client, self.run_id, params=_new_params(self.client, self.run_id, config_params(cfg)))
            except Exception as e:  # noqa: BLE001 - the training goes on without tracking
                log.warning("MLflow: options not logged (%s)", _reason(e))

    @property
    def store(self) -> str | None:
        return store_location(self.uri) if self.uri else None

    def log_files(self, paths) -> None:
        """Attach files that are not a training run's (a pretrained source's source.json...)."""
        if self.run_id is None:
            return
        try:
            for path in paths:
                if Path(path).is_file():
                    self.client.log_artifact(self.run_id, str(path))
        except Exception as e:  # noqa: BLE001 - the files on disk are complete either way
            log.warning("MLflow: files not logged (%s)", _reason(e))


    def log_run(self, run: Run | str | Path | None) -> str | None:
        """Attach the finished run's params, results and files to this MLflow run (the epochs the handler
        logged are not logged twice). A failure is a warning: the run on disk is complete either way."""
        if self.run_id is None or run is None:
            return None
        try:
            return log_run(run, self.uri, self.experiment, self.artifacts, run_id=self.run_id,
                           _skip_epochs=frozenset(self.handler.logged))
        except MedxferError as e:
            log.warning("%s Retry with: medxfer track RUN --tracking-uri %s", e, self.uri)
            return None


@contextlib.contextmanager
def tracked(tracking_uri: str | None = None, experiment: str = "medxfer", name: str | None = None, *,
            artifacts: bool = True, enabled: bool = True, run_id: str | None = None):
    """Open an MLflow run for a training and close it after: FINISHED, or FAILED (KILLED on Ctrl-C) when the
    block raises. ``run_id`` continues an existing MLflow run (a resumed training); ``enabled=False`` (other
    DDP processes, tracking not asked for) gives a no-op :class:`Tracking`.

    Usage::

        with tracked(uri, experiment, name) as t:
            run = train(cfg, handlers=[t.handler])
            t.log_run(run)
    """
    if not enabled:
        yield Tracking(None, None, None, experiment, artifacts)
        return
    client, uri = _client(tracking_uri)
    try:
        if run_id is None:
            run_id = client.create_run(_experiment_id(client, experiment), run_name=name,
                                       tags=_base_tags()).info.run_id
        else:
            client.update_run(run_id, status="RUNNING")
    except MedxferError:
        raise
    except Exception as e:  # noqa: BLE001
        raise MedxferError(f"cannot open an MLflow run in {store_location(uri)} ({_reason(e)}).") from e
    status = "FAILED"
    try:
        yield Tracking(client, uri, run_id, experiment, artifacts)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            client.set_terminated(run_id, status)
        except Exception as e:  # noqa: BLE001 - never hide the block's own error
            log.warning("MLflow: run %s not closed (%s)", run_id, _reason(e))


def tracking_for(cfg, name: str | None = None):
    """:func:`tracked` as the options ``--track/--tracking-uri/--experiment`` of ``cfg.runtime`` ask (a no-op
    without ``--track``, and in every DDP process but the first)."""
    rt = cfg.runtime
    main = int(os.environ.get("RANK", "0")) == 0
    return tracked(rt.tracking_uri, rt.experiment, name or Path(rt.out).name, enabled=bool(rt.track) and main)
