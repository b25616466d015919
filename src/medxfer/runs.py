"""The run directory: written atomically, read back alone as one typed record.

Layout::

    config.yaml        the options (TrainConfig, nested) and what they resolved to (``resolved:``)
    model.json         what rebuilds the model (ModelMeta): architecture, labels, channels, mean/std, size,
                       temperature, threshold, task, SHA-256 of the weights and of any export
    model.safetensors  trained weights
    metrics.json       {"val": {...}, "test": {...}, "train_seconds": ...}
    history.csv        one row per epoch
    predictions.csv    split, sample_id, label, prob_<class>... (val and test, calibrated)
    split.csv          sample_id, split, label (the split used)
    train.log          what the run said while it ran
    skipped.csv        sample_id, reason (only with --on-bad-file skip and skipped samples)
    duplicates.csv     images found in more than one split and what was done with them
    paths.csv          sample_id -> file (only with --keep-paths: file names can hold patient names)
    check_images.safetensors  the first test images as training prepared them (export's parity check)
    files.sha256       the SHA-256 of every file above that the run's answers depend on (config, model, weights,
                       metrics, tables, exports), written last before the run is moved into place

Usage::

    run = Run.load("runs/breast")          # refuses an unfinished, damaged or edited run with one line
    run.config.optim.strategy, run.model.labels, run.metrics["test"]["auc"], run.predictions
    is_finished("runs/breast")             # the one definition of a finished run

A run is written into ``OUT.partial/`` (the epoch loop's ``checkpoint.pt`` lives there while it is
unfinished, for ``--resume``) and moved into place when complete: ``OUT`` is always either the
previous complete run or the new complete run, never a mix (Linux: one atomic exchange of the two
folders). An exclusive lock on ``OUT`` stops two runs from writing it at once; only its holder removes or swaps
the staging folder.

Every reader goes through :meth:`Run.load`: the files are checked against ``files.sha256`` (the weights and
exports when they are opened), and every value read back is range-checked, so an edited ``model.json``
(swapped labels, another threshold) is refused, never used. A run of an earlier release (no record) loads
with a one-line warning. Runs are written by :mod:`medxfer.run_writer` alone (model.json included); it amends a
finished run only under the run's lock (:func:`amend`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import logging
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from medxfer import files
from medxfer.config import TrainConfig
from medxfer.errors import MedxferError
from medxfer.files import fsync_dir, read_json, read_yaml, sha256_file, verify_file, write_error
from medxfer.data.augment import TTA
from medxfer.run_values import check_members, check_meta, check_metrics, check_table
from medxfer.models.adapt import load_weights, target_model
from medxfer.models.ensemble import EnsembleNet

CHECKPOINT = "checkpoint.pt"
#: what a finished run directory always holds (one definition for every command)
FINISHED_FILES = ("config.yaml", "model.json", "model.safetensors", "metrics.json", "predictions.csv", "split.csv")
TABLES = ("history", "predictions", "split", "skipped", "duplicates")
RECORD = files.HASHES
EXPORTS = ("model.onnx", "model.torchscript.pt")
#: the first test images (as training prepared them; test rows of predictions.csv in order), kept with the run so
#: that export checks its parity from the run directory alone
CHECK_IMAGES = "check_images.safetensors"
#: every file a run's answers depend on: each one present is in files.sha256
RECORDED = (*FINISHED_FILES, *(f"{t}.csv" for t in TABLES if f"{t}.csv" not in FINISHED_FILES), *EXPORTS,
            CHECK_IMAGES)
#: large files, checked against the record when they are opened (load_model, the ONNX engine), not at every load
OPENED_LATER = ("model.safetensors", *EXPORTS, CHECK_IMAGES)
log = logging.getLogger(__name__)
_WARNED: set[str] = set()


def is_finished(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds a complete run (every file of :data:`FINISHED_FILES`)."""
    run_dir = Path(run_dir)
    return run_dir.is_dir() and all((run_dir / n).is_file() for n in FINISHED_FILES)


