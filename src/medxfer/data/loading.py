"""Decode every sample of a Manifest once into a uint8 tensor (N, C, S, S), through the decode cache.

Usage::

    batch = load_images(manifest, size=64, read=ReadOptions(), cache=DecodeCache(dir), on_bad_file="error")
    batch.images, batch.keep (bool per manifest row), batch.skipped (list of Skipped)

Intensity is scaled **per image** by the reader options (``--intensity``, ``--window``), for files
and for npz arrays alike: uint8 is divided by 255; other dtypes are min-max scaled (or clipped at
percentiles, or windowed) image by image, so an image gets the same pixels wherever it sits in a
batch and whichever command reads it (train, predict, export, serve). An image with NaN or inf
pixels is refused by name, or skipped and listed with ``on_bad_file="skip"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from medxfer import progress
from medxfer.data.intensity import NonFinitePixels, to_unit_range, volume_to_2d
from medxfer.data.manifest import Manifest
from medxfer.data.readers import ReadOptions, read_image
from medxfer.data.transforms import match_channels, resize_to_uint8
from medxfer.errors import BadFileError, MedxferError


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

    ``rows`` selects rows of ``arr``; ``ids`` names them in errors and in the skipped list."""
    opts = read or ReadOptions()
    rows = np.arange(len(arr)) if rows is None else np.asarray(rows)
    ids = [f"{i:06d}" for i in rows] if ids is None else ids
    if arr.dtype.kind not in "biuf":
        raise MedxferError(f"{where}: images of dtype {arr.dtype} are not pixel values; save them as numbers.")
    fast = arr.dtype == np.uint8 and opts.window in ("auto", "none") and opts.intensity == "auto" and \
        not (arr.ndim == 4 and arr.shape[-1] != 3)
    keep = np.ones(len(rows), bool)
    skipped: list[Skipped] = []
    out = []
    bar = progress.task("decoding images", total=len(rows), unit="images") if len(rows) > 512 else progress.Task()
    for start in range(0, len(rows), 256):
        chunk = rows[start:start + 256]
        if fast:  # uint8 images: /255 does not depend on the image, so whole chunks at once
            x = arr[chunk]
            x = np.moveaxis(x, -1, 1) if x.ndim == 4 else x[:, None]
            out.append(resize_to_uint8(x.astype(np.float32) / np.float32(255.0), size))
            bar.advance(len(chunk))
            continue
        imgs = []
        for j, r in enumerate(chunk):
            try:
                imgs.append(one_array_image(arr[r], opts))
            except NonFinitePixels as e:
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
    return Loaded(torch.cat(out), keep, skipped)


def arrays_to_uint8(arr: np.ndarray, size: int, read=None) -> torch.Tensor:
    """npz-style image arrays -> uint8 (N, C, size, size), scaled per image (see the module docstring)."""
    return decode_arrays(arr, size, read).images


def _stack(imgs: list[np.ndarray]) -> np.ndarray:
    chans = 3 if any(i.shape[0] == 3 for i in imgs) else 1
    return np.stack([match_channels(i, chans) for i in imgs])


def _from_files(manifest, size, read, cache, on_bad_file) -> Loaded:
    read = read or ReadOptions()
    params = {"size": size, **read.key()}
    decoded, keep, skipped, hits = [], np.zeros(len(manifest.table), bool), [], 0
    ids = manifest.table["sample_id"].astype(str).tolist()
    bar = progress.task("decoding images", total=len(ids), unit="images")
    for i, path in enumerate(manifest.table["path"]):
        bar.advance()
        try:
            key = cache.key(path, params) if cache is not None else None
            img = cache.get(key) if cache is not None else None
            if img is None:
                arr = read_image(path, read, size=size)
                img = resize_to_uint8(arr[None], size)[0].numpy()
                if cache is not None:
                    cache.put(key, img)
            else:
                hits += 1
        except BadFileError as e:
            if on_bad_file == "error":
                raise e.for_sample(ids[i]) from None
            skipped.append(Skipped(ids[i], e.reason, e.path))
            continue
        decoded.append(img)
        keep[i] = True
    bar.close()
    if not decoded:
        raise MedxferError(f"no readable image in {manifest.origin} ({len(skipped)} skipped).")
    chans = 3 if any(d.shape[0] == 3 for d in decoded) else 1
    images = torch.from_numpy(np.stack([_chans_uint8(d, chans) for d in decoded]))
    return Loaded(images, keep, skipped, hits)


def _chans_uint8(img: np.ndarray, chans: int) -> np.ndarray:
    if img.shape[0] == chans:
        return img
    return (match_channels(img.astype(np.float32), chans)).round().astype(np.uint8)
