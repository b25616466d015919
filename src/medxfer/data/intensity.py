"""The intensity step and volume slicing shared by every reader (and by npz sources).

Usage::

    from medxfer.data.readers import ReadOptions, to_unit_range, volume_to_2d

    x01 = to_unit_range(ct_hu, ReadOptions(window="lung"))          # any shape -> float32 [0, 1]
    img = volume_to_2d(vol_dhw, ReadOptions(slice="mip"))            # (D,H,W) -> (1,H,W)
    imgs = volume_to_2d(medmnist3d, ReadOptions(slice="orthogonal"))  # (N,D,H,W) -> (N,3,H,W)

The option strings are parsed here (``parse_*``); a bad value raises MedxferError with what is
allowed and what was given.

The input contract: under ``intensity="auto"`` a run scales its inputs the way its training images were
scaled, which the type of those pixels decides (``ReadOptions.input_dtype``, from ``model.json``):

* trained on 8-bit images (uint8): uint8 is divided by 255 and floats in [0, 1] are taken as they are
  (``x / 255``, what torchvision's ``ToTensor`` gives); other floats and wider integers (a 16-bit
  file) are refused (:class:`OffContract`), never stretched;
* trained on other types (16-bit, floats, DICOM or NIfTI in physical units; or 8-bit files mixed with
  wider ones, which training then scales per image too): every input is min-max scaled per image,
  uint8 included;
* training itself, and runs of earlier releases (no type recorded): each image by its own type
  (uint8 / 255, others min-max).

A window (``--window``, or a DICOM's own) comes first and needs no contract.
:func:`pixel_types` collects the types the intensity step is given, for a run to record them.
"""

from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path

import numpy as np

from medxfer.errors import BadFileError, MedxferError, did_you_mean

#: 2D images above this many pixels (8192 x 8192) are refused from their header, before decoding:
#: decompression bombs (a 746 KB PNG can claim 16000 x 16000 pixels). ``MEDXFER_MAX_PIXELS`` raises it.
MAX_PIXELS = int(os.environ.get("MEDXFER_MAX_PIXELS", 2**26))
#: Volumes (NIfTI, .npy) above this many voxels (e.g. 512 x 512 x 1024) are refused from their header.
MAX_VOXELS = int(os.environ.get("MEDXFER_MAX_VOXELS", 2**28))


class BadPixels(ValueError):
    """An image whose pixels cannot be scaled honestly; callers name the sample (refused or skipped)."""


class NonFinitePixels(BadPixels):
    """An image holds NaN or infinite values: there is no honest way to scale it."""

    def __init__(self, count: int, total: int):
        self.count, self.total = count, total
        super().__init__(f"{count} of {total} pixels are non-finite (NaN or inf)")


class OffContract(BadPixels):
    """Pixels of a type or range the run was not trained on (see the module docstring)."""


def check_pixels(path, *shape: int, limit: int = MAX_PIXELS) -> None:
    """Raise BadFileError when an image of ``shape`` has a side of 0 or would exceed ``limit`` pixels
    (voxels when ``limit`` is :data:`MAX_VOXELS`)."""
    size = "x".join(str(int(s)) for s in shape)
    unit, env = ("voxels", "MEDXFER_MAX_VOXELS") if limit == MAX_VOXELS != MAX_PIXELS else \
        ("pixels", "MEDXFER_MAX_PIXELS")
    if any(int(s) < 1 for s in shape):
        raise BadFileError(path, f"image of {size} {unit}: an empty image (a side of 0)")
    if math.prod(int(s) for s in shape) > limit:
        raise BadFileError(path, f"image of {size} {unit} is above the limit of {limit} {unit} (possible "
                           f"decompression bomb; set {env} to allow larger images)")


#: CT window presets in HU: name -> (center, width).
WINDOW_PRESETS = {
    "lung": (-600.0, 1500.0),
    "soft-tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "mediastinum": (50.0, 350.0),
}

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def _bad(name: str, allowed: str, value, choices=()) -> MedxferError:
    hint = did_you_mean(str(value), choices) if choices else ""
    return MedxferError(
        f"The '{name}' option must be {allowed}. Got {value!r} instead.{hint}"
    )


