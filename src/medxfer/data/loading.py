"""Decode every sample of a Manifest once into a uint8 tensor (N, C, S, S), through the decode cache.

Usage::

    batch = load_images(manifest, size=64, read=ReadOptions(), cache=DecodeCache(dir), on_bad_file="error")
    batch.images, batch.keep (bool per manifest row), batch.skipped (list of Skipped)

Intensity is scaled **per image** by the reader options (``--intensity``, ``--window``), for files
and for npz arrays alike: uint8 is divided by 255; other dtypes are min-max scaled (or clipped at
percentiles, or windowed) image by image, so an image gets the same pixels wherever it sits in a
batch and whichever command reads it (train, predict, export, serve); a trained run's input contract
(``ReadOptions.input_dtype``) decides the rule at predict time (:mod:`medxfer.data.intensity`). An
image with NaN or inf pixels, or pixels the contract refuses, is refused by name, or skipped and
listed with ``on_bad_file="skip"``.

``Loaded.dtypes`` counts the pixel types the intensity step was given (a run records the widest as its
``input_dtype``; cached images keep theirs in the cache entry). Files of 8-bit and wider types mixed are
all scaled per image, 8-bit ones too, so that one rule holds in training and predict. ``Loaded.notes``
says what a reader of the run should know (mixed types; RGB files that made a run 3-channel), each
also logged as a warning.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from medxfer import progress
from medxfer.data.decoding import BadRow, decode_files
from medxfer.data.intensity import (BadPixels, divides_uint8, dtype_problem, parse_slice, pixel_types, to_unit_range,
                                    volume_to_2d, widest)
from medxfer.data.manifest import Manifest
from medxfer.data.memory import guess_channels
from medxfer.data.readers import ReadOptions
from medxfer.data.transforms import match_channels, resize_to_uint8
from medxfer.errors import BadFileError, MedxferError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skipped:
    """A sample that could not be read: its id, why, and (kept out of outputs) its file."""

    sample_id: str
    reason: str
    path: str


@dataclass
class Loaded:
    images: torch.Tensor                 # uint8 (N_kept, C, S, S)
    keep: np.ndarray                     # bool per manifest row
    skipped: list[Skipped] = field(default_factory=list)
    cache_hits: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)   # pixel type -> images (what the intensity step saw)
    notes: list[str] = field(default_factory=list)

    @property
    def input_dtype(self) -> str | None:
        """The widest pixel type seen (what a run records in model.json); None when none was seen."""
        return widest(self.dtypes) or None


def load_images(manifest: Manifest, size: int, read=None, cache=None, on_bad_file: str = "error",
                workers: int | None = None) -> Loaded:
    """Decode, bring to a common channel count, resize to ``size`` and quantise to uint8, once. Files go to
    the decoded store on disk (in ``cache``'s folder; a temporary one without it), decoded by ``workers``
    processes (default: the usable cores), and ``images`` maps it (:mod:`medxfer.data.decoding`)."""
    if on_bad_file not in ("error", "skip"):
        raise MedxferError(f"The 'on-bad-file' parameter must be 'error' or 'skip'. Got '{on_bad_file}' instead.")
    if manifest.arrays is not None:
        rows = manifest.table["row"].to_numpy()
        ids = manifest.table["sample_id"].astype(str).tolist()
        return decode_arrays(manifest.arrays, size, read, ids=ids, rows=rows, on_bad_file=on_bad_file,
                             where=manifest.origin)
    return _from_files(manifest, size, read, cache, on_bad_file, workers)


def one_array_image(img: np.ndarray, read=None) -> np.ndarray:
    """One npz image (H,W), (H,W,3) or volume (D,H,W) -> float32 (C, H, W) in [0, 1], per image."""
    opts = read or ReadOptions()
    if img.ndim == 3 and img.shape[-1] == 3:
        chw = np.moveaxis(img, -1, 0)
    elif img.ndim == 3:
        chw = volume_to_2d(img, opts)
    else:
        chw = img[None]
    return to_unit_range(chw, opts)


def decode_arrays(arr: np.ndarray, size: int, read=None, *, ids=None, rows=None, on_bad_file: str = "error",
                  where: str = "the npz") -> Loaded:
    """npz-style arrays (N,H,W), (N,H,W,3) or volumes (N,D,H,W) -> uint8 (N, C, size, size), per image.

    ``rows`` selects rows of ``arr``; ``ids`` names them in errors and in the skipped list. The shape
    (volumes for a 3-D model, no side of 0) and the type (the run's contract) are checked first."""
    opts = read or ReadOptions()
    rows = np.arange(len(arr)) if rows is None else np.asarray(rows)
    ids = [f"{i:06d}" for i in rows] if ids is None else ids
    if arr.dtype.kind not in "biuf":
        raise MedxferError(f"{where}: images of dtype {arr.dtype} are not pixel values; save them as numbers.")
    check_array_shape(arr, opts, where)
    problem = dtype_problem(arr.dtype, opts)
    if problem:
        raise MedxferError(f"{where}: {problem}.")
    fast = arr.dtype == np.uint8 and opts.window in ("auto", "none") and divides_uint8(opts) and \
        not (arr.ndim == 4 and arr.shape[-1] != 3)
    keep = np.ones(len(rows), bool)
    skipped: list[Skipped] = []
    seen: list[str] = []
    out, filled = None, 0      # one tensor filled chunk by chunk: no list of chunks and their concatenation at once

    def put(x: torch.Tensor) -> None:
        nonlocal out, filled
        if out is None:
            out = torch.empty((len(rows), *x.shape[1:]), dtype=torch.uint8)
        out[filled:filled + len(x)] = x
        filled += len(x)

    bar = progress.task("decoding images", total=len(rows), unit="images") if len(rows) > 512 else progress.Task()
    for start in range(0, len(rows), 256):
        chunk = rows[start:start + 256]
        if fast:  # uint8 images: /255 does not depend on the image, so whole chunks at once
            x = arr[chunk]
            x = np.moveaxis(x, -1, 1) if x.ndim == 4 else x[:, None]
            put(resize_to_uint8(x.astype(np.float32) / np.float32(255.0), size))
            seen += [arr.dtype.name] * len(chunk)
            bar.advance(len(chunk))
            continue
        imgs = []
        for j, r in enumerate(chunk):
            try:
                with pixel_types() as types:
                    imgs.append(one_array_image(arr[r], opts))
                seen += types[:1]
            except BadPixels as e:
                if on_bad_file == "error":
                    raise BadFileError(where, str(e), sample=ids[start + j], where=where) from None
                keep[start + j] = False
                skipped.append(Skipped(ids[start + j], str(e), where))
        if imgs:
            put(resize_to_uint8(_stack(imgs), size))
        bar.advance(len(chunk))
    bar.close()
    if not keep.any():
        raise MedxferError(f"no readable image in {where} ({len(skipped)} skipped).")
    return Loaded(out[:filled], keep, skipped, dtypes=dict(Counter(seen)))


def check_array_shape(arr: np.ndarray, opts, where: str) -> None:
    """Refuse arrays that are not (N,H,W), (N,H,W,3) or (N,D,H,W) images with every side at least 1, and
    2-D images where ``opts`` read volumes for a 3-D model (``--spatial-dims 3``)."""
    if arr.ndim not in (3, 4) or min(arr.shape) < 1:
        raise MedxferError(f"{where}: images of shape {arr.shape}; expected (N,H,W), (N,H,W,3) or volumes (N,D,H,W) "
                           "with every side at least 1 pixel.")
    if parse_slice(opts.slice) == "volume" and arr.ndim != 4:
        raise MedxferError(f"{where}: images of shape {arr.shape} are 2-D, but a 3-D model (--spatial-dims 3) takes "
                           "volumes (N,D,H,W). Give volumes, or use a 2-D model (--spatial-dims 2).")


def arrays_to_uint8(arr: np.ndarray, size: int, read=None) -> torch.Tensor:
    """npz-style image arrays -> uint8 (N, C, size, size), scaled per image (see the module docstring)."""
    return decode_arrays(arr, size, read).images


def _stack(imgs: list[np.ndarray]) -> np.ndarray:
    chans = 3 if any(i.shape[0] == 3 for i in imgs) else 1
    return np.stack([match_channels(i, chans) for i in imgs])


def _from_files(manifest, size, read, cache, on_bad_file, workers=None) -> Loaded:
    """Files -> the decoded store (:mod:`medxfer.data.decoding`), mapped: the images are a view of the file on
    disk, not a copy in memory."""
    read = read or ReadOptions()
    ids = manifest.table["sample_id"].astype(str).tolist()
    paths = manifest.table["path"].tolist()
    try:
        array, index = decode_files(paths, size, read, cache, on_bad_file, workers, channels=guess_channels(manifest))
    except BadRow as e:
        raise e.error.for_sample(ids[e.row]) from None
    keep, skipped = np.ones(len(paths), bool), []
    for row, reason in index["skipped"]:
        if on_bad_file == "error":
            raise BadFileError(str(paths[row]), reason).for_sample(ids[row])
        keep[row] = False
        skipped.append(Skipped(ids[row], reason, str(paths[row])))
    if not keep.any():
        raise MedxferError(f"no readable image in {manifest.origin} ({len(skipped)} skipped).")
    for note in index["notes"]:
        log.warning(note.removeprefix("warning: "))
    return Loaded(torch.from_numpy(array), keep, skipped, index["hits"], dtypes=dict(index["types"]),
                  notes=list(index["notes"]))
