"""``medxfer explain RUN IMAGES... --out DIR``: Grad-CAM overlays for images, through the run's preprocessing.

Usage::

    paths, layer, size = explain_paths("runs/breast", ["scan1.png", "folder/"], "cams/", layer="blocks.4")
    explain_paths(run, inputs, "cams/", keep_paths=True)     # also cams/paths.csv: sample_id,path (keep it private)

The folder and each overlay go through the output guard (:mod:`medxfer.runs`): never into a run directory or
over an input; an existing PNG is replaced only when it is an overlay medxfer wrote (a ``medxfer`` text chunk
right after its header), or with ``overwrite``.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medxfer import files
from medxfer.errors import MedxferError
from medxfer.evaluation.gradcam import class_index, explain_images, feature_map_size, save_overlays
from medxfer.predict import Predictor
from medxfer.runs import check_out, check_out_dir

MARK = b"medxfer\0Grad-CAM overlay"
PATHS = "paths.csv"
PATHS_HEADER = "sample_id,path"
_IHDR_END = 33  # the PNG signature (8 bytes) and the IHDR chunk (4 + 4 + 13 + 4), always first


def _load_inputs(predictor: Predictor, inputs, paths: list | None = None) -> tuple[list[str], torch.Tensor]:
    """Image files, folders (recursive) and npz archives -> (sample ids, uint8 (N, C, S, S)); ``paths`` collects
    ``(sample_id, path)`` of the files when given."""
    ids, chunks = [], []
    for chunk_ids, x in predictor.iter_inputs(inputs, paths=paths):
        ids += chunk_ids
        chunks.append(x)
    if not chunks:
        raise MedxferError("no image to explain among the inputs.")
    return ids, torch.cat(chunks)


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in n) or "image"
        k = seen.get(safe, 0)
        seen[safe] = k + 1
        out.append(safe if k == 0 else f"{safe}_{k}")
    return out


def mark_png(data: bytes) -> bytes:
    """The PNG with medxfer's mark: a tEXt chunk right after IHDR."""
    chunk = struct.pack(">I", len(MARK)) + b"tEXt" + MARK + struct.pack(">I", zlib.crc32(b"tEXt" + MARK))
    return data[:_IHDR_END] + chunk + data[_IHDR_END:]


def is_overlay(path: Path) -> bool:
    """Whether ``path`` is an overlay PNG medxfer wrote (its mark, see :func:`mark_png`)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_IHDR_END + 8 + len(MARK))
    except OSError:
        return False
    return head[_IHDR_END + 4:] == b"tEXt" + MARK


def _publish(pngs: list[Path], targets: list[Path]) -> list[Path]:
    for src, dst in zip(pngs, targets):
        files.write_bytes(dst, mark_png(src.read_bytes()))
    return targets


def explain_paths(run_dir: str | Path, inputs: list[str | Path], out_dir: str | Path, layer: str | None = None,
                  target_class=None, overwrite: bool = False, keep_paths: bool = False
                  ) -> tuple[list[Path], str, tuple[int, ...]]:
    """Grad-CAM overlays for image files / folders / npz archives, named by sample id (file names can hold
    patient names); returns the PNGs, the layer used and its map size. ``keep_paths``: also ``OUT/paths.csv``
    (sample_id, path of each file), as ``medxfer predict --keep-paths`` writes it."""
    out_dir = check_out_dir(out_dir)
    mapping = out_dir / PATHS
    if keep_paths:  # before any work
        check_out(mapping, inputs=[run_dir, *inputs], overwrite=overwrite,
                  ours=lambda p: files.first_line(p) == PATHS_HEADER)
    predictor = Predictor(run_dir)
    model, meta = predictor.network, predictor.meta
    name, size = feature_map_size(model, meta, layer)
    if target_class is not None:
        target_class = class_index(meta, target_class)
    paths: list | None = [] if keep_paths else None
    ids, images = _load_inputs(predictor, inputs, paths)
    stems = [f"{n}_gradcam" for n in _unique([i.replace("/", "_") for i in ids])]
    targets = [check_out(out_dir / f"{n}.png", inputs=[run_dir, *inputs], overwrite=overwrite, ours=is_overlay)
               for n in stems]
    probs = predictor.probabilities_of(images)  # as 'medxfer predict' gives them (with the run's TTA)
    pred = predictor.decide(probs)
    maps = explain_images(model, meta, images, layer=name, target_class=target_class)
    labels = meta.labels
    shown = pred if target_class is None else np.full(len(pred), target_class)
    thr, pos = meta.threshold, meta.positive_label
    rule = f" (threshold {thr:.2f} on P({pos}))" if len(labels) == 2 and thr is not None and pos else ""
    titles = [f"{i}: predicted {labels[p]}, P={probs[k, p]:.2f}{rule}"
              + ("" if c == p else f"\nmap for {labels[c]} (P={probs[k, c]:.2f})")
              for k, (i, p, c) in enumerate(zip(ids, pred, shown))]
    tmp = None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".medxfer-"))
        pngs = _publish(save_overlays(images.numpy(), maps, tmp, stems, titles), targets)
    except OSError as e:
        raise files.write_error(out_dir, e) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if paths is not None:  # names need not be UTF-8: Python strings, written back as the bytes they were
        files.write_csv(mapping, pd.DataFrame(paths, columns=PATHS_HEADER.split(","), dtype=object))
    return pngs, name, size
