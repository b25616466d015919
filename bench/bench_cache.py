"""Benchmark: one epoch of decoding DICOM files, without vs with a warm DecodeCache.

Usage::

    PYTHONPATH=src .venv/bin/python bench/bench_cache.py [--files 500] [--size 64] [--runs 3]

Writes ``--files`` CT-like DICOM files (256x256 int16 stored, RescaleIntercept -1024, a soft-tissue
window) to a temporary folder. "An epoch" = for every file: ``read_image`` + resize to
``--size`` (``torch.nn.functional.interpolate(..., mode='bilinear', antialias=True)`` on the [0, 1]
float array) + round to uint8, as the pipeline does. With the cache, an epoch computes the key
(content digest memoised by size and mtime) and ``get`` hits. Runs alternate (no cache, cache, ...);
the medians of ``--runs`` each are printed with their ratio, then a markdown table row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_files(folder: Path, n: int) -> list[Path]:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[-128:128, -128:128]
    body = (xx**2 / 110**2 + yy**2 / 90**2) < 1
    paths = []
    for i in range(n):
        hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, (256, 256))
        hu[(xx - 30 + i % 20) ** 2 + (yy - 10) ** 2 < 15**2] = 300.0  # a "lesion" that moves
        stored = np.clip(hu + 1024, 0, 4095).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = "CT", f"bench-{i % 50}"
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.set_pixel_data(stored, photometric_interpretation="MONOCHROME2", bits_stored=12)
        path = folder / f"ct_{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def resize_to_uint8(arr: np.ndarray, size: int) -> np.ndarray:
    x = torch.from_numpy(arr)[None]
    y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                        antialias=True, align_corners=False)
    return (y[0] * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()


def epoch(paths, size, opts, cache=None) -> tuple[float, int]:
    from medxfer.data.readers import read_image

    params = {"size": size, **opts.key()}
    hits = 0
    start = time.perf_counter()
    for path in paths:
        img = None
        if cache is not None:
            key = cache.key(path, params)
            img = cache.get(key)
        if img is None:
            img = resize_to_uint8(read_image(path, opts), size)
            if cache is not None:
                cache.put(key, img)
        else:
            hits += 1
    return time.perf_counter() - start, hits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)

    from medxfer.data import cache as cache_module
    from medxfer.data.cache import DecodeCache
    from medxfer.data.readers import ReadOptions

    torch.set_num_threads(1)
    opts = ReadOptions()
    with tempfile.TemporaryDirectory(prefix="medxfer-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "dicom").mkdir()
        t0 = time.perf_counter()
        paths = write_files(tmp / "dicom", args.files)
        print(f"wrote {len(paths)} DICOM files in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        cache = DecodeCache(tmp / "cache")
        fill, _ = epoch(paths, args.size, opts, cache)  # cold: decode + hash + put
        print(f"cold epoch (fills the cache): {fill:.3f} s", file=sys.stderr)
        plain, cached, rehash = [], [], []
        for _ in range(args.runs):
            plain.append(epoch(paths, args.size, opts)[0])
            seconds, hits = epoch(paths, args.size, opts, cache)
            if hits != len(paths):
                raise SystemExit(f"warm cache missed {len(paths) - hits} files")
            cached.append(seconds)
            cache_module._digests.clear()  # as in a new process: every file is hashed again
            rehash.append(epoch(paths, args.size, opts, cache)[0])
        a, b, c = (statistics.median(v) for v in (plain, cached, rehash))
        print(f"no cache: median {a:.3f} s/epoch ({len(paths) / a:.0f} files/s); "
              f"warm cache: median {b:.3f} s/epoch ({len(paths) / b:.0f} files/s); ratio {a / b:.1f}x; "
              f"warm cache in a new process (files re-hashed): {c:.3f} s/epoch, ratio {a / c:.1f}x")
        print("| benchmark | files | size | no cache (s/epoch) | warm cache (s/epoch) | speed-up |")
        print("|---|---|---|---|---|---|")
        print(f"| decode cache, 256x256 CT DICOM | {len(paths)} | {args.size} | {a:.3f} | {b:.3f} "
              f"| {a / b:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