@dataclass(frozen=True)
class ModelMeta:
    """model.json: what rebuilds the model and applies it exactly as training did."""

    arch: str
    labels: list[str]
    in_chans: int
    data_chans: int
    image_size: int
    mean: list[float]
    std: list[float]
    source: str = ""
    grey_mode: str = "sum"
    read: dict = field(default_factory=dict)
    temperature: float | list[float] = 1.0       # multilabel: one per finding
    threshold: float | list[float] | None = None  # binary: on P(positive); multilabel: one per finding
    positive_label: str | None = None
    task: str = ""                                # binary | multiclass | multilabel | ordinal ("": by labels)
    spatial_dims: int = 2                         # 3: volumes (N, C, S, S, S) into an inflated 3-D network
    inflate: str | None = None                    # how the 2-D source became 3-D: i3d | acs
    strategy: str = ""
    input: str = "float32 (N, C, S, S) in [0, 1]; normalisation is inside the model"
    weights_sha256: str | None = None
    onnx_sha256: str | None = None
    torchscript_sha256: str | None = None
    tta: int = 1                                  # test-time augmentation views (the model averages their logits)
    tta_hflip: bool = False                       # mirrored views allowed
    input_dtype: str | None = None                # the training images' stored type (uint8, uint16, float32...);
    #                                               None: a run of an earlier release (unknown)
    conformal: dict | None = None                 # the conformal record calibrated on validation (trust.conformal);
    #                                               None: --conformal 0, or a run of an earlier release
    prior: list[float] | None = None              # the validation class mix (single-label): predict --adapt-prior
    extra: dict = field(default_factory=dict)    # keys of later versions, kept as they are

    @property
    def is_ensemble(self) -> bool:
        return self.arch == "ensemble"

    @property
    def members(self) -> list[dict]:
        """An ensemble's members: arch, labels, channels, mean/std, size, temperature, tta, weight."""
        return list(self.extra.get("members") or [])

    @property
    def outputs(self) -> int:
        """The network's outputs: one per class or finding; K-1 conditional logits for K ordinal grades (CORN)."""
        return len(self.labels) - (1 if self.task == "ordinal" else 0)

    @property
    def positive_index(self) -> int | None:
        if len(self.labels) == 2 and self.positive_label in self.labels:
            return self.labels.index(self.positive_label)
        return None

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d: dict, where: str = "model.json") -> ModelMeta:
        """model.json's values, each range-checked: a value medxfer cannot use is one MedxferError naming it."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        needed = ("arch", "labels", "in_chans", "data_chans", "image_size", "mean", "std")
        if not isinstance(d, dict) or any(k not in d for k in needed):
            raise MedxferError(f"'{where}' is damaged: it lacks the model's architecture, labels or input contract. "
                               "Train the run again.")
        known = check_meta({k: v for k, v in d.items() if k in names}, where)
        if known["arch"] == "ensemble":
            check_members(d, where, len(known["labels"]), known["task"])
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})

    def replace(self, **kw) -> ModelMeta:
        return dataclasses.replace(self, **kw)


@dataclass
class Run:
    """A finished run directory, read back: options, model metadata, metrics and tables."""

    dir: Path
    config: TrainConfig
    resolved: dict
    model: ModelMeta
    metrics: dict
    history: pd.DataFrame | None = None
    predictions: pd.DataFrame | None = None
    split: pd.DataFrame | None = None
    skipped: pd.DataFrame | None = None
    duplicates: pd.DataFrame | None = None
    record: dict | None = None                    # files.sha256 ({name: SHA-256}); None: a run of an earlier release

    @classmethod
    def load(cls, run_dir: str | Path) -> Run:
        """Read ``run_dir``; an unfinished, damaged, edited or foreign folder is one clear MedxferError. Every
        reader of a run (predict, report, export, explain, serve, ensemble, auto, the card) comes through here."""
        run_dir = Path(run_dir)
        if not is_finished(run_dir):
            missing = [n for n in FINISHED_FILES if not (run_dir / n).is_file()]
            partial = " (an unfinished run: see OUT.partial and --resume)" if (
                run_dir.with_name(run_dir.name + ".partial").is_dir()) else ""
            raise MedxferError(f"'{run_dir}' is not a finished run directory (missing {', '.join(missing)}){partial}. "
                               "Train one with 'medxfer train ... --out DIR'.")
        record = check_record(run_dir)
        raw_meta = read_json(run_dir / "model.json", "model.json")
        if record is None:
            _unrecorded(run_dir, raw_meta)
        raw = read_yaml(run_dir / "config.yaml", "config.yaml") or {}
        if not isinstance(raw, dict):
            raise MedxferError(f"'{run_dir / 'config.yaml'}' is damaged: not a mapping. Train the run again.")
        resolved = raw.get("resolved") or {}
        if not isinstance(resolved, dict):
            raise MedxferError(f"'{run_dir / 'config.yaml'}' is damaged: 'resolved' is not a mapping. Train the run "
                               "again.")
        run = cls(dir=run_dir, config=TrainConfig.from_dict(raw, f"'{run_dir / 'config.yaml'}'"), resolved=resolved,
                  model=ModelMeta.from_dict(raw_meta, str(run_dir / "model.json")),
                  metrics=check_metrics(read_json(run_dir / "metrics.json", "metrics.json"),
                                        str(run_dir / "metrics.json")),
                  record=record)
        for name in TABLES:
            f = run_dir / f"{name}.csv"
            try:
                table = pd.read_csv(f, dtype={"sample_id": str, "label": str}) if f.exists() else None
            except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
                raise MedxferError(f"'{f}' is damaged ({type(e).__name__}); train the run again.") from None
            if table is not None:
                check_table(name, table, f, [str(c) for c in run.model.labels])
            setattr(run, name, table)
        return run

    def verify(self, name: str, what: str = "run") -> None:
        """Refuse ``name`` (weights, an export) when its SHA-256 differs from the one recorded when it was written
        (files.sha256; model.json's for a run of an earlier release)."""
        path = self.dir / name
        if self.record is None or name not in self.record:
            legacy = {"model.safetensors": self.model.weights_sha256, "model.onnx": self.model.onnx_sha256,
                      "model.torchscript.pt": self.model.torchscript_sha256}
            verify_file(path, legacy.get(name), what)
            return
        if not path.is_file():
            raise MedxferError(f"'{path}' is missing from the run; train it again.")
        if sha256_file(path) != self.record[name]:
            raise MedxferError(f"'{path}' is damaged or was replaced: its SHA-256 differs from the one recorded in "
                               f"{RECORD} when the {what} was written. Train the run again (or restore the file).")

    def verify_weights(self) -> None:
        """Refuse weights whose SHA-256 differs from the one recorded when they were written."""
        self.verify("model.safetensors")

    @property
    def test_predictions(self) -> pd.DataFrame:
        p = self.predictions
        return p[p["split"] == "test"].reset_index(drop=True)

    @property
    def image_size(self) -> int:
        return int(self.model.image_size)

    def check_images(self) -> torch.Tensor | None:
        """The first test images kept with the run (:data:`CHECK_IMAGES`), checked against the record; None for a
        run written without them (an earlier release)."""
        if not (self.dir / CHECK_IMAGES).is_file():
            return None
        self.verify(CHECK_IMAGES, "run")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(self.dir / CHECK_IMAGES))["images"]
        except (SafetensorError, KeyError, OSError) as e:
            raise MedxferError(f"'{self.dir / CHECK_IMAGES}' is damaged ({type(e).__name__}); train the run "
                               "again.") from None

    def weights_digest(self) -> str:
        return self.model.weights_sha256 or sha256_file(self.dir / "model.safetensors")

    def load_model(self, tta: bool = True) -> torch.nn.Module:
        """The trained model (eval mode), its weights checked against model.json's SHA-256; with the run's
        test-time augmentation around it (``tta=False``: the bare network, e.g. for Grad-CAM)."""
        self.verify_weights()
        m = self.model
        if m.is_ensemble:
            net = load_weights(ensemble_net(m), self.dir / "model.safetensors")
            for i, mm in enumerate(m.members):  # each member with its own test-time augmentation
                if tta and mm.get("tta", 1) > 1:
                    net.members[i] = TTA(net.members[i], mm["tta"], hflip=mm.get("tta_hflip", False))
            return net.eval()
        model = load_weights(target_model(m.arch, m.outputs, m.in_chans, m.mean, m.std, m.data_chans,
                                          m.spatial_dims, m.inflate or "i3d"),
                             self.dir / "model.safetensors")
        return TTA(model, m.tta, hflip=m.tta_hflip).eval() if tta and m.tta > 1 else model


