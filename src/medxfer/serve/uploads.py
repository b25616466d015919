"""Uploads to temporary files: a safe suffix from the extension (or the content), never the name.

The client's file name is read for its extension only and then dropped: names of medical images
often hold patient names, so they appear in no path, log line or answer. Images are identified by
their index in the request.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import BinaryIO

# Magic numbers -> suffix, for uploads whose extension is missing or not one the readers take.
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", ".png"),
    (0, b"\xff\xd8\xff", ".jpg"),
    (0, b"II*\x00", ".tif"),
    (0, b"MM\x00*", ".tif"),
    (0, b"BM", ".bmp"),
    (0, b"\x93NUMPY", ".npy"),
    (128, b"DICM", ".dcm"),
    (344, b"n+1\x00", ".nii"),
    (344, b"ni1\x00", ".nii"),
)


def extension_of(filename: str | None) -> str:
    """The lower-case extension of a client file name ('.nii.gz' kept whole); '' when none."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1].lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    stem, dot, ext = name.rpartition(".")
    return f".{ext}" if dot and stem and ext else ""


def sniff(head: bytes) -> str | None:
    """A suffix from the first bytes of a file, or None."""
    for offset, magic, suffix in _MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return suffix
    if head[:2] == b"\x1f\x8b":  # gzip: the readers take gzip only as .nii.gz
        return ".nii.gz"
    return None


def png_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's first 24 bytes (signature and IHDR), or None when they are not a PNG's."""
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def safe_suffix(filename: str | None, head: bytes, allowed: list[str]) -> str | None:
    """The suffix to store an upload under: its extension when a reader takes it, else one sniffed
    from the content; None when neither (the caller refuses the upload)."""
    ext = extension_of(filename)
    if ext in allowed:
        return ext
    found = sniff(head)
    return found if found in allowed else None


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class UploadDir:
    """A private temporary folder (0700) for the uploads of one server process.

    In memory (``/dev/shm``) where the machine has it: uploads never reach a disk, and writing them
    costs less; else the system's temporary folder. Each file lives only while it is decoded.
    """

    def __init__(self, root: str | None = None):
        if root is None and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK):
            root = "/dev/shm"
        self.path = Path(tempfile.mkdtemp(prefix="medxfer-serve-", dir=root))

    def write(self, data: bytes | BinaryIO, suffix: str) -> Path:
        """``data`` (bytes, or a binary file copied from its start in 1 MB pieces) in a new file
        (0600) with a random name and ``suffix``."""
        while True:
            path = self.path / f"{secrets.token_hex(8)}{suffix}"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
                break
            except FileExistsError:
                continue
        try:
            if isinstance(data, (bytes, bytearray, memoryview)):
                _write_all(fd, data)
            else:
                data.seek(0)
                while chunk := data.read(2**20):
                    _write_all(fd, chunk)
                data.seek(0)
        finally:
            os.close(fd)
        return path

    def cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)
