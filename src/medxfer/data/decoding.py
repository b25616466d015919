"""Decode image files into the decoded store (:mod:`medxfer.data.store`), in parallel, once per data set.

Usage::

    array, index = decode_files(paths, size, read, cache, on_bad_file="skip", workers=4)
    # array: uint8 (kept samples, C, S, S), memory-mapped from the store; index["skipped"]: [[row, reason], ...]

Each file is read as :func:`read_file` reads one (through the per-file decode cache), by a pool of
``workers`` processes that write straight into the store's memory map by row, so the result is byte for byte
what a serial decode makes, whatever the number of workers. Files are first hashed (in the same pool): the
store is keyed by their bytes, so a later run, another command or another rank finds it and decodes nothing.

Under DDP (``torch.distributed`` initialised) every rank hashes the files, rank 0 creates the store being
built, each rank decodes its share of the rows not yet decoded, all wait at a barrier, rank 0 finishes the
store, and all map it: no file is decoded twice and the ranks share one copy through the page cache.

Bad files: rows that cannot be read are recorded with their reason; with ``on_bad_file="error"`` a single
process stops at the first one (in manifest order, as a serial decode would) and the caller names it.
A later run on files unchanged since (same path, inode, size, mtime and ctime) finds the store without hashing
them again (:func:`medxfer.data.store.stat_fingerprint`).

Pixel types: when 8-bit files mix with wider ones, the 8-bit files are decoded again scaled per image (the
rule of :mod:`medxfer.data.loading`). Channels: the store is made 1- or 3-channel from a few headers; a
3-channel image in a 1-channel store starts the build again 3-channel; a 3-channel store of grey images only
is reduced to 1 channel when it is finished.

Without a cache folder (``--no-cache``) the store is built in a temporary folder and deleted once mapped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch

from medxfer import progress
from medxfer.data.cache import DecodeCache, digest_memo, file_digest, remember_digest
from medxfer.data.intensity import EIGHT_BIT, parse_slice, pixel_types, widest
from medxfer.data.readers import read_image
from medxfer.data.store import Partial, Store, find_by_stat, remember_stat, stat_fingerprint, store_key
from medxfer.data.transforms import match_channels, resize_to_uint8
from medxfer.errors import BadFileError, MedxferError

log = logging.getLogger(__name__)

__all__ = ["BadRow", "decode_files", "default_workers", "read_file", "usable_cores"]

#: status of a row in the store being built
TODO, OK, BAD, RGB = 0, 1, 2, 3
#: files a worker takes at once (fewer when there are few files per worker)
CHUNK = 64


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_workers(files: int) -> int:
    """``--workers`` when not given: the usable cores, but no more than one per 32 files."""
    return max(1, min(usable_cores(), files // 32))


class BadRow(Exception):
    """The first row that cannot be read, with ``on_bad_file="error"``: its row and its :class:`BadFileError`."""

    def __init__(self, row: int, error: BadFileError):
        super().__init__(str(error))
        self.row, self.error = row, error


# -- one file --------------------------------------------------------------------------------------------------
def read_file(path, read, size: int, cache, digest: str | None = None) -> tuple[np.ndarray, str, bool]:
    """One file -> (uint8 (C, S, S), the type of its pixels, whether the per-file cache had it). ``digest``:
    the file's content digest when already known (else it is read), or ``"!reason"`` when it could not be."""
    if cache is not None:
        if digest is not None and digest.startswith("!"):
            raise BadFileError(path, digest[1:])
        params = {"size": size, **read.key()}
        key = cache.key(path, params) if digest is None else cache.key_of(digest, params)
    else:
        key = None
    img, dtype = _cached(cache, key)
    if img is not None:
        return img, dtype, True
    with pixel_types() as seen:
        arr = read_image(path, read, size=size)
    img, dtype = resize_to_uint8(arr[None], size)[0].numpy(), "".join(seen[:1])
    del arr
    if cache is not None:
        cache.put(key, _entry(img, dtype))
    return img, dtype, False