@lru_cache(maxsize=256)
def parse_window(value: str):
    """'auto' | 'none' -> None | preset or 'C,W' -> (center, width)."""
    allowed = "'auto', 'none', 'C,W' such as '40,400', or one of " + ", ".join(
        repr(p) for p in WINDOW_PRESETS
    )
    if not isinstance(value, str):
        raise _bad("window", allowed, value)
    text = value.strip().lower()
    if text == "auto":
        return "auto"
    if text == "none":
        return None
    if text in WINDOW_PRESETS:
        return WINDOW_PRESETS[text]
    match = re.fullmatch(rf"\s*({_NUMBER})\s*,\s*({_NUMBER})\s*", text)
    if not match:
        raise _bad("window", allowed, value, ["auto", "none", *WINDOW_PRESETS])
    center, width = float(match.group(1)), float(match.group(2))
    if not width > 0:
        raise _bad("window", "a window width above 0 (" + allowed + ")", value)
    return center, width


@lru_cache(maxsize=64)
def parse_frame(value: str):
    """'middle' -> 'middle' | '3' -> 3."""
    if isinstance(value, str) and value.strip().lower() == "middle":
        return "middle"
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise _bad("frame", "'middle' or a frame index such as '0'", value)


@lru_cache(maxsize=64)
def parse_slice(value: str):
    """'middle' | 'mip' | 'orthogonal' | 'volume' -> same string; 'index N' -> ('index', N)."""
    allowed = "'middle', 'index N' (such as 'index 12'), 'mip', 'orthogonal' or 'volume' (3-D)"
    if not isinstance(value, str):
        raise _bad("slice", allowed, value)
    text = value.strip().lower()
    if text in ("middle", "mip", "orthogonal", "volume"):
        return text
    match = re.fullmatch(r"index\s+(\d+)", text)
    if match:
        return ("index", int(match.group(1)))
    raise _bad("slice", allowed, value, ["middle", "mip", "orthogonal", "index"])


@lru_cache(maxsize=64)
def parse_intensity(value: str):
    """'auto' | 'minmax' -> same string; 'p0.5-p99.5' -> (0.5, 99.5)."""
    allowed = "'auto', 'minmax' or percentiles 'pA-pB' such as 'p0.5-p99.5'"
    if not isinstance(value, str):
        raise _bad("intensity", allowed, value)
    text = value.strip().lower()
    if text in ("auto", "minmax"):
        return text
    match = re.fullmatch(r"p(\d+\.?\d*)\s*-\s*p(\d+\.?\d*)", text)
    if match:
        low, high = float(match.group(1)), float(match.group(2))
        if 0 <= low < high <= 100:
            return (low, high)
        raise _bad("intensity", "percentiles with 0 <= A < B <= 100", value)
    raise _bad("intensity", allowed, value, ["auto", "minmax"])


#: the types whose scaling does not depend on the image: uint8 / 255, bool as 0 / 1
EIGHT_BIT = frozenset({"uint8", "bool"})
_seen: ContextVar[list | None] = ContextVar("medxfer_pixel_types", default=None)


@contextmanager
def pixel_types():
    """Collect, in a list, the type name of every pixel array the intensity step is given in the block."""
    seen: list[str] = []
    token = _seen.set(seen)
    try:
        yield seen
    finally:
        _seen.reset(token)


@lru_cache(maxsize=64)
def parse_input_dtype(value: str) -> str:
    """The pixel type a run was trained on ('uint8', 'uint16', 'float32'...; '' none), checked."""
    try:
        ok = value == "" or np.dtype(value).kind in "biuf" and np.dtype(value).name == value
    except TypeError:
        ok = False
    if not ok:
        raise MedxferError(f"The 'input_dtype' of a run must be a numpy pixel type such as 'uint8' or 'float32'. Got "
                           f"{value!r} instead: model.json is damaged; train the run again.")
    return value


def widest(types) -> str:
    """The widest of pixel type names (by size, then bool < unsigned < signed < float), '' for none."""
    order = "buif"
    return max(types, key=lambda t: (np.dtype(t).itemsize, order.index(np.dtype(t).kind)), default="")


