"""The input size a run uses when ``--image-size`` is not given: chosen from the data, read from headers.

Usage::

    native = native_size(manifest)                       # median side of the samples, from headers only
    size, why = choose_size(native, source_size=224, spatial_dims=2)

The rule (chosen on validation over the bundled and generated data sets: README, "Image size"):

- 2-D: twice the native side, rounded up to a multiple of 32, at least :data:`MIN_2D` (64) and at most
  the source's own input size. Upsampling to about twice the native side lowered the validation loss
  on every set tried (28 px -> 64, 64 px -> 128); going further cost far more CPU (the cost grows with
  the square of the side) for little (a 28 px image at 224 px costs 12x the CPU of 64 px). Large
  images are reduced to the source's size, never past it.
- 3-D: the native side rounded up to a multiple of 4, at most :data:`MAX_3D` (a volume's cost grows with
  the cube of its side): volumes keep their grid.

Native sides come from the array's shape (npz) or each file's header (PNG/JPEG/TIFF through PIL, DICOM
Rows/Columns, NIfTI and .npy headers) of at most :data:`SAMPLE` files spread over the manifest; no
pixel is decoded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MIN_2D = 64
MAX_3D = 64
SAMPLE = 200


def choose_size(native: int | None, source_size: int, spatial_dims: int = 2) -> tuple[int, str]:
    """(size, one sentence saying why) for a run without ``--image-size``."""
    if native is None:
        return source_size, f"the source's input size ({source_size} px; the native size could not be read)"
    if spatial_dims == 3:
        size = min(MAX_3D, -(-native // 4) * 4)
        why = "the volumes' native grid" if size >= native else f"at most {MAX_3D}^3 voxels per volume"
        return size, f"{why} (native {native}^3)"
    size = max(MIN_2D, -(-2 * native // 32) * 32)
    if size >= source_size:
        return source_size, f"the source's input size (twice the native {native} px would pass it)"
    return size, f"about twice the native {native} px (rounded up to a multiple of 32, at least {MIN_2D})"


def sizes_around(size: int, source_size: int, spatial_dims: int = 2) -> list[int]:
    """The sizes ``medxfer auto`` searches without ``--image-sizes``: the chosen ``size`` first (auto's first
    trial is train's recipe), then one step of 1.5x up (rounded to a multiple of 32, at most the source's size),
    or down when ``size`` is already the source's. Volumes: ``size`` alone (each step up costs 3.4x)."""
    if spatial_dims == 3:
        return [size]
    up = min(source_size, -(-3 * size // 64) * 32)
    if up > size:
        return [size, up]
    down = max(32, round(2 * size / 96) * 32)
    return [size, down] if down < size else [size]


def native_size(manifest) -> int | None:
    """The median side (the larger of height and width; depth too for volumes) of the samples, from
    the array's shape or from at most :data:`SAMPLE` file headers. None when no header can be read."""
    if manifest.arrays is not None:
        a = manifest.arrays
        spatial = a.shape[1:4] if a.ndim == 4 and a.shape[-1] not in (1, 3) else a.shape[1:3]
        return int(max(spatial)) if len(spatial) else None
    if "path" not in manifest.table or not len(manifest.table):
        return None
    paths = manifest.table["path"].to_numpy()
    pick = np.unique(np.linspace(0, len(paths) - 1, min(SAMPLE, len(paths))).astype(int))
    sides = [s for s in (header_side(Path(paths[i])) for i in pick) if s]
    return int(np.median(sides)) if sides else None


def header_side(path: Path) -> int | None:
    """The largest spatial side of one file, from its header alone; None when it cannot be read."""
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel

            shape = nibabel.load(str(path)).header.get_data_shape()
            return int(max(shape[:3])) if len(shape) >= 2 else None
        if name.endswith(".npy"):
            with open(path, "rb") as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape = read(f)[0]                    # the header only, no data
            shape = [d for d in shape if d not in (1, 3)] or list(shape)
            return int(max(shape)) if shape else None
        if path.is_dir() or name.endswith((".dcm", ".dicom")) or not Path(name).suffix:
            return _dicom_side(path)
        from PIL import Image

        with Image.open(path) as img:
            return int(max(img.size))
    except Exception:  # noqa: BLE001 - a header that cannot be read only leaves the size to the other files
        return None


def _dicom_side(path: Path) -> int | None:
    import pydicom

    if path.is_dir():  # a DICOM series: the slices' side; the depth is their count
        files = sorted(p for p in path.iterdir() if p.is_file())
        if not files:
            return None
        side = _dicom_side(files[0])
        return max(side or 0, len(files)) or None
    ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    return max(rows, cols) or None
