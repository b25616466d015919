"""npz archives opened without trusting them: every member's .npy header (shape, type) is read and checked
before any array data is decompressed.

Usage::

    with NpzArchive("data.npz") as npz:
        npz.keys(), npz.shape("train_images"), npz.dtype("train_images")
        npz.check_images(["train_images", "val_images"])      # shapes, pixel limits, from the headers
        npz.check_memory(["train_images", "train_labels"])    # the total, against the machine's memory
        y = npz.load("train_labels")
        x = npz.load_stacked(["train_images", "val_images"])  # one array, filled in place

A compressed npz can unpack to far more than its size (1.3 MB of zip holding 1.4 GB of zeros), so the
headers are checked first, with the limits of the image readers: :data:`~medxfer.data.intensity.MAX_PIXELS`
per 2-D image and :data:`~medxfer.data.intensity.MAX_VOXELS` per volume, plus a bound on the total
the machine's memory sets (:func:`max_bytes`). Object (pickled) arrays are refused from their header
and never loaded. Every problem is a :class:`~medxfer.errors.MedxferError` of one line naming the
archive and the array.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib import format as npformat

from medxfer.data.intensity import MAX_PIXELS, MAX_VOXELS
from medxfer.errors import MedxferError

#: how much of the machine's memory the arrays of one npz may take (the rest: decoding, the model)
MEMORY_SHARE = 4
_CHUNK = 1 << 24


@dataclass(frozen=True)
class Member:
    """One array of an npz, as its header describes it."""

    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int                      # bytes of the .npy header before the data

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def memory_bytes() -> int | None:
    """The memory this process may use: the machine's, or its cgroup's limit when lower; None if unknown."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(int(limit), total or int(limit))
    except OSError:
        pass
    return total if total and total > 0 else None


def max_bytes() -> tuple[int | None, str]:
    """(the most bytes of arrays read from one npz, where that bound comes from)."""
    env = os.environ.get("MEDXFER_MAX_NPZ_BYTES")
    if env:
        try:
            return int(float(env)), "MEDXFER_MAX_NPZ_BYTES"
        except ValueError:
            raise MedxferError(f"MEDXFER_MAX_NPZ_BYTES must be a number of bytes such as 8e9. Got {env!r} "
                               "instead.") from None
    memory = memory_bytes()
    if memory is None:
        return None, ""
    return memory // MEMORY_SHARE, f"1/{MEMORY_SHARE} of this machine's {human(memory)} of memory"