def contract(opts) -> str:
    """How ``intensity="auto"`` scales an input (the module docstring): '8-bit', 'per-image' or 'own'."""
    trained = parse_input_dtype(opts.input_dtype)
    return "own" if not trained else "8-bit" if trained in EIGHT_BIT else "per-image"


def dtype_problem(dtype, opts) -> str | None:
    """Why pixels of ``dtype`` do not fit the run's contract, whatever their values; None when they may."""
    dtype = np.dtype(dtype)
    if parse_intensity(opts.intensity) != "auto" or contract(opts) != "8-bit" or dtype.name in EIGHT_BIT or \
            dtype.kind == "f":
        return None
    return (f"pixels of type {dtype.name}, but this model was trained on 8-bit images ({opts.input_dtype}): give "
            "8-bit images (uint8, 0-255) or floats in [0, 1] (x / 255), or train a model on images of this type")


def contract_problem(arr: np.ndarray, opts) -> str | None:
    """Why ``arr`` does not fit the run's contract (its type, or floats outside [0, 1]); None when it does."""
    arr = np.asarray(arr)
    problem = dtype_problem(arr.dtype, opts)
    if problem or arr.dtype.kind != "f" or not arr.size or parse_intensity(opts.intensity) != "auto" or \
            contract(opts) != "8-bit":
        return problem
    low, high = float(arr.min()), float(arr.max())
    if low < 0 or high > 1:
        return (f"floats from {low:.4g} to {high:.4g}, but this model was trained on 8-bit images "
                f"({opts.input_dtype}): give floats in [0, 1] (x / 255) or 8-bit images (uint8, 0-255), not "
                "normalised or 0-255 floats")
    return None


def divides_uint8(opts) -> bool:
    """Whether uint8 images are divided by 255 under ``opts`` (when no window applies)."""
    return parse_intensity(opts.intensity) == "auto" and contract(opts) != "per-image"


def select_frame(n_frames: int, frame: str, path: str | Path | None = None) -> int:
    """The frame index for ``frame`` ('middle' or 'N') among ``n_frames``."""
    choice = parse_frame(frame)
    index = n_frames // 2 if choice == "middle" else choice
    if index >= n_frames:
        message = f"frame {index} requested but there are {n_frames} frames (0-{n_frames - 1})"
        if path is not None:
            raise BadFileError(path, message)
        raise MedxferError(f"The 'frame' option must be below {n_frames}: {message}.")
    return index


def apply_window(arr: np.ndarray, center: float, width: float, function: str = "LINEAR"):
    """DICOM PS3.3 C.11.2.1 window mapped to [0, 1] (float32).

    LINEAR: ``clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)``; LINEAR_EXACT: ``clip((x - c) / w +
    0.5, 0, 1)``; SIGMOID: ``1 / (1 + exp(-4 (x - c) / w))``.
    """
    x = np.asarray(arr, dtype=np.float64)
    function = function.upper()
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - center) / width, -700, 700)))
    elif function == "LINEAR_EXACT":
        out = np.clip((x - center) / width + 0.5, 0.0, 1.0)
    elif width <= 1:
        out = (x > center - 0.5).astype(np.float64)
    else:
        out = np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    return np.nan_to_num(out).astype(np.float32)


def _scale(x: np.ndarray, low: float, high: float) -> np.ndarray:
    if not (np.isfinite(low) and np.isfinite(high)) or high <= low:
        # constant (or all-NaN) image: zeros; percentiles that coincide: a threshold
        return (np.nan_to_num(x, nan=low) > low).astype(np.float32) if np.isfinite(low) else (
            np.zeros(x.shape, np.float32))
    out = np.clip((x - low) / (high - low), 0.0, 1.0)
    return np.nan_to_num(out).astype(np.float32)


