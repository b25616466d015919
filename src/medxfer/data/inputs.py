"""Inputs to a trained model, through exactly the preprocessing the run was trained with.

Usage::

    for ids, x in iter_inputs(["scan1.png", "folder/", "more.npz"], size=64, chans=1, read=read):
        ...                                           # x: uint8 (n, chans, 64, 64)
    x = images_from_arrays(arr, size=64, chans=1, read=read)   # (H,W), (N,H,W), (N,C,H,W), (N,H,W,C), PIL

Files are named by a pseudonymous id of their path as given (file names can hold patient names),
npz rows by ``<split>/<index>`` as in a run's predictions.csv. Arrays follow the npz rule: uint8 is
divided by 255, other types are scaled per image by the run's intensity options, within the run's
input contract (``read.input_dtype``, :mod:`medxfer.data.intensity`): a model trained on 8-bit images
takes uint8 and floats in [0, 1] and refuses other types and ranges in one line. An npz is checked
from its headers (shapes, pixel limits, its size against the memory) before any array is read, and
read one array at a time.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from medxfer.data.dicom import series_files
from medxfer.data.intensity import OffContract, contract_problem, parse_slice
from medxfer.data.loading import Skipped, decode_arrays
from medxfer.data.npzfile import NpzArchive
from medxfer.data.readers import PILReader, read_image
from medxfer.data.folders import walk
from medxfer.data.sources import IMAGE_SUFFIXES, is_image_file, suffix_of
from medxfer.data.transforms import match_channels, match_channels_uint8, resize_to_uint8
from medxfer.errors import BadFileError, MedxferError
from medxfer.privacy import sample_id

log = logging.getLogger(__name__)


def iter_inputs(inputs, size: int, chans: int, read, batch_size: int = 64, on_bad_file: str = "error",
                skipped: list | None = None, paths: list | None = None):
    """Image files, folders (recursive) and npz archives, in chunks: yields ``(sample_ids, uint8 images)``.

    Unreadable files raise, or with ``on_bad_file="skip"`` go to ``skipped`` as :class:`Skipped`;
    ``paths`` collects ``(sample_id, path)`` when given (for ``--keep-paths``)."""
    if batch_size < 1:
        raise MedxferError(f"The 'batch-size' parameter must be at least 1. Got {batch_size} instead.")
    if on_bad_file not in ("error", "skip"):
        raise MedxferError(f"The 'on-bad-file' parameter must be 'error' or 'skip'. Got '{on_bad_file}' instead.")
    files = []
    for item in map(Path, inputs):
        if not item.exists():
            raise MedxferError(f"input '{item}' does not exist.")
        if item.is_file() and item.suffix.lower() == ".npz":
            for key, arr in npz_images(item):
                prefix = key[: -len("_images")].rstrip("_") or "images"
                for i in range(0, len(arr), batch_size):
                    ids = [f"{prefix}/{j:06d}" for j in range(i, min(i + batch_size, len(arr)))]
                    got = decode_arrays(arr, size, read, ids=ids, rows=np.arange(i, i + len(ids)),
                                        on_bad_file=on_bad_file, where=f"npz '{item.name}'")
                    if skipped is not None:
                        skipped += got.skipped
                    yield [s for s, kept in zip(ids, got.keep) if kept], match_channels_uint8(got.images, chans)
        elif item.is_dir() and parse_slice(read.slice) == "volume":  # 3-D: NIfTI files, and series folders
            files += sorted(f for f in item.rglob("*") if f.is_file() and suffix_of(f) in (".nii", ".nii.gz"))
            files += [d for d in sorted([item, *(d for d in item.rglob("*") if d.is_dir())]) if series_files(d)]
        elif item.is_dir():
            files += _folder_images(item)
        else:
            files.append(item)
    for i in range(0, len(files), batch_size):
        chunk, ids = [], []
        for n, f in enumerate(files[i:i + batch_size], start=i + 1):
            sid = sample_id(str(f))
            if paths is not None:
                paths.append((sid, str(f)))
            try:
                arr = match_channels(read_image(f, read, size=size), chans)
            except BadFileError as e:
                if on_bad_file == "error" or skipped is None:
                    raise e.for_sample(sid, where=f"input file #{n}; --keep-paths maps ids to files") from None
                skipped.append(Skipped(sid, e.reason, str(f)))
                continue
            chunk.append(resize_to_uint8(arr[None], size)[0])
            ids.append(sid)
        if chunk:
            yield ids, torch.stack(chunk)


def _folder_images(folder: Path) -> list[Path]:
    """The images under ``folder``, walked as training walks class folders: hidden and system folders and
    medxfer's own output are left out (and logged); a broken link named like an image stays, so that the
    bad-file rule decides on it."""
    found = walk(folder)
    broken = [f for f in found.broken if suffix_of(f) in IMAGE_SUFFIXES]
    if found.left_out or found.broken:
        log.info("input folder: left out %s%s", ", ".join(f"{n} {why} folder(s)" for why, n in
                                                           sorted(found.left_out.items())) or "no folder",
                 f"; {len(found.broken)} broken link(s), {len(broken)} of them named as images and read as bad files"
                 if found.broken else "")
    return sorted([f for f in found.files if is_image_file(f)] + broken)


def npz_images(path: Path):
    """(key, array) for every ``*images`` array of an npz, one loaded at a time, after every one was checked
    from its header: numbers (object arrays are refused), (N,H,W), (N,H,W,3) or (N,D,H,W) with no side of
    0, the pixel limits, and each array's size against the memory."""
    with NpzArchive(path) as npz:
        keys = [k for k in npz.keys() if k.endswith("images")]
        if not keys:
            raise MedxferError(f"npz '{path}' has no '*_images' array (keys: {npz.keys()}).")
        npz.check_images(keys, hint=": nothing to predict on in it")
        for k in keys:
            npz.check_memory([k])
        for k in keys:
            yield k, npz.load(k)