def human(n: int) -> str:
    """Bytes as '1.4 GB' (decimal units)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


class NpzArchive:
    """An npz whose members' headers are read (not their data) when it is opened."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = f"npz '{self.path}'"
        try:
            self._zip = zipfile.ZipFile(self.path)
            infos = [i for i in self._zip.infolist() if i.filename.endswith(".npy")]
            self.members = {i.filename[:-4]: self._header(i) for i in infos}
        except MedxferError:
            self.close()
            raise
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError) as e:
            self.close()
            raise MedxferError(f"cannot read {self.name} ({type(e).__name__}). Is it a NumPy .npz archive?") from None

    def __enter__(self) -> NpzArchive:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "_zip", None) is not None:
            self._zip.close()

    def _header(self, info: zipfile.ZipInfo) -> Member:
        key = info.filename[:-4]
        with self._zip.open(info) as f:
            try:
                version = npformat.read_magic(f)
                read = {(1, 0): npformat.read_array_header_1_0, (2, 0): npformat.read_array_header_2_0}.get(version)
                if read is None:
                    raise ValueError(f"format version {version}")
                shape, fortran, dtype = read(f)
            except ValueError as e:
                raise MedxferError(f"{self.name}: '{key}' is not a readable .npy array ({str(e)[:80]}); the archive is "
                                   "damaged. Save it again with numpy.savez.") from None
            offset = f.tell()
        if dtype.hasobject:
            raise MedxferError(f"{self.name} holds an object (pickled) array in '{key}', which medxfer never loads: "
                               "save it as a numeric or string array.")
        member = Member(info, tuple(int(s) for s in shape), dtype, bool(fortran), offset)
        if info.file_size < offset + member.nbytes:
            raise MedxferError(f"{self.name}: '{key}' is damaged: its header claims {human(member.nbytes)} of "
                               f"{member.shape} {dtype}, the archive holds {human(info.file_size - offset)}.")
        return member

    def keys(self) -> list[str]:
        return list(self.members)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.members[key].shape

    def dtype(self, key: str) -> np.dtype:
        return self.members[key].dtype

    # ------------------------------------------------------------------------------------ checks
    def check_images(self, keys, hint: str = "") -> None:
        """Refuse image arrays that are not numbers, not (N,H,W), (N,H,W,3) or (N,D,H,W), hold no images or an
        image with a side of 0, or images above the pixel (voxel) limits; ``hint`` ends an empty-array message."""
        for key in keys:
            shape, dtype = self.shape(key), self.dtype(key)
            if dtype.kind not in "biuf":
                raise MedxferError(f"{self.name}: {key} holds values of type {dtype}, not pixel values; save the "
                                   "images as numbers.")
            if len(shape) not in (3, 4):
                raise MedxferError(f"{self.name}: {key} has shape {shape}; expected (N,H,W), (N,H,W,3) or (N,D,H,W).")
            if shape[0] == 0:
                raise MedxferError(f"{self.name}: {key} holds no images (shape {shape}){hint}.")
            if min(shape[1:]) < 1:
                raise MedxferError(f"{self.name}: {key} has images of shape {shape[1:]}, with a side of 0 pixels; "
                                   "every image needs at least 1x1 pixels.")
            volume = len(shape) == 4 and shape[-1] != 3
            each = shape[1:] if volume else shape[1:3]
            limit, unit, env = (MAX_VOXELS, "voxels", "MEDXFER_MAX_VOXELS") if volume else \
                (MAX_PIXELS, "pixels", "MEDXFER_MAX_PIXELS")
            if math.prod(each) > limit:
                raise MedxferError(f"{self.name}: {key} holds images of {'x'.join(map(str, each))} {unit}, above the "
                                   f"limit of {limit} {unit} per image (possible decompression bomb; set {env} to "
                                   "allow larger images).")

    def check_alike(self, keys) -> None:
        """Refuse image arrays (splits) of different image sizes or pixel types: one model takes them all, scaled
        one way."""
        first = keys[0]
        for key in keys[1:]:
            if self.shape(key)[1:] != self.shape(first)[1:]:
                sides = {k: "x".join(map(str, self.shape(k)[1:])) for k in (first, key)}
                raise MedxferError(f"{self.name}: {first} are {sides[first]} but {key} are {sides[key]}; give every "
                                   "split images of one size (resize them), so that one model takes them all.")
            if self.dtype(key) != self.dtype(first):
                raise MedxferError(f"{self.name}: {first} are {self.dtype(first)} but {key} are {self.dtype(key)}; "
                                   "give every split one pixel type, or the splits would be scaled differently.")

    def check_memory(self, keys) -> None:
        """Refuse when the arrays ``keys`` unpack to more than :func:`max_bytes` (nothing is read)."""
        total = sum(self.members[k].nbytes for k in keys)
        bound, why = max_bytes()
        if bound is not None and total > bound:
            sizes = ", ".join(f"{k} {human(self.members[k].nbytes)}" for k in keys)
            raise MedxferError(f"{self.name} unpacks to {human(total)} of arrays ({sizes}), above the {human(bound)} "
                               f"medxfer reads from one npz here ({why}): use a machine with more memory, store the "
                               "images as files in a folder, or set MEDXFER_MAX_NPZ_BYTES to allow more.")

    # ------------------------------------------------------------------------------------ data
    def load(self, key: str) -> np.ndarray:
        """One array, as ``numpy.load`` gives it (no pickles)."""
        m = self.members[key]
        buf = np.empty(m.nbytes, np.uint8)
        self._fill(m, buf)
        return buf.view(m.dtype).reshape(m.shape, order="F" if m.fortran else "C")

    def load_stacked(self, keys) -> np.ndarray:
        """Arrays of one type and trailing shape stacked along axis 0, read straight into one array."""
        members = [self.members[k] for k in keys]
        first = members[0]
        out = np.empty((sum(m.shape[0] for m in members), *first.shape[1:]), first.dtype)
        start = 0
        for key, m in zip(keys, members):
            part = out[start:start + m.shape[0]]
            if m.fortran or m.dtype != first.dtype or m.shape[1:] != first.shape[1:]:
                part[...] = self.load(key)
            else:
                self._fill(m, part.reshape(-1).view(np.uint8))
            start += m.shape[0]
        return out

    def _fill(self, m: Member, buf: np.ndarray) -> None:
        """Read the member's data into the uint8 buffer ``buf`` (its exact size), in chunks."""
        view = memoryview(buf)
        try:
            with self._zip.open(m.info) as f:
                f.seek(m.offset) if f.seekable() else f.read(m.offset)
                pos = 0
                while pos < len(view):
                    n = f.readinto(view[pos:pos + _CHUNK])
                    if not n:
                        raise EOFError
                    pos += n
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
            raise MedxferError(f"cannot read {self.name}: '{m.info.filename[:-4]}' is damaged "
                               f"({type(e).__name__}).") from None
