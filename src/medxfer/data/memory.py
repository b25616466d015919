"""Whether a run's images fit in memory, decided from the manifest before any image is decoded.

Usage::

    plan = check_memory(manifest, size=28, volumes=True, batch_size=64, arch="test_resnet")
    # logs the plan; refuses in one line (MedxferError) naming the numbers and what to pass when it cannot fit
    plan = plan_memory(manifest, 28, volumes=True)          # the same numbers, no check
    plan.peak, plan.decoded, plan.available

What a run holds (measured on the code paths in :mod:`medxfer.data.loading` and the training loop):

- ``decoded``: the uint8 store, samples x channels x size^d bytes (d = 3 for volumes). Decoding keeps
  the chunks and their concatenation at once, and training takes copies of the train and val rows, so
  twice that is held at the peak;
- ``decoding``: a chunk of at most 256 npz images in float32, before and after resizing (about three
  float copies of the resized chunk live at once);
- ``training``: a batch of float32 inputs and what one training step adds per input value:
  :data:`ACTIVATIONS` (the resident memory of a forward and backward pass of the networks named there,
  which the activations saved for backward account for), :data:`DEFAULT_ACTIVATIONS` for other networks.

peak = 2 x decoded + the larger of decoding and training. The images already read (an npz's arrays) and
the interpreter are not counted: they are in use already, so the available memory excludes them.

Image files are decoded by ``workers`` processes into the decoded store on disk (:mod:`medxfer.data.store`),
which training maps: the store is counted on disk (``disk``: the store, plus the per-file cache's entries when
it is written), against the free space of the cache folder, and in memory only once (the training copies of
the train and val rows), with each worker's image and :data:`WORKER_BYTES`. A store that cannot fit on disk is
refused in one line too, saying what to pass (``--image-size``, ``--cache-dir``).

Available memory: ``MemAvailable`` of /proc/meminfo, lowered to the cgroup's limit minus its usage
(v2 ``memory.max``/``memory.current``, v1 ``memory.limit_in_bytes``/``memory.usage_in_bytes``; its
inactive page cache counted as free) when lower; ``os.sysconf`` free pages where neither exists; ``MEDXFER_MEMORY`` (bytes, e.g. 8e9) overrides.
Unknown memory is logged and never refused.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from medxfer.data.npzfile import human
from medxfer.errors import MedxferError

log = logging.getLogger(__name__)

#: bytes a training step adds per float32 input value, (arch prefix, spatial dims) -> factor: the resident memory
#: of one forward and backward pass over its input bytes (measured: efficientnet_lite0 2-D 404 at 224 px, 443 at
#: 64 px; inflated to 3-D 174 at 28^3, 136 at 48^3; test_resnet 2-D 70 at 64 px, 3-D 41 at 28^3), rounded up
ACTIVATIONS = {("tf_efficientnet_lite", 2): 500, ("tf_efficientnet_lite", 3): 200, ("test_resnet", 2): 90,
               ("test_resnet", 3): 50}
#: other networks: the largest factor above
DEFAULT_ACTIVATIONS = {2: 500, 3: 200}
#: npz images decoded at once (medxfer.data.loading.decode_arrays)
CHUNK = 256
#: private memory of one decoding worker process besides its image (forked: the interpreter and torch are
#: shared with the parent until written). bench/bench_scale.py: a worker's Pss_Anon peaked at 115-162 MB, of
#: which about 105 MB is its share of the parent's 316 MB (3 processes), so 10-60 MB its own; rounded up
WORKER_BYTES = 100 * 2 ** 20
#: the per-file cache: an entry's .npy header and record, and the file system's block
ENTRY_HEADER, BLOCK = 256, 4096
#: cgroup files (v2, then v1): (limit, usage)
CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


@dataclass(frozen=True)
class MemoryPlan:
    """The bytes a run will allocate for its images (from counts and shapes), and the memory it may use."""

    samples: int
    size: int
    channels: int
    spatial_dims: int
    batch_size: int
    activations: float           # saved bytes per input byte (ACTIVATIONS)
    native: int | None = None    # values of one npz image before resizing; None: files, decoded one at a time
    available: int | None = None  # bytes this process may still allocate; None: unknown
    available_from: str = ""
    on_disk: bool = False        # files: decoded into the store on disk (mapped), not held in memory
    workers: int = 1             # decoding processes (files)
    disk_free: int | None = None  # free bytes in the cache folder; None: not checked
    disk_at: str = ""            # the cache folder
    file_cache: bool = False     # the per-file decode cache is written too

    @property
    def disk(self) -> int:
        """Bytes the decoded store (and the per-file cache entries) take on disk; 0 when nothing is stored."""
        if not self.on_disk:
            return 0
        entries = self.samples * -(-(self.values + ENTRY_HEADER) // BLOCK) * BLOCK if self.file_cache else 0
        return self.decoded + entries

    @property
    def disk_fits(self) -> bool:
        return self.disk_free is None or self.disk <= self.disk_free

    @property
    def values(self) -> int:
        """Values (bytes, uint8) of one decoded sample."""
        return self.channels * self.size ** self.spatial_dims

    @property
    def decoded(self) -> int:
        return self.samples * self.values

    @property
    def decoding(self) -> int:
        """A float32 chunk: npz images before (astype, /255) and after resizing (three copies); files one by one
        in each worker process (:data:`WORKER_BYTES` each besides)."""
        if self.native is None:
            return self.workers * (4 * 3 * self.values + (WORKER_BYTES if self.workers > 1 else 0))
        return min(CHUNK, self.samples) * 4 * (2 * self.channels * self.native + 3 * self.values)

    @property
    def training(self) -> int:
        """A batch of float32 inputs and the activations saved for its backward pass."""
        return int(min(self.batch_size, self.samples) * self.values * 4 * (1 + self.activations))

    @property
    def peak(self) -> int:
        """npz: the decoded images twice (decoding, then the training copies); files: once (the training copies
        of the train and val rows; the store itself is on disk, in the page cache)."""
        return (1 if self.on_disk else 2) * self.decoded + max(self.decoding, self.training)

    @property
    def fits(self) -> bool:
        return self.available is None or self.peak <= self.available

    def describe(self) -> str:
        kind = "volumes" if self.spatial_dims == 3 else "images"
        grid = f"{self.size}^3" if self.spatial_dims == 3 else f"{self.size}x{self.size}"
        where = f" ({human(self.disk)} on disk)" if self.on_disk else ""
        return (f"{self.samples} {kind} of {grid} x {self.channels} channel{'s' if self.channels > 1 else ''} need "
                f"about {human(self.decoded)} decoded (uint8){where} and {human(self.peak)} of memory at the peak "
                f"(decoding and training, batch {self.batch_size})")


def plan_memory(manifest, size: int, *, volumes: bool, batch_size: int = 64, arch: str | None = None,
                channels: int | None = None, workers: int = 1, store_dir: str | Path | None = None,
                file_cache: bool = True) -> MemoryPlan:
    """The :class:`MemoryPlan` of decoding ``manifest`` at ``size`` and training on it (see the module
    docstring). Nothing is read but array shapes and, for image files, a few headers (their channels).
    ``store_dir``: where image files are decoded to (the cache folder), whose free space is checked."""
    dims = 3 if volumes else 2
    available, where = available_bytes()
    arrays = manifest.arrays
    native = math.prod(arrays.shape[1:]) // (3 if _rgb_arrays(arrays) else 1) if arrays is not None else None
    free = free_disk(store_dir) if arrays is None and store_dir is not None else None
    return MemoryPlan(len(manifest.table), int(size), channels or guess_channels(manifest), dims, int(batch_size),
                      _factor(arch, dims), native, available, where, on_disk=arrays is None,
                      workers=max(1, int(workers)), disk_free=free, disk_at=str(store_dir or ""),
                      file_cache=file_cache and store_dir is not None)


def check_memory(manifest, size: int, *, volumes: bool, batch_size: int = 64, arch: str | None = None,
                 channels: int | None = None, workers: int = 1, store_dir: str | Path | None = None,
                 file_cache: bool = True) -> MemoryPlan:
    """Log the plan, or refuse in one line (the plan's numbers and what to pass) when it cannot fit in memory,
    or its decoded store on the disk of ``store_dir``."""
    plan = plan_memory(manifest, size, volumes=volumes, batch_size=batch_size, arch=arch, channels=channels,
                       workers=workers, store_dir=store_dir, file_cache=file_cache)
    if not plan.disk_fits:
        raise MedxferError(f"not enough disk for the decoded images: {plan.describe()}, but the cache folder "
                           f"'{plan.disk_at}' has {human(plan.disk_free)} free. {disk_advice(plan)}")
    if plan.disk_free is not None:
        log.info("disk plan: the decoded store takes about %s of the %s free in the cache folder",
                 human(plan.disk), human(plan.disk_free))
    if plan.available is None:
        log.info("memory plan: %s; the memory available is unknown (set MEDXFER_MEMORY to the bytes this run may "
                 "use to have it checked)", plan.describe())
        return plan
    if plan.fits:
        log.info("memory plan: %s, of %s available (%s)", plan.describe(), human(plan.available), plan.available_from)
        return plan
    raise MedxferError(f"not enough memory: {plan.describe()}, but {human(plan.available)} is available "
                       f"({plan.available_from}). {advice(plan)}")


def disk_advice(plan: MemoryPlan) -> str:
    """What to pass when the store does not fit on disk: a smaller --image-size, or a --cache-dir with room."""
    tips = [f"pass --cache-dir DIR on a disk with at least {human(plan.disk)} free"]
    size = next((s for s in range(plan.size - 1, 7, -1) if replace(plan, size=s).disk_fits), None)
    if size is not None:
        tips.insert(0, f"pass --image-size {size} or less (about {human(replace(plan, size=size).disk)} on disk)")
    if plan.file_cache:
        tips.append("free space in the cache folder (deleting it is always safe)")
    return "To fit: " + ", or ".join(tips) + "."


def free_disk(folder: str | Path) -> int | None:
    """Free bytes on the disk that holds ``folder`` (or its nearest existing parent); None when unknown."""
    path = Path(folder).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def advice(plan: MemoryPlan) -> str:
    """What to pass: the largest --image-size that fits, how many samples fit at this size, a smaller batch,
    fewer decoding workers."""
    tips = []
    size = next((s for s in range(plan.size - 1, 7, -1) if replace(plan, size=s).fits), None)
    if size is not None:
        tips.append(f"pass --image-size {size} or less (about {human(replace(plan, size=size).peak)} at the peak)")
    n = next((k for k in _fewer(plan.samples) if replace(plan, samples=k).fits), None)
    if n is not None and n >= max(plan.batch_size, plan.samples // 10):  # else the batch is what does not fit
        tips.append(f"use at most {n} samples at this size")
    if plan.training > plan.decoding and replace(plan, batch_size=8).fits and plan.batch_size > 8:
        batch = next(b for b in range(plan.batch_size - 1, 7, -1) if replace(plan, batch_size=b).fits)
        tips.append(f"pass --batch-size {batch} or less")
    if plan.workers > 1 and plan.decoding >= plan.training:
        workers = next((w for w in range(plan.workers - 1, 0, -1) if replace(plan, workers=w).fits), None)
        if workers is not None:
            tips.append(f"pass --workers {workers} or less")
    more = "set MEDXFER_MEMORY=BYTES if more memory is free than measured"
    if not tips:
        return f"Use a machine with more memory, or {more}."
    return "To fit: " + ", or ".join(tips) + f"; or {more}."


def _fewer(n: int):
    """n less 10 % at a time, down to 1."""
    while n > 1:
        n = n * 9 // 10
        yield n


def _factor(arch: str | None, dims: int) -> float:
    name = (arch or "").split(".")[0]
    for (prefix, d), factor in ACTIVATIONS.items():
        if d == dims and name.startswith(prefix):
            return factor
    return DEFAULT_ACTIVATIONS[dims]


def guess_channels(manifest) -> int:
    """3 for RGB npz images or RGB files among a few headers read, else 1 (a run is 3-channel if any file is)."""
    if manifest.arrays is not None:
        return 3 if _rgb_arrays(manifest.arrays) else 1
    if "path" not in manifest.table:
        return 1
    from PIL import Image

    paths = manifest.table["path"].tolist()
    for p in paths[:: max(1, len(paths) // 20)][:20]:
        try:
            with Image.open(p) as img:            # the header only
                if img.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV"):
                    return 3
        except Exception:  # noqa: BLE001 - DICOM, NIfTI, .npy and unreadable files: grey (readers say more later)
            continue
    return 1


def _rgb_arrays(arrays) -> bool:
    """npz images (N,H,W,3) (not volumes (N,D,H,W), which never end in 3 channels as loading reads them)."""
    return arrays.ndim == 4 and arrays.shape[-1] == 3


def available_bytes() -> tuple[int | None, str]:
    """(bytes this process may still allocate, where that number comes from); (None, '') when unknown."""
    env = os.environ.get("MEDXFER_MEMORY")
    if env:
        try:
            return int(float(env)), "MEDXFER_MEMORY"
        except ValueError:
            raise MedxferError(f"MEDXFER_MEMORY must be a number of bytes such as 8e9. Got {env!r} instead.") from None
    found, where = _meminfo_available(), "MemAvailable in /proc/meminfo"
    if found is None:
        try:
            found, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "free memory (sysconf)"
        except (ValueError, OSError, AttributeError):
            found, where = None, ""
    cgroup = _cgroup_free()
    if cgroup is not None and (found is None or cgroup < found):
        found, where = cgroup, "this cgroup's limit less its usage"
    return (found, where) if found is not None and found > 0 else (None, "")


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_free() -> int | None:
    """The cgroup's limit less its usage, its reclaimable page cache (inactive files) counted as free."""
    for limit_file, usage_file in CGROUP_FILES:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:          # "max", or v1's huge number: no limit
            return max(0, int(limit) - usage + _inactive_file(Path(limit_file).parent / "memory.stat"))
    return None


def _inactive_file(stat: Path) -> int:
    try:
        for line in stat.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file"):
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
