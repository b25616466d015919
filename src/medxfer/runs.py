"""The run directory: written atomically, read back alone.

Layout::

    config.yaml        resolved configuration (data, split, seed, source, weights hash, strategy, preprocessing)
    model.json         what rebuilds the model: architecture, labels, channels, mean/std, size, temperature, threshold
    model.safetensors  trained weights
    metrics.json       {"val": {...}, "test": {...}, "train_seconds": ...}
    history.csv        one row per epoch
    predictions.csv    split, sample_id, label, prob_<class>... (val and test, calibrated)
    split.csv          sample_id, split, label (the split used)
    skipped.csv        sample_id, reason (only with --on-bad-file skip and skipped files)
    duplicates.csv     images found in more than one split and what was done with them
    paths.csv          sample_id -> file (only with --keep-paths: file names can hold patient names)

A run is written into ``OUT.partial/`` (the epoch loop's ``checkpoint.pt`` lives there while it is
unfinished, for ``--resume``) and moved into place when complete: ``OUT`` is always either the
previous complete run or the new complete run, never a mix (Linux: one atomic exchange of the two
folders). An exclusive lock on ``OUT`` stops two runs from writing it at once.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from medxfer.errors import MedxferError

CHECKPOINT = "checkpoint.pt"


def write_text(path: Path, text: str) -> None:
    """Write then rename: a reader never sees half a file. A full disk or a folder that cannot be
    written is one clear MedxferError naming the file, not a traceback."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_error(path: Path, e: OSError) -> "MedxferError":
    """A user-facing error for a failed write (disk full, read-only, a file where a folder should be)."""
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
           errno.EACCES: "permission denied", errno.EROFS: "the file system is read-only",
           errno.ENOTDIR: "a file stands where a folder is needed", errno.EISDIR: "it is a folder"}
    reason = why.get(e.errno, e.strerror or type(e).__name__)
    return MedxferError(f"cannot write '{path}' ({reason}). Free space or choose another location; nothing "
                        "finished was changed.")


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes, streamed (weights, exports, data files: one definition)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def write_yaml(path: Path, obj) -> None:
    plain = json.loads(json.dumps(obj, default=_jsonable))  # numpy / torch scalars -> plain values
    write_text(path, yaml.safe_dump(plain, sort_keys=False))


def write_csv(path: Path, df: pd.DataFrame) -> None:
    write_text(path, df.to_csv(index=False))