def images_from_arrays(x, size: int, chans: int, read) -> torch.Tensor:
    """Images in memory -> uint8 (N, chans, size, size), as ``medxfer predict`` prepares an npz.

    ``x``: a PIL image or a list of them; a numpy array or torch tensor of shape (H, W), (N, H, W),
    (N, C, H, W) or (N, H, W, C) with C in {1, 3}, uint8 or any numeric type."""
    from PIL import Image

    if isinstance(x, Image.Image):
        x = [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(i, Image.Image) for i in x):
        try:
            imgs = [match_channels(PILReader.from_image(i, read), chans) for i in x]
        except OffContract as e:
            raise MedxferError(f"the PIL images given (mode {x[0].mode}): {e}.") from None
        return torch.cat([resize_to_uint8(i[None], size) for i in imgs])
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise MedxferError(f"images must be numbers (uint8 or float). Got an array of dtype {arr.dtype}.")
    problem = contract_problem(arr, read)   # the whole array at once: one line, not one per image
    if problem:
        raise MedxferError(f"the arrays given: {problem}.")
    if parse_slice(read.slice) == "volume":  # a 3-D model: volumes (D, H, W) or (N, D, H, W)
        arr = arr[None] if arr.ndim == 3 else arr
        if arr.ndim != 4 or min(arr.shape) < 1:
            raise MedxferError(f"volumes of shape {arr.shape}: this 3-D model takes (D, H, W) or (N, D, H, W).")
        return match_channels_uint8(decode_arrays(arr, size, read, where="the volumes given").images, chans)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 4 and arr.shape[1] in (1, 3):
        arr = arr[:, 0] if arr.shape[1] == 1 else np.moveaxis(arr, 1, -1)
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3):
        arr = arr[..., 0] if arr.shape[-1] == 1 else arr
    elif arr.ndim != 3:
        raise MedxferError(f"images of shape {arr.shape}: give (H, W), (N, H, W), (N, C, H, W) or (N, H, W, C) with C "
                           "1 or 3.")
    if min(arr.shape[1:3]) < 1:
        raise MedxferError(f"images of shape {arr.shape} are empty.")
    return match_channels_uint8(decode_arrays(arr, size, read, where="the arrays given").images, chans)