def ensemble_net(meta: ModelMeta) -> EnsembleNet:
    """The network of an ensemble run from its model.json (random weights; the members bare, without TTA)."""
    nets = [target_model(mm["arch"], meta.outputs, mm["in_chans"], mm["mean"], mm["std"], mm["data_chans"],
                         meta.spatial_dims, mm.get("inflate") or "i3d")
            for mm in meta.members]
    return EnsembleNet(nets, [mm["weight"] for mm in meta.members], [mm["temperature"] for mm in meta.members],
                       [mm["image_size"] for mm in meta.members], meta.image_size, meta.data_chans,
                       task=meta.task, spatial_dims=meta.spatial_dims).eval()


# ------------------------------------------------------------------------------------- hash record
def seal(run_dir: str | Path) -> dict[str, str]:
    """Write ``files.sha256``: the SHA-256 of every file of :data:`RECORDED` the run holds. The writers call it
    when their files are complete (RunDirectory.commit does, last); call it yourself only to accept a deliberate
    edit of a run's files."""
    return files.write_hashes(Path(run_dir), RECORDED)


def check_record(run_dir: str | Path, everything: bool = False) -> dict[str, str] | None:
    """Check the run's files against ``files.sha256`` (the large :data:`OPENED_LATER` ones only with
    ``everything``): a changed, missing or unrecorded file is one MedxferError naming it. -> the record, or None
    for a run of an earlier release (no record)."""
    run_dir = Path(run_dir)
    record = files.read_hashes(run_dir)
    if record is None:
        return None
    unknown = [n for n in record if n not in RECORDED] + [n for n in FINISHED_FILES if n not in record]
    if unknown:
        raise MedxferError(f"'{run_dir / RECORD}' is damaged: it {'names' if unknown[0] in record else 'lacks'} "
                           f"'{unknown[0]}'. Train the run again, or restore the file from a copy.")
    missing = [n for n in record if not (run_dir / n).is_file()]
    if missing:
        raise MedxferError(f"'{run_dir}' is damaged: {', '.join(missing)} (recorded in {RECORD}) "
                           f"{'is' if len(missing) == 1 else 'are'} missing. Train the run again, or restore the files "
                           "from a copy.")
    added = [n for n in RECORDED if n not in record and n not in EXPORTS and (run_dir / n).is_file()]
    if added:
        raise MedxferError(f"'{run_dir / added[0]}' is not in the run's {RECORD}: it was added after the run was "
                           "written. Delete it, or train the run again.")
    changed = [n for n in record if (everything or n not in OPENED_LATER) and sha256_file(run_dir / n) != record[n]]
    if changed:
        changed += [n for n in record if not everything and n in OPENED_LATER
                    and sha256_file(run_dir / n) != record[n]]  # the whole picture, on this path only
        raise MedxferError(f"'{run_dir}' was changed after it was written: {', '.join(changed)} "
                           f"{'differs' if len(changed) == 1 else 'differ'} from the SHA-256 recorded in {RECORD} "
                           "(damaged, edited or replaced). Train the run again, or restore the files from a copy.")
    return record


