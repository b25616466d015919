"""Decoded, preprocessed images on disk, so that epoch 2 (and the next run) skips decoding.

Usage::

    from medxfer.data.cache import DecodeCache, default_cache_dir

    cache = DecodeCache(default_cache_dir())
    key = cache.key("scans/0042.dcm", {"size": 64, **opts.key()})
    img = cache.get(key)                 # np.ndarray, or None on a miss
    if img is None:
        img = decode_and_resize(...)     # uint8 (C, S, S)
        cache.put(key, img)

Keys hash the file's bytes (not its name or time) plus every preprocessing parameter, so an
edited file or a changed option is a miss, and a renamed or copied file is a hit. Entries are
``.npy`` files under two-character shard folders (``ab/abcdef....npy``). Writes go to a temporary
file in the same folder and are moved into place with ``os.replace``: an interrupted run leaves
no half-written entry under the final name; a corrupt or truncated entry (disk full, crash during
a copy of the cache) reads as a miss and is deleted.

Deleting the cache folder is always safe.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
import threading
from pathlib import Path

import numpy as np

from medxfer.errors import BadFileError, MedxferError
from medxfer.files import sha256_file

__all__ = ["DecodeCache", "cache_root", "default_cache_dir", "digest_memo", "file_digest", "remember_digest"]

_KEY = re.compile(r"[0-9a-f]{16,128}")
_digests: dict[tuple[str, int, int, int], str] = {}
_digests_lock = threading.Lock()


def default_cache_dir() -> Path:
    """The decode cache: ``$MEDXFER_CACHE_DIR`` when set, else ``~/.cache/medxfer/decode``."""
    env = os.environ.get("MEDXFER_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "medxfer" / "decode"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The folder every medxfer cache lives under: ``cache_dir`` (``--cache-dir``), else
    ``$MEDXFER_CACHE_DIR``, else ``~/.cache/medxfer`` (the decode cache in ``decode/`` there)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MEDXFER_CACHE_DIR")
    return Path(env).expanduser() if env else default_cache_dir().parent


def file_digest(path: str | Path) -> str:
    """SHA-256 hex digest of the file's bytes, streamed; memoised by (path, size, mtime_ns, ctime_ns: any write
    changes the ctime, which no program sets back). A folder (a DICOM series) digests its files' names and
    digests, in name order. A file that cannot be read (gone, a broken or looping link, no permission) raises
    :class:`BadFileError`, so the bad-file policy decides."""
    path = os.path.abspath(path)
    try:
        return _digest(path)
    except OSError as e:
        raise BadFileError(path, os_reason(e)) from None


def os_reason(e: OSError) -> str:
    """Why a file cannot be opened, in words (a broken or looping link, a missing file, no permission)."""
    if e.errno == errno.ELOOP:
        return "a link that loops (it leads back to itself)"
    if isinstance(e, FileNotFoundError):
        return "file not found (a broken link, or the file was removed)"
    if isinstance(e, PermissionError):
        return "permission denied"
    return e.strerror or type(e).__name__


def remember_digest(memo: tuple[str, int, int, int], digest: str) -> None:
    """Keep a digest computed elsewhere (a decoding worker) under its (path, size, mtime_ns, ctime_ns)."""
    with _digests_lock:
        _digests[memo] = digest


def digest_memo(path: str | Path) -> tuple[str, int, int, int] | None:
    """The (path, size, mtime_ns, ctime_ns) a file's digest is remembered under; None for a folder or a missing
    file. The ctime: a file rewritten with its old size and modification time set back is read again."""
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except OSError:
        return None
    return None if os.path.isdir(path) else (path, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _digest(path: str) -> str:
    if os.path.isdir(path):
        parts = [f"{name}:{_digest(os.path.join(path, name))}" for name in sorted(os.listdir(path))
                 if os.path.isfile(os.path.join(path, name))]  # any file name: its bytes, as the disk holds them
        return hashlib.sha256("\n".join(parts).encode("utf-8", "surrogateescape")).hexdigest()
    st = os.stat(path)
    memo = (path, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _digests_lock:
        known = _digests.get(memo)
    if known is not None:
        return known
    digest = sha256_file(path)
    with _digests_lock:
        _digests[memo] = digest
    return digest


class DecodeCache:
    """Decoded, preprocessed images on disk, keyed by file content + every preprocessing parameter.

    ``directory`` is created on the first :meth:`put`. Safe to share between processes (DataLoader
    workers, DDP ranks): entries are written atomically and identical keys hold identical data.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser()

    def __repr__(self) -> str:
        return f"DecodeCache({str(self.directory)!r})"

    @staticmethod
    def key(path: str | Path, params: dict) -> str:
        """sha256 of (the file's content digest, ``json.dumps(params, sort_keys=True)``).

        ``params`` must hold every parameter that changes the decoded array (size, read options,
        ...); values that JSON cannot encode are turned into their ``str``.
        """
        return DecodeCache.key_of(file_digest(path), params)

    @staticmethod
    def key_of(digest: str, params: dict) -> str:
        """:meth:`key` from a content digest already known (:func:`file_digest`), without reading the file."""
        text = json.dumps(params, sort_keys=True, default=str)
        return hashlib.sha256(f"{digest}\n{text}".encode("utf-8")).hexdigest()

    def check_writable(self) -> None:
        """Refuse a cache folder that is a file or cannot be written, before any work starts."""
        if self.directory.exists() and not self.directory.is_dir():
            raise MedxferError(f"--cache-dir '{self.directory}' is a file; give a folder (or --no-cache).")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise MedxferError(f"cannot write the decode cache '{self.directory}' ({e.strerror or type(e).__name__}). "
                               "Pass --cache-dir DIR (a writable folder) or --no-cache.") from None

    def _entry(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(f"not a DecodeCache key (lowercase hex): {key!r}")
        return self.directory / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        """The stored array, or None on a miss or a corrupt/partial entry (which is deleted)."""
        entry = self._entry(key)
        try:
            with open(entry, "rb") as f:
                arr = np.load(f, allow_pickle=False)
                if f.read(1):  # trailing bytes: not what put() wrote
                    raise ValueError("trailing data")
        except FileNotFoundError:
            return None
        except (ValueError, OSError, EOFError):
            try:
                entry.unlink()
            except OSError:
                pass
            return None
        return arr

    def put(self, key: str, arr: np.ndarray) -> None:
        """Store ``arr`` under ``key`` atomically (temp file in the same folder + ``os.replace``)."""
        entry = self._entry(key)
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}-", suffix=".tmp", dir=entry.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
            os.replace(tmp, entry)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def __contains__(self, key: str) -> bool:
        return self._entry(key).is_file()

    def clear(self) -> None:
        """Delete every entry (and left-over temporary files) under the cache folder."""
        if not self.directory.is_dir():
            return
        for shard in self.directory.iterdir():
            if shard.is_dir() and len(shard.name) == 2:
                for f in shard.iterdir():
                    if f.suffix in (".npy", ".tmp"):
                        f.unlink(missing_ok=True)
