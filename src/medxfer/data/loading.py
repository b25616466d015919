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

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from medxfer import progress
from medxfer.data.intensity import (EIGHT_BIT, BadPixels, divides_uint8, dtype_problem, parse_slice, pixel_types,
                                    to_unit_range, volume_to_2d, widest)
from medxfer.data.manifest import Manifest
from medxfer.data.readers import ReadOptions, read_image
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


def load_images(manifest: Manifest, size: int, read=None, cache=None, on_bad_file: str = "error") -> Loaded:
    """Decode, bring to a common channel count, resize to ``size`` and quantise to uint8, once."""
    if on_bad_file not in ("error", "skip"):
        raise MedxferError(f"The 'on-bad-file' parameter must be 'error' or 'skip'. Got '{on_bad_file}' instead.")
    if manifest.arrays is not None:
        rows = manifest.table["row"].to_numpy()
        ids = manifest.table["sample_id"].astype(str).tolist()
        return decode_arrays(manifest.arrays, size, read, ids=ids, rows=rows, on_bad_file=on_bad_file,
                             where=manifest.origin)
    return _from_files(manifest, size, read, cache, on_bad_file)


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
    out = []
    bar = progress.task("decoding images", total=len(rows), unit="images") if len(rows) > 512 else progress.Task()
    for start in range(0, len(rows), 256):
        chunk = rows[start:start + 256]
        if fast:  # uint8 images: /255 does not depend on the image, so whole chunks at once
            x = arr[chunk]
            x = np.moveaxis(x, -1, 1) if x.ndim == 4 else x[:, None]
            out.append(resize_to_uint8(x.astype(np.float32) / np.float32(255.0), size))
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
            out.append(resize_to_uint8(_stack(imgs), size))
        bar.advance(len(chunk))
    bar.close()
    if not keep.any():
        raise MedxferError(f"no readable image in {where} ({len(skipped)} skipped).")
    return Loaded(torch.cat(out), keep, skipped, dtypes=dict(Counter(seen)))


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


def _from_files(manifest, size, read, cache, on_bad_file) -> Loaded:
    read = read or ReadOptions()
    decoded, keep, skipped, hits = {}, np.zeros(len(manifest.table), bool), [], 0
    types: dict[int, str] = {}
    ids = manifest.table["sample_id"].astype(str).tolist()
    paths = manifest.table["path"].tolist()
    bar = progress.task("decoding images", total=len(ids), unit="images")
    for i, path in enumerate(paths):
        bar.advance()
        try:
            decoded[i], types[i], hit = _read_file(path, read, size, cache)
        except BadFileError as e:
            if on_bad_file == "error":
                raise e.for_sample(ids[i]) from None
            skipped.append(Skipped(ids[i], e.reason, e.path))
            continue
        hits += hit
        keep[i] = True
    bar.close()
    if not decoded:
        raise MedxferError(f"no readable image in {manifest.origin} ({len(skipped)} skipped).")
    counts = Counter(t for t in types.values() if t)  # '': scaled by a lookup table (DICOM VOI LUT, palette colour)
    notes = []
    if set(counts) & EIGHT_BIT and set(counts) - EIGHT_BIT:  # one rule per run: 8-bit files scaled per image too
        wide = widest(counts)
        notes.append(f"warning: the images mix pixel types: {_listed(counts)}; every image is scaled per image "
                     f"(min-max), as {wide} images are, 8-bit ones included, in training and predict (model.json "
                     f"records input_dtype '{wide}'). Convert them to one type to keep 8-bit images at value / 255")
        log.warning(notes[-1].removeprefix("warning: "))
        per_image = dataclasses.replace(read, input_dtype=wide)
        for i in [i for i, t in types.items() if t in EIGHT_BIT]:
            decoded[i], _, _ = _read_file(paths[i], per_image, size, cache)
    rgb = sum(d.shape[0] == 3 for d in decoded.values())
    chans = 3 if rgb else 1
    if 0 < rgb < len(decoded):
        notes.append(f"warning: {rgb} of {len(decoded)} images are RGB, so the run is 3-channel (grey images "
                     "repeated in R, G and B); no option chooses otherwise: convert those files to greyscale for a "
                     "1-channel run")
        log.warning(notes[-1].removeprefix("warning: "))
    images = torch.from_numpy(np.stack([_chans_uint8(decoded[i], chans) for i in sorted(decoded)]))
    return Loaded(images, keep, skipped, hits, dtypes=dict(counts), notes=notes)


def _listed(counts: Counter) -> str:
    return ", ".join(f"{t} ({n})" for t, n in counts.most_common())


def _read_file(path, read, size: int, cache) -> tuple[np.ndarray, str, bool]:
    """One file -> (uint8 (C, S, S), the type of its pixels, whether the cache had it)."""
    key = cache.key(path, {"size": size, **read.key()}) if cache is not None else None
    img, dtype = _cached(cache, key)
    if img is not None:
        return img, dtype, True
    with pixel_types() as seen:
        arr = read_image(path, read, size=size)
    img, dtype = resize_to_uint8(arr[None], size)[0].numpy(), "".join(seen[:1])
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
    return np.ascontiguousarray(record["pixels"]), str(record["dtype"])


def _chans_uint8(img: np.ndarray, chans: int) -> np.ndarray:
    if img.shape[0] == chans:
        return img
    return (match_channels(img.astype(np.float32), chans)).round().astype(np.uint8)