def _unrecorded(run_dir: Path, raw_meta) -> None:
    """No record: refused when model.json says the run was written with one; else (a run of an earlier
    release) a one-line warning, once per run and process."""
    if isinstance(raw_meta, dict) and raw_meta.get("hashes"):
        raise MedxferError(f"'{run_dir / RECORD}' is missing: the run's files cannot be checked against the hashes "
                           "recorded when it was written. Restore it from a copy, or train the run again.")
    key = str(run_dir.resolve())
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning("'%s' was written by an earlier release of medxfer: it has no %s, so edits to its files cannot "
                    "be detected (its values are still checked). Train it again to record them.", run_dir, RECORD)


def lock_run(out: str | Path, wait: float = 0):
    """The exclusive lock on run directory ``out`` (held by whoever writes it), acquired; release() it when done.
    A lock held by another process past ``wait`` seconds is one MedxferError."""
    from filelock import FileLock, Timeout

    out = Path(out).absolute()
    lock = FileLock(str(out.parent / f".{out.name}.lock"))
    try:
        lock.acquire(timeout=wait)
    except Timeout:
        raise MedxferError(f"another medxfer process is writing '{out}' (its lock is held). Wait for it to "
                           "finish, or choose another --out.") from None
    except OSError as e:
        raise write_error(out, e) from None
    return lock


@contextlib.contextmanager
def amend(run_dir: str | Path, wait: float = 30):
    """Change files of a finished run (export writes model.onnx and its hash into model.json): under the run's
    lock, every recorded file is checked first (an edit made before is refused, never recorded), and the
    record is written again after the block."""
    lock = lock_run(run_dir, wait)
    try:
        record = check_record(run_dir, everything=True)
        yield
        if record is not None:
            seal(run_dir)
    finally:
        lock.release()


