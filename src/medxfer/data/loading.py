"""Decode every sample of a Manifest once into a uint8 tensor (N, C, S, S), through the decode cache.

Usage::

    batch = load_images(manifest, size=64, read=ReadOptions(), cache=DecodeCache(dir), on_bad_file="error")
    batch.images, batch.keep (bool per manifest row), batch.skipped (list of (file, reason))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from medxfer.data.manifest import Manifest
from medxfer.data.transforms import match_channels, resize_to_uint8
from medxfer.errors import BadFileError, MedxferError


@dataclass
class Loaded:
    images: torch.Tensor                 # uint8 (N_kept, C, S, S)
    keep: np.ndarray                     # bool per manifest row
    skipped: list[tuple[str, str]] = field(default_factory=list)
    cache_hits: int = 0


def load_images(manifest: Manifest, size: int, read=None, cache=None, on_bad_file: str = "error",
                progress=None) -> Loaded:
    """Decode, bring to a common channel count, resize to ``size`` and quantise to uint8, once."""
    if on_bad_file not in ("error", "skip"):
        raise MedxferError(f"The 'on-bad-file' parameter must be 'error' or 'skip'. Got '{on_bad_file}' instead.")
    if manifest.arrays is not None:
        return Loaded(_from_arrays(manifest, size, read), np.ones(len(manifest.table), bool))
    return _from_files(manifest, size, read, cache, on_bad_file, progress)


def _from_arrays(manifest: Manifest, size: int, read) -> torch.Tensor:
    return arrays_to_uint8(manifest.arrays[manifest.table["row"].to_numpy()], size, read)


def arrays_to_uint8(arr: np.ndarray, size: int, read=None) -> torch.Tensor:
    """npz-style image arrays (N,H,W), (N,H,W,3) or volumes (N,D,H,W) -> uint8 (N, C, size, size)."""
    if arr.ndim == 4 and arr.shape[-1] == 3:
        arr = arr.transpose(0, 3, 1, 2)                              # (N, H, W, 3) -> (N, 3, H, W)
    elif arr.ndim == 4:                                              # (N, D, H, W) volumes -> 2D
        from medxfer.data.readers import ReadOptions, volume_to_2d

        opts = read or ReadOptions()
        arr = np.stack([volume_to_2d(_unit(v), opts) for v in arr])
        return torch.cat([resize_to_uint8(arr[i:i + 512], size) for i in range(0, len(arr), 512)])
    else:
        arr = arr[:, None]
    out = [resize_to_uint8(_unit(arr[i:i + 512]), size) for i in range(0, len(arr), 512)]
    return torch.cat(out)


def _unit(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _from_files(manifest, size, read, cache, on_bad_file, progress) -> Loaded:
    from medxfer.data.readers import ReadOptions, read_image

    read = read or ReadOptions()
    params = {"size": size, **read.key()}
    decoded, keep, skipped, hits = [], np.zeros(len(manifest.table), bool), [], 0
    for i, path in enumerate(manifest.table["path"]):
        try:
            key = cache.key(path, params) if cache is not None else None
            img = cache.get(key) if cache is not None else None
            if img is None:
                arr = read_image(path, read)
                img = resize_to_uint8(arr[None], size)[0].numpy()
                if cache is not None:
                    cache.put(key, img)
            else:
                hits += 1
        except BadFileError as e:
            if on_bad_file == "error":
                raise
            skipped.append((e.path, e.reason))
            continue
        decoded.append(img)
        keep[i] = True
        if progress is not None:
            progress(i + 1, len(manifest.table))
    if not decoded:
        raise MedxferError(f"no readable image in {manifest.origin} ({len(skipped)} skipped).")
    chans = 3 if any(d.shape[0] == 3 for d in decoded) else 1
    images = torch.from_numpy(np.stack([_chans_uint8(d, chans) for d in decoded]))
    return Loaded(images, keep, skipped, hits)


def _chans_uint8(img: np.ndarray, chans: int) -> np.ndarray:
    if img.shape[0] == chans:
        return img
    return (match_channels(img.astype(np.float32), chans)).round().astype(np.uint8)