def _entry(img: np.ndarray, dtype: str) -> np.ndarray:
    """A cache entry: the decoded uint8 image and the type its pixels had, in one record."""
    entry = np.zeros((), [("pixels", np.uint8, img.shape), ("dtype", "U16")])
    entry["pixels"], entry["dtype"] = img, dtype
    return entry


def _cached(cache, key) -> tuple[np.ndarray | None, str]:
    """(image, pixel type) from the cache; (None, '') on a miss or an entry of an earlier release (no type)."""
    entry = cache.get(key) if cache is not None else None
    if entry is None or entry.dtype.names != ("pixels", "dtype") or entry.size != 1:
        return None, ""
    record = entry.reshape(-1)[0]   # the cache stores the 0-d record as shape (1,)
    return np.array(record["pixels"]), str(record["dtype"])   # a copy: the record is not kept


def chans_uint8(img: np.ndarray, chans: int) -> np.ndarray:
    if img.shape[0] == chans:
        return img
    return (match_channels(img.astype(np.float32), chans)).round().astype(np.uint8)


# -- workers ---------------------------------------------------------------------------------------------------
def _init_worker() -> None:
    torch.set_num_threads(1)     # one core each: the pool is the parallelism
    _die_with_parent()


def _die_with_parent() -> None:
    """Ask Linux to end this worker when the process that started it ends (killed, say), so that no worker
    outlives an interrupted run; elsewhere nothing is done."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)    # PR_SET_PDEATHSIG
        if os.getppid() == 1:      # the parent ended before the call
            os._exit(1)
    except (OSError, AttributeError):
        pass


def _hash_chunk(paths: list[str]) -> list[tuple[tuple | None, str]]:
    """(memo key, content digest or '!reason') per file."""
    out = []
    for p in paths:
        try:
            out.append((digest_memo(p), file_digest(p)))
        except BadFileError as e:
            out.append((None, "!" + e.reason))
    return out


def _decode_chunk(store_path, rows, paths, digests, size, read, cache_dir, channels, layout, array=None) -> dict:
    """Decode ``rows`` into the store at ``store_path``: into ``array`` (this process's map of it), or in a worker
    written in place with ``os.pwrite`` at ``layout`` = (the array's offset in the file, the shape of a row),
    which costs less than faulting in pages of a shared map. Returns their record for the log."""
    offset, row_shape = layout
    fd = os.open(store_path, os.O_WRONLY) if array is None else None
    try:
        return _decode_into(fd, array, offset, tuple(row_shape), rows, paths, digests, size, read, cache_dir,
                            channels)
    finally:
        if fd is not None:
            os.close(fd)


def _decode_into(fd, array, offset, row_shape, rows, paths, digests, size, read, cache_dir, channels) -> dict:
    cache = DecodeCache(cache_dir) if cache_dir is not None else None
    status, types, chans, hits, why, where = [], [], [], [], {}, {}
    for row, path, digest in zip(rows, paths, digests):
        try:
            img, dtype, hit = read_file(path, read, size, cache, digest)
        except BadFileError as e:
            status.append(BAD), types.append(""), chans.append(0), hits.append(False)
            why[str(row)], where[str(row)] = e.reason, e.path
            continue
        if img.shape[0] == 3 and channels == 1:
            status.append(RGB), types.append(dtype), chans.append(3), hits.append(bool(hit))
            continue
        x = np.ascontiguousarray(chans_uint8(img, channels))
        if x.shape != row_shape:    # never expected: the readers give (C, S, S) or (C, S, S, S) at this size
            raise ValueError(f"a decoded image of shape {x.shape} for a store of rows {row_shape}")
        if fd is None:
            array[row] = x
        else:
            os.pwrite(fd, memoryview(x).cast("B"), offset + row * x.nbytes)
        status.append(OK), types.append(dtype), chans.append(int(img.shape[0])), hits.append(bool(hit))
    return {"rows": [int(r) for r in rows], "s": status, "t": types, "c": chans, "h": hits, "why": why,
            "where": where}


class Rows:
    """What is known of each manifest row: its status, pixel type and whether the per-file cache had it."""

    def __init__(self, n: int):
        self.status = np.zeros(n, np.int8)
        self.type_code = np.zeros(n, np.int16)
        self.types: list[str] = [""]
        self.hits = np.zeros(n, bool)
        self.chans = np.zeros(n, np.int8)
        self.why: dict[int, str] = {}
        self.where: dict[int, str] = {}

    def add(self, rec: dict) -> None:
        rows = np.asarray(rec["rows"], dtype=np.int64)
        self.status[rows] = rec["s"]
        self.hits[rows] = rec["h"]
        self.chans[rows] = rec["c"]
        for t in set(rec["t"]) - set(self.types):
            self.types.append(t)
        self.type_code[rows] = [self.types.index(t) for t in rec["t"]]
        for r, reason in rec.get("why", {}).items():
            self.why[int(r)] = reason
        for r, path in rec.get("where", {}).items():
            self.where[int(r)] = path

    def todo(self) -> np.ndarray:
        return np.flatnonzero(self.status == TODO)

    def type_counts(self) -> Counter:
        """Pixel type -> decoded images ('' left out: scaled by a lookup table)."""
        codes = self.type_code[(self.status == OK) | (self.status == RGB)]
        counts = np.bincount(codes, minlength=len(self.types))
        return Counter({t: int(c) for t, c in zip(self.types, counts) if t and c})


# -- the whole set ----------------------------------------------------------------------------------------------
def decode_files(paths: list, size: int, read, cache, on_bad_file: str, workers: int | None = None,
                 channels: int = 1) -> tuple[np.ndarray, dict]:
    """The decoded store of ``paths`` (see the module docstring): (uint8 array of the kept rows, mapped from
    disk, and its index). ``channels``: the store's channels to start with (a guess from headers)."""
    n = len(paths)
    workers = default_workers(n) if workers is None else max(1, int(workers))
    rank, world = _ranks()
    volume = parse_slice(read.slice) == "volume"
    params = {"size": size, **read.key(), "volume": volume}
    cache_dir = cache.directory if cache is not None else None
    with _Pool(workers, n) as pool:
        if cache is None:     # no cache folder: a store of this run only, in a temporary folder
            temp = Path(tempfile.mkdtemp(prefix="medxfer-store-"))
            try:
                store = Store(temp, "0" * 64)
                _build(store, paths, None, size, read, None, on_bad_file, pool, channels, volume, 0, 1)
                return _opened(store)
            finally:
                shutil.rmtree(temp, ignore_errors=True)   # the mapping stays valid after the files go
        folder = cache.directory / "stores"
        fingerprint = stat_fingerprint(paths, params) if world == 1 else None
        known = find_by_stat(folder, fingerprint) if fingerprint else None
        found = Store(folder, known).open() if known else None
        if found is not None:       # unchanged files (by stat and ctime): their store, without hashing them again
            return _hit(found)
        digests = _hash(paths, pool)
        store = Store(folder, store_key(list(digests), params))
        if world > 1:     # every rank takes the same path: rank 0 decides under the lock, the others after a barrier
            return _build_shared(store, paths, digests, size, read, cache_dir, pool, channels, volume, rank, world)
        found = store.open()
        if found is None:
            with store.building():
                found = store.open()    # built by another process while this one waited
                if found is None:
                    _build(store, paths, digests, size, read, cache_dir, on_bad_file, pool, channels, volume, 0, 1)
        if fingerprint:
            remember_stat(folder, fingerprint, store.key)
        return _hit(found) if found is not None else _opened(store)


def _hit(found):
    array, index = found
    return array, {**index, "hits": int(array.shape[0])}


def _opened(store: Store):
    found = store.open()
    if found is None:   # the store was removed between finishing and mapping it (another process cleared it)
        raise MedxferError(f"the decoded store in '{store.directory}' was removed while it was opened (by another "
                           "process clearing the cache folder?); run again.")
    array, index = found
    return array, index


def _row_shape(channels: int, size: int, volume: bool) -> tuple[int, ...]:
    return (channels, *([size] * (3 if volume else 2)))


def _build(store, paths, digests, size, read, cache_dir, on_bad_file, pool, channels, volume, rank, world,
           part: Partial | None = None) -> None:
    """Decode every row not yet decoded into the store being built, then finish it (one process)."""
    n = len(paths)
    part = part or store.partial(n, _row_shape(channels, size, volume))
    rows = _rows_of(part, n)
    _decode_rows(store, part, rows, rows.todo(), paths, digests, size, read, cache_dir, pool, rank,
                 stop_at_bad=on_bad_file == "error")
    if on_bad_file == "error" and (rows.status == BAD).any():
        first = int(np.flatnonzero(rows.status == BAD)[0])
        raise BadRow(first, BadFileError(rows.where.get(first, str(paths[first])), rows.why[first]))
    _finish(store, part, rows, paths, digests, size, read, cache_dir, pool, volume, rank)


def _build_shared(store, paths, digests, size, read, cache_dir, pool, channels, volume, rank, world):
    """DDP: rank 0 creates (or resumes) the store being built, every rank decodes its share of the rows left,
    rank 0 finishes it; barriers between. Bad files are all recorded (the caller applies --on-bad-file)."""
    import torch.distributed as torch_dist

    n = len(paths)
    lock = store.building() if rank == 0 else contextlib.nullcontext()
    with lock:
        if rank == 0 and store.open() is None:
            store.partial(n, _row_shape(channels, size, volume))
        torch_dist.barrier()
        found = store.open()
        if found is not None:
            return _hit(found)
        array = np.load(store.partial_path, mmap_mode="r+", allow_pickle=False)
        part = Partial(store.partial_path, array, store.read_logs(n))
        rows = _rows_of(part, n)
        share = rows.todo()[rank::world]
        _decode_rows(store, part, rows, share, paths, digests, size, read, cache_dir, pool, rank, stop_at_bad=False)
        torch_dist.barrier()
        if rank == 0:
            part = Partial(store.partial_path, array, store.read_logs(n))
            _finish(store, part, _rows_of(part, n), paths, digests, size, read, cache_dir, pool, volume, rank)
        torch_dist.barrier()
    return _opened(store)


def _rows_of(part: Partial, n: int) -> Rows:
    rows = Rows(n)
    for rec in part.records:
        rows.add(rec)
    return rows


def _decode_rows(store, part, rows: Rows, todo, paths, digests, size, read, cache_dir, pool, rank, *,
                 stop_at_bad: bool, title: str = "decoding images") -> None:
    """Decode rows ``todo`` into ``part`` (in the pool), logging each chunk once its pixels are written."""
    if not len(todo):
        return
    chunk = max(1, min(CHUNK, -(-len(todo) // (4 * pool.workers))))
    tasks = [todo[i:i + chunk] for i in range(0, len(todo), chunk)]
    stop = len(paths)
    bar = progress.task(title, total=len(todo), unit="images")
    t0 = time.monotonic()

    layout = (int(part.array.offset), tuple(int(d) for d in part.array.shape[1:]))

    def args(rs):
        return (str(part.path), [int(r) for r in rs], [str(paths[r]) for r in rs],
                [None if digests is None else str(digests[r]) for r in rs], size, read, cache_dir, part.channels,
                layout)

    def done(rec):
        nonlocal stop
        store.log(rank, {k: v for k, v in rec.items() if k != "where"})   # no file names in the cache folder
        rows.add(rec)
        bar.advance(len(rec["rows"]))
        bad = [r for r, s in zip(rec["rows"], rec["s"]) if s == BAD]
        if stop_at_bad and bad:
            stop = min(stop, min(bad))

    if pool.executor is None:
        for rs in tasks:
            if rs[0] > stop:
                break
            done(_decode_chunk(*args(rs), array=part.array))
    else:
        pending = {pool.executor.submit(_decode_chunk, *args(rs)): int(rs[0]) for rs in tasks}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                pending.pop(f)
                try:
                    done(f.result())
                except BrokenProcessPool:
                    got = int((rows.status != TODO).sum())
                    raise MedxferError(f"a decoding worker process died (out of memory?) after {got} of {len(paths)} "
                                       f"images; pass --workers {max(1, pool.workers // 2)} (fewer "
                                       "processes, less memory). The next run goes on from there.") from None
            for f in [f for f, first in pending.items() if first > stop]:
                if f.cancel():
                    pending.pop(f)
    bar.close()
    took = time.monotonic() - t0
    log.info("decoded %d images in %.1f s (%.3g images/s, %d worker%s)", len(todo), took, len(todo) / max(took, 1e-9),
             pool.workers, "s" if pool.workers > 1 else "")


def _finish(store, part, rows: Rows, paths, digests, size, read, cache_dir, pool, volume, rank) -> None:
    """Make RGB a 3-channel build, scale 8-bit files per image when types mix, and move the store into place."""
    n = len(paths)
    if (rows.status == RGB).any() and part.channels == 1:    # a colour file: the run is 3-channel
        log.info("RGB files found: the decoded store is made again with 3 channels")
        store.drop_partial()
        part = store.partial(n, _row_shape(3, size, volume), fresh=True)
        rows = Rows(n)
        _decode_rows(store, part, rows, np.arange(n), paths, digests, size, read, cache_dir, pool, rank,
                     stop_at_bad=False)
    counts = rows.type_counts()
    notes = []
    if set(counts) & EIGHT_BIT and set(counts) - EIGHT_BIT:  # one rule per run: 8-bit files scaled per image too
        wide = widest(counts)
        notes.append(f"warning: the images mix pixel types: {_listed(counts)}; every image is scaled per image "
                     f"(min-max), as {wide} images are, 8-bit ones included, in training and predict (model.json "
                     f"records input_dtype '{wide}'). Convert them to one type to keep 8-bit images at value / 255")
        per_image = dataclasses.replace(read, input_dtype=wide)
        eight = [rows.types.index(t) for t in EIGHT_BIT if t in rows.types]
        redo = np.flatnonzero((rows.status == OK) & np.isin(rows.type_code, eight))
        again = Rows(n)
        _decode_rows(store, part, again, redo, paths, digests, size, per_image, cache_dir, pool, rank,
                     stop_at_bad=False, title="decoding 8-bit images again")
    decoded = int(((rows.status == OK) | (rows.status == RGB)).sum())
    rgb = int(((rows.status == OK) & (rows.chans == 3)).sum())
    channels = 3 if rgb else 1
    if 0 < rgb < decoded:
        notes.append(f"warning: {rgb} of {decoded} images are RGB, so the run is 3-channel (grey images "
                     "repeated in R, G and B); no option chooses otherwise: convert those files to greyscale for a "
                     "1-channel run")
    keep = rows.status != BAD
    skipped = [[int(r), rows.why[int(r)]] for r in np.flatnonzero(~keep)]
    index = {"rows": n, "skipped": skipped, "types": dict(counts), "notes": notes,
             "hits": int(rows.hits[keep].sum())}
    store.finish(part, index, keep, channels)


def _listed(counts: Counter) -> str:
    return ", ".join(f"{t} ({n})" for t, n in counts.most_common())


def _hash(paths, pool) -> np.ndarray:
    """Content digests ('!reason' for a file that cannot be read), in the pool; remembered in this process."""
    out = np.empty(len(paths), dtype=object)
    chunk = max(1, min(256, -(-len(paths) // (4 * pool.workers))))
    tasks = [(i, [str(p) for p in paths[i:i + chunk]]) for i in range(0, len(paths), chunk)]
    with progress.task("hashing files", total=len(paths), unit="files") as bar:
        results = (pool.executor.map(_hash_chunk, [t for _, t in tasks]) if pool.executor is not None
                   else map(_hash_chunk, [t for _, t in tasks]))
        for (start, _), got in zip(tasks, results):
            for j, (memo, digest) in enumerate(got):
                out[start + j] = digest
                if memo is not None and not digest.startswith("!"):
                    remember_digest(memo, digest)
            bar.advance(len(got))
    return out


class _Pool:
    """``workers`` processes (forked where CUDA is not in use, else spawned), or none for one worker."""

    def __init__(self, workers: int, files: int):
        self.workers = max(1, min(workers, files))
        self.executor = None
        if self.workers > 1:
            method = "spawn" if torch.cuda.is_available() and torch.cuda.is_initialized() else "fork"
            self.executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(method),
                                                initializer=_init_worker)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)


def _ranks() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1