# ------------------------------------------------------------------------------------- run directory
class RunDirectory:
    """Where a run is written: staged in ``OUT.partial/``, locked, moved into place when complete.

    Usage::

        with RunDirectory(out, overwrite=False, resume=False) as rd:
            rd.staging / "model.json" ...          # write the run here; checkpoint at rd.checkpoint
            rd.commit()                            # OUT becomes the new run in one step

    Refused before any work starts, each with one clear line: an ``OUT`` that holds a finished run
    (unless ``overwrite``), a folder that is not a medxfer run, a file where the folder should be, a
    location that cannot be written or has too little space, another process holding the lock, a
    fresh run over an unfinished one's checkpoint (unless ``resume``).
    """

    MIN_FREE = 50 * 2**20

    def __init__(self, out: str | Path, overwrite: bool = False, resume: bool = False, wait: float = 0):
        self.out = Path(out)
        self.overwrite, self.resume, self.wait = overwrite, resume, wait
        self.staging = self.out.with_name(self.out.name + ".partial")
        self.checkpoint = self.staging / CHECKPOINT
        self._lock = None

    def __enter__(self) -> "RunDirectory":
        parent = self.out.parent
        if parent.exists() and not parent.is_dir():
            raise MedxferError(f"cannot write the run to '{self.out}': '{parent}' is a file, not a folder.")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(self.out, e) from None
        self._lock = lock_run(self.out, self.wait)  # set only once held: a refused writer owns nothing
        try:
            self._check()
        except BaseException:
            self.release()
            raise
        return self

    def _check(self) -> None:
        _recover(self.out)
        if self.out.exists() and not self.out.is_dir():
            raise MedxferError(f"--out '{self.out}' is a file; give a folder for the run.")
        if self.resume and not self.checkpoint.is_file():
            raise MedxferError(f"nothing to resume: '{self.checkpoint}' does not exist (it is written after the "
                               "first epoch). Run without --resume to start.")
        if self.out.is_dir() and any(self.out.iterdir()):
            if not (self.out / "model.json").exists() and not (self.out / "config.yaml").exists():
                raise MedxferError(f"--out '{self.out}' is a folder that holds other files, not a medxfer run: "
                                   "medxfer will not replace it. Choose a new or empty folder.")
            if not self.overwrite and not self.resume:  # resuming: the run it continues was started over this one
                raise MedxferError(f"--out '{self.out}' already holds a run. Pass --overwrite to replace it (it is "
                                   "replaced only when the new run is complete), or choose another --out.")
        if self.resume:
            pass
        elif self.checkpoint.exists():
            raise MedxferError(f"'{self.staging}' holds the checkpoint of an unfinished run: pass --resume to continue "
                               f"it, or delete '{self.staging}' (or choose another --out) to start again.")
        elif self.staging.exists():
            shutil.rmtree(self.staging)  # the leftovers of a run that never checkpointed, or of a swap
        try:
            self.staging.mkdir(parents=True, exist_ok=True)
            probe = self.staging / ".write-test"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise write_error(self.staging, e) from None
        self.check_space(self.MIN_FREE)

    def check_space(self, nbytes: int) -> None:
        """Refuse to start when the run's folder has less than ``nbytes`` free."""
        free = shutil.disk_usage(self.staging).free
        if free < nbytes:
            raise MedxferError(f"only {free / 2**20:.0f} MB free where the run is written ('{self.staging}'); it needs "
                               f"about {nbytes / 2**20:.0f} MB. Free space or choose another --out.")

    def seal(self) -> None:
        """Record the hashes of the staged files (writers call it before reading their own run back)."""
        self._owner("record")
        seal(self.staging)

    def commit(self) -> None:
        """Make ``OUT`` the new run: its hash record written last, then one atomic exchange when ``OUT`` exists
        (Linux), else a rename."""
        self._owner("commit")
        (self.staging / CHECKPOINT).unlink(missing_ok=True)
        seal(self.staging)
        fsync_dir(self.staging)
        try:
            if self.out.exists():
                if not _exchange(self.staging, self.out):
                    old = self.out.with_name(f".{self.out.name}.old")
                    shutil.rmtree(old, ignore_errors=True)
                    os.replace(self.out, old)           # a crash here is undone by _recover at the next start
                    os.replace(self.staging, self.out)
                    shutil.rmtree(old, ignore_errors=True)
                    return
                shutil.rmtree(self.staging)              # now the previous run
            else:
                os.replace(self.staging, self.out)
            fsync_dir(self.out.parent)
        except OSError as e:
            raise write_error(self.out, e) from None

    def abandon(self) -> None:
        """After a failure: drop the staging folder unless it holds a checkpoint to resume from. Only the lock's
        holder does: a writer that was refused the lock leaves the other writer's staging folder alone."""
        if self.owns and self.staging.is_dir() and not self.checkpoint.exists():
            shutil.rmtree(self.staging, ignore_errors=True)

    @property
    def owns(self) -> bool:
        """Whether this process holds OUT's lock (and so may remove or swap the staging folder)."""
        return self._lock is not None and self._lock.is_locked

    def _owner(self, what: str) -> None:
        if not self.owns:
            raise RuntimeError(f"RunDirectory.{what} without holding the lock of '{self.out}'")

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __exit__(self, *exc) -> None:
        self.release()