def write_weights(path: Path, state_dict: dict) -> str:
    """Write a safetensors file atomically; returns its sha256 (recorded in model.json)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp))
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return sha256_file(path)


def write_checkpoint(path: Path, payload: dict, fmt: str) -> None:
    """torch.save of tensors, numbers and strings only (so ``weights_only=True`` reads it), tagged with
    ``fmt``; written then renamed, so an interrupted write leaves the previous checkpoint as it was."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": fmt, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def read_checkpoint(path: Path | None, fmt: str, kind: str) -> dict:
    """A checkpoint written by :func:`write_checkpoint` with format ``fmt``; never runs code from the file."""
    import torch

    if path is None or not Path(path).is_file():
        raise MedxferError(f"nothing to resume: '{path}' does not exist (it is written after the first epoch). "
                           "Run without --resume to start.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file is a user-facing problem
        raise MedxferError(f"cannot read checkpoint '{path}' ({type(e).__name__}); delete it and start again "
                           "without --resume.") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise MedxferError(f"'{path}' is not a medxfer {kind} checkpoint.")
    return ckpt


def changed_settings(saved: dict, now: dict) -> list[str]:
    """Keys whose values differ between a checkpoint's recorded settings and the current ones (sorted)."""
    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


#: what a finished run directory always holds (one definition for every command)
FINISHED_FILES = ("config.yaml", "model.json", "model.safetensors", "metrics.json", "predictions.csv", "split.csv")


def is_finished(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds a complete run (every file of :data:`FINISHED_FILES`)."""
    run_dir = Path(run_dir)
    return run_dir.is_dir() and all((run_dir / n).is_file() for n in FINISHED_FILES)


def read_json(path: Path, what: str = "file"):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MedxferError(f"'{path}' does not exist.") from None
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise MedxferError(f"'{path}' is damaged ({type(e).__name__}): not a readable {what}. Train the run again, or "
                           "restore the file from a copy.") from None


def read_yaml(path: Path, what: str = "file"):
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise MedxferError(f"'{path}' does not exist.") from None
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        raise MedxferError(f"'{path}' is damaged ({type(e).__name__}): not a readable {what}. Train the run again, or "
                           "restore the file from a copy.") from None


def verify_file(path: Path, expected: str | None, what: str) -> None:
    """Refuse a file whose sha256 differs from the one recorded when it was written."""
    if expected is None:
        return
    if not Path(path).is_file():
        raise MedxferError(f"'{path}' is missing from the run; train it again.")
    if sha256_file(path) != expected:
        raise MedxferError(f"'{path}' is damaged or was replaced: its SHA-256 differs from the one recorded in "
                           f"model.json when the {what} was written. Train the run again (or restore the file).")


def read_run(run_dir: str | Path) -> dict:
    """Everything a command needs from a finished run: config, model meta, metrics, tables."""
    run_dir = Path(run_dir)
    needed = ["config.yaml", "model.json", "model.safetensors", "metrics.json"]
    missing = [n for n in needed if not (run_dir / n).exists()]
    if missing:
        raise MedxferError(f"'{run_dir}' is not a finished run directory (missing {', '.join(missing)}). "
                           "Train one with 'medxfer train ... --out DIR'.")
    out = {
        "dir": run_dir,
        "config": read_yaml(run_dir / "config.yaml", "config.yaml"),
        "model": read_json(run_dir / "model.json", "model.json"),
        "metrics": read_json(run_dir / "metrics.json", "metrics.json"),
    }
    for name in ("history", "predictions", "split", "skipped", "duplicates"):
        f = run_dir / f"{name}.csv"
        try:
            out[name] = pd.read_csv(f, dtype={"sample_id": str}) if f.exists() else None
        except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
            raise MedxferError(f"'{f}' is damaged ({type(e).__name__}); train the run again.") from None
    return out


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

    def __init__(self, out: str | Path, overwrite: bool = False, resume: bool = False):
        self.out = Path(out)
        self.overwrite, self.resume = overwrite, resume
        self.staging = self.out.with_name(self.out.name + ".partial")
        self.checkpoint = self.staging / CHECKPOINT
        self._lock = None

    def __enter__(self) -> "RunDirectory":
        from filelock import FileLock, Timeout

        parent = self.out.parent
        if parent.exists() and not parent.is_dir():
            raise MedxferError(f"cannot write the run to '{self.out}': '{parent}' is a file, not a folder.")
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(str(parent / f".{self.out.name}.lock"))
            self._lock.acquire(timeout=0)
        except Timeout:
            raise MedxferError(f"another medxfer process is writing '{self.out}' (its lock is held). Wait for it to "
                               "finish, or choose another --out.") from None
        except OSError as e:
            raise write_error(self.out, e) from None
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

    def commit(self) -> None:
        """Make ``OUT`` the new run: one atomic exchange when ``OUT`` exists (Linux), else a rename."""
        (self.staging / CHECKPOINT).unlink(missing_ok=True)
        _fsync_dir(self.staging)
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
            _fsync_dir(self.out.parent)
        except OSError as e:
            raise write_error(self.out, e) from None

    def abandon(self) -> None:
        """After a failure: drop the staging folder unless it holds a checkpoint to resume from."""
        if self._lock is not None and self.staging.is_dir() and not self.checkpoint.exists():
            shutil.rmtree(self.staging, ignore_errors=True)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __exit__(self, *exc) -> None:
        self.release()


def staging_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
