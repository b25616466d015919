"""The decoded store: every decoded image of a data set in one memory-mapped ``.npy`` file on disk, written
once and read by every later run, command and DDP rank.

Usage::

    store = Store(cache_dir / "stores", key)          # key: store_key(digests, params)
    found = store.open()                               # (array view, index) or None on a miss / damaged store
    with store.building():                             # one builder at a time (a file lock)
        part = store.partial(rows, row_shape)          # created, or resumed from an interrupted build
        ...                                            # decoders write part.array[row] and part.log(...)
        store.finish(part, index, keep, channels)      # compacted, moved into place, index written last

Files, in the store folder: ``KEY.npy`` (uint8, (kept samples, C, S, S) or (.., S, S, S) for volumes) and
``KEY.json`` (its index: format, key, shape, dtype, complete flag, the pixel types counted, skipped rows and
their reasons, notes). While it is built: ``KEY.partial.npy`` (one row per manifest row), ``KEY.partial.json``
(its shape) and ``KEY.partial.rN.log`` (one JSON line per decoded row, written by rank N after the row's
pixels), and ``KEY.lock``.

Promises (those of :class:`medxfer.data.cache.DecodeCache`): the key hashes the files' bytes in manifest
order and every parameter that changes a pixel, so an edited file or option is another store; nothing is
ever under ``KEY.npy`` until it is complete (built under the partial name, then ``os.replace``), and the
index, which says ``complete``, is written after it; a store whose index does not parse, or whose array
does not have the index's shape and size (a truncated copy), is a miss: it is deleted and rebuilt. An
interrupted build leaves its partial, and the next build resumes it: the rows its logs list are kept.

A run also notes, under ``by-stat/``, which store the files had by their (path, inode, size, mtime, ctime)
(:func:`stat_fingerprint`): a later run on unchanged files finds its store from their ``stat`` alone instead
of reading and hashing every file; any write to a file changes its ctime, so it is hashed again.

Deleting the store folder is always safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["FORMAT", "Partial", "Store", "find_by_stat", "remember_stat", "stat_fingerprint", "store_key"]

#: the store's layout; a store of another format is a miss
FORMAT = 1
#: rows copied at once when a store is compacted (skipped rows dropped) or its channels reduced
COPY_ROWS = 1024


def stat_fingerprint(paths, params: dict) -> str | None:
    """sha256 of every file's (absolute path, device, inode, size, mtime_ns, ctime_ns) in manifest order and the
    parameters; None when a file cannot be stat'ed or is a folder. Any write to a file changes its ctime, which
    no program can set back, so an unchanged fingerprint means unchanged bytes: a later run finds its store
    from this (:func:`find_by_stat`) without reading every file again."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, **params}, sort_keys=True, default=str).encode())
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            return None
        if not os.path.isfile(p):
            return None
        h.update(f"{os.path.abspath(p)}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0"
                 f"{st.st_ctime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def find_by_stat(directory: str | Path, fingerprint: str) -> str | None:
    """The key of the store last built or found for files of this :func:`stat_fingerprint`, or None."""
    try:
        key = (Path(directory) / "by-stat" / fingerprint).read_text().strip()
    except OSError:
        return None
    return key if len(key) == 64 and all(c in "0123456789abcdef" for c in key) else None


def remember_stat(directory: str | Path, fingerprint: str, key: str) -> None:
    """Note that files of this fingerprint have the store ``key`` (written atomically)."""
    folder = Path(directory) / "by-stat"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{fingerprint}.tmp"
    tmp.write_text(key)
    os.replace(tmp, folder / fingerprint)


def store_key(digests: list[str], params: dict) -> str:
    """sha256 of the files' content digests in manifest order and every parameter that changes a pixel."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, **params}, sort_keys=True, default=str).encode())
    for d in digests:
        h.update(d.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


@dataclass
class Partial:
    """A store being built: one row per manifest row, and what was decoded into it (the logs' records, one
    per chunk of rows: ``{"rows": [...], ...}``)."""

    path: Path
    array: np.ndarray
    records: list[dict] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return int(self.array.shape[1])


class Store:
    """One decoded store, ``directory/KEY.npy`` with its index ``KEY.json`` (see the module docstring)."""

    def __init__(self, directory: str | Path, key: str):
        self.directory, self.key = Path(directory), key
        base = self.directory / key
        self.array_path, self.index_path = base.with_suffix(".npy"), base.with_suffix(".json")
        self.partial_path = self.directory / f"{key}.partial.npy"
        self.partial_meta = self.directory / f"{key}.partial.json"

    # -- reading ----------------------------------------------------------------------------------------
    def open(self) -> tuple[np.ndarray, dict] | None:
        """(the array, mapped copy-on-write, and its index), or None on a miss; a damaged store is deleted."""
        try:
            index = json.loads(self.index_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            self.discard()
            return None
        try:
            ok = isinstance(index, dict) and index.get("format") == FORMAT and index.get("key") == self.key \
                and index.get("complete") is True
            array = np.load(self.array_path, mmap_mode="c", allow_pickle=False) if ok else None
            ok = ok and array.dtype == np.uint8 and list(array.shape) == index["shape"] and \
                os.path.getsize(self.array_path) == array.offset + array.nbytes
        except (OSError, ValueError, KeyError, TypeError, EOFError):
            ok = False
        if not ok:
            self.discard()
            return None
        return array, index

    def discard(self) -> None:
        """Delete the store (damaged, or of another format): the next build makes it again."""
        for p in (self.index_path, self.array_path):
            p.unlink(missing_ok=True)

    # -- building ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def building(self):
        """Hold the store's build lock: one builder at a time; others wait, then find it built."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / f"{self.key}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield self
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def partial(self, rows: int, row_shape: tuple[int, ...], *, fresh: bool = False) -> Partial:
        """The store being built: an interrupted one of this shape resumed (the rows its logs list kept), else
        a new one (its rows zero)."""
        shape = [rows, *row_shape]
        if not fresh:
            try:
                meta = json.loads(self.partial_meta.read_text())
                array = np.load(self.partial_path, mmap_mode="r+", allow_pickle=False)
                if meta.get("shape") == shape and list(array.shape) == shape and array.dtype == np.uint8 and \
                        os.path.getsize(self.partial_path) == array.offset + array.nbytes:
                    return Partial(self.partial_path, array, self.read_logs(rows))
            except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError):
                pass
        self.drop_partial()
        self.directory.mkdir(parents=True, exist_ok=True)
        array = np.lib.format.open_memmap(self.partial_path, mode="w+", dtype=np.uint8, shape=tuple(shape))
        _write_json(self.partial_meta, {"format": FORMAT, "shape": shape})
        return Partial(self.partial_path, array)

    def log_path(self, rank: int) -> Path:
        return self.directory / f"{self.key}.partial.r{rank}.log"

    def read_logs(self, rows: int) -> list[dict]:
        """The records of every rank's log (one per chunk of rows written); a line cut short by a crash is
        ignored, and so are rows out of range."""
        out = []
        for log in sorted(self.directory.glob(f"{self.key}.partial.r*.log")):
            for line in log.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                    if all(0 <= int(r) < rows for r in rec["rows"]):
                        out.append(rec)
                except (ValueError, KeyError, TypeError):
                    continue
        return out

    def log(self, rank: int, record: dict) -> None:
        """Append one record (rows whose pixels are written) to this rank's log."""
        with open(self.log_path(rank), "a") as f:
            f.write(json.dumps(record) + "\n")

    def drop_partial(self) -> None:
        for p in [self.partial_path, self.partial_meta, *self.directory.glob(f"{self.key}.partial.r*.log")]:
            p.unlink(missing_ok=True)

    def finish(self, part: Partial, index: dict, keep: np.ndarray, channels: int) -> None:
        """Move the partial into place as the store: its kept rows, ``channels`` of them (the first, when a
        3-channel partial holds grey images only), then write the index (``complete``) last."""
        part.array.flush()
        if keep.all() and channels == part.channels:
            _fsync(part.path)
            os.replace(part.path, self.array_path)
        else:
            tmp = self.directory / f"{self.key}.final.npy"
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                            shape=(int(keep.sum()), channels, *part.array.shape[2:]))
            rows = np.flatnonzero(keep)
            for start in range(0, len(rows), COPY_ROWS):
                chunk = rows[start:start + COPY_ROWS]
                out[start:start + len(chunk)] = part.array[chunk, :channels]
            out.flush()
            del out
            _fsync(tmp)
            os.replace(tmp, self.array_path)
        shape = [int(keep.sum()), channels, *map(int, part.array.shape[2:])]
        _write_json(self.index_path, {**index, "format": FORMAT, "key": self.key, "shape": shape, "dtype": "uint8",
                                      "complete": True})
        self.drop_partial()


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