def staging_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def remove_staging(out: str | Path) -> bool:
    """Delete ``OUT.partial`` (checkpoint included) as the holder of OUT's lock; False, leaving it, when another
    process holds the lock (it is that process's staging folder)."""
    try:
        lock = lock_run(out)
    except MedxferError:
        return False
    try:
        shutil.rmtree(staging_dir(out), ignore_errors=True)
        return True
    finally:
        lock.release()


def checkpoint_path(out: str | Path) -> Path:
    """Where an unfinished run's checkpoint is (for --resume)."""
    return staging_dir(out) / CHECKPOINT


def _recover(out: Path) -> None:
    """Undo a swap interrupted between its two renames (systems without an atomic exchange)."""
    old = out.with_name(f".{out.name}.old")
    if old.is_dir() and not out.exists():
        os.replace(old, out)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


# ------------------------------------------------------------------------------------------- outputs
def holds_run(folder: Path) -> bool:
    """Whether ``folder`` is a run directory (finished, recorded, being written) or a source with weights."""
    return is_finished(folder) or any((folder / n).is_file() for n in (RECORD, CHECKPOINT, "model.safetensors"))


def check_out_dir(path: str | Path, what: str = "--out") -> Path:
    """The guard of an output folder (explain's overlays): a folder or nothing yet, not in a run directory."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise MedxferError(f"{what} '{p}' is not a folder; give a folder for the files.")
    target = p.resolve()
    run = next((a for a in (target, *target.parents) if holds_run(a)), None)
    if run is not None:
        raise MedxferError(f"{what} '{p}' is inside the run directory '{run}': medxfer writes nothing else into a "
                           "run. Choose a folder outside it.")
    return p


def check_out(path: str | Path, *, inputs=(), overwrite: bool = False, ours: Callable[[Path], bool] | None = None,
              what: str = "--out") -> Path:
    """The one guard of every file a command writes (predict's CSV, an export, features, Grad-CAM overlays).

    Refused, each in one line: something that is not a regular file (a folder, FIFO, device, socket); one of
    ``inputs`` or a file inside an input folder (never, even with ``overwrite``, unless medxfer wrote it); a
    file inside a run directory (a run's files are written by the commands that make runs); an existing file
    that medxfer did not write (``ours(path)`` is false) unless ``overwrite``."""
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        mode = None
    except OSError:  # e.g. a file where a folder should be: the write itself says it in one line
        return p
    if mode is not None and stat.S_ISDIR(mode):
        raise MedxferError(f"{what} '{p}' is a folder; give a file name.")
    if mode is not None and not stat.S_ISREG(mode):
        raise MedxferError(f"{what} '{p}' is not a regular file (a device, FIFO or socket): medxfer writes only "
                           "regular files. Give a file name.")
    target = p.resolve()
    run = next((a for a in target.parents if holds_run(a)), None)
    if run is not None:
        raise MedxferError(f"{what} '{p}' is inside the run directory '{run}': medxfer writes nothing else into a "
                           "run. Choose a file outside it.")
    mine = mode is not None and ours is not None and ours(p)
    for given in inputs:
        source = Path(given).resolve()
        if target == source or (mode is not None and not mine and source in target.parents):
            where = "" if target == source else " (inside an input folder)"
            raise MedxferError(f"{what} '{p}' is one of the inputs{where}: medxfer never overwrites what it reads. "
                               "Choose another file name.")
    if mode is not None and not mine and not overwrite:
        raise MedxferError(f"{what} '{p}' exists and was not written by medxfer: pass --overwrite to replace it, or "
                           "choose another file name.")
    return p