def to_unit_range(arr: np.ndarray, opts, *, dicom_window=None) -> np.ndarray:
    """Map an array of any shape to float32 values in [0, 1] (the intensity step).

    Order: a window when one applies (``opts.window`` a preset or 'C,W'; or 'auto' and
    ``dicom_window`` = (center, width[, VOILUTFunction]) given), else ``opts.intensity``:
    'auto' divides uint8 by 255 (bool -> 0/1) and min-max scales everything else (uint16, int,
    float: the whole image, all channels together), as the run's input contract allows
    (``opts.input_dtype``, see the module docstring; it raises :class:`OffContract` where the contract
    refuses); 'minmax'; 'pA-pB' clips at those percentiles. A constant image gives zeros, never NaN.
    An image with NaN or inf pixels raises :class:`NonFinitePixels` (callers name the sample): it is
    refused or skipped, never blanked.
    """
    arr = np.asarray(arr)
    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        raise NonFinitePixels(int((~np.isfinite(arr)).sum()), int(arr.size))
    seen = _seen.get()
    if seen is not None:
        seen.append(arr.dtype.name)
    window = parse_window(opts.window)
    if window == "auto":
        window = dicom_window
    if window is not None:
        return apply_window(arr, *window)
    mode = parse_intensity(opts.intensity)
    if mode == "auto":
        problem = contract_problem(arr, opts)
        if problem:
            raise OffContract(problem)
        if arr.dtype == np.uint8 and divides_uint8(opts):
            return arr.astype(np.float32) / np.float32(255.0)
        if arr.dtype == np.bool_ and contract(opts) != "per-image":
            return arr.astype(np.float32)
        if arr.dtype.kind == "f" and contract(opts) == "8-bit":   # checked to lie in [0, 1]: taken as it is
            return arr.astype(np.float32)
    x = arr.astype(np.float32 if arr.dtype.itemsize <= 2 else np.float64)
    if mode in ("auto", "minmax"):
        low, high = float(x.min()), float(x.max())
    else:
        low, high = (float(v) for v in np.percentile(x, mode))
    return _scale(x, low, high)


def _resize_plane(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    if plane.shape == (height, width):
        return plane
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))  # mode F
    return np.asarray(img.resize((width, height), Image.BILINEAR), dtype=np.float32)


def _one_volume(vol: np.ndarray, choice) -> np.ndarray:
    depth, height, width = vol.shape
    if choice == "middle":
        return vol[depth // 2][None]
    if choice == "mip":
        return vol.max(axis=0)[None]
    if choice == "orthogonal":
        axial = vol[depth // 2].astype(np.float32)
        coronal = _resize_plane(vol[::-1, height // 2, :], height, width)
        sagittal = _resize_plane(vol[::-1, :, width // 2], height, width)
        return np.stack([axial, coronal, sagittal])
    return vol[choice[1]][None]


def volume_to_2d(vol: np.ndarray, opts, *, path: str | Path | None = None) -> np.ndarray:
    """(D, H, W) -> (C, H, W), or a batch (N, D, H, W) -> (N, C, H, W), per ``opts.slice``.

    'middle': slice D // 2 (C=1); 'index N': slice N (C=1); 'mip': maximum intensity projection
    along D (C=1); 'orthogonal': the three mid-planes (axial ``vol[D//2]``, coronal
    ``vol[::-1, H//2, :]``, sagittal ``vol[::-1, :, W//2]``), the last two bilinearly resized to
    (H, W), as 3 channels; 'volume': the whole volume kept for a 3-D model, (1, D, H, W). Values are
    unchanged (apply :func:`to_unit_range` after).
    ``path``: name the file in errors (raises BadFileError instead of MedxferError).
    """
    choice = parse_slice(opts.slice)
    vol = np.asarray(vol)
    if vol.ndim not in (3, 4) or min(vol.shape) < 1:
        message = f"expected a (D,H,W) or (N,D,H,W) volume, got shape {tuple(vol.shape)}"
        if path is not None:
            raise BadFileError(path, message)
        raise MedxferError(message)
    depth = vol.shape[-3]
    if isinstance(choice, tuple) and choice[1] >= depth:
        message = f"slice index {choice[1]} requested but the volume has {depth} slices"
        if path is not None:
            raise BadFileError(path, message)
        raise MedxferError(f"The 'slice' option must be below {depth}: {message}.")
    if choice == "volume":
        return vol[None] if vol.ndim == 3 else vol[:, None]
    if vol.ndim == 3:
        return _one_volume(vol, choice)
    if choice == "orthogonal":
        return np.stack([_one_volume(v, choice) for v in vol])
    if choice == "middle":
        return vol[:, depth // 2][:, None]
    if choice == "mip":
        return vol.max(axis=1)[:, None]
    return vol[:, choice[1]][:, None]
