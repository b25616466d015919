"""``medxfer explain RUN IMAGES... --out DIR``: Grad-CAM overlays for images, through the run's preprocessing.

Usage::

    paths, layer, size = explain_paths("runs/breast", ["scan1.png", "folder/"], "cams/", layer="blocks.4")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medxfer.errors import MedxferError
from medxfer.evaluation.gradcam import class_index, explain_images, feature_map_size, save_overlays
from medxfer.predict import Predictor


def _load_inputs(predictor: Predictor, inputs) -> tuple[list[str], torch.Tensor]:
    """Image files, folders (recursive) and npz archives -> (sample ids, uint8 (N, C, S, S))."""
    ids, chunks = [], []
    for chunk_ids, x in predictor.iter_inputs(inputs):
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


def explain_paths(run_dir: str | Path, inputs: list[str | Path], out_dir: str | Path, layer: str | None = None,
                  target_class=None) -> tuple[list[Path], str, tuple[int, ...]]:
    """Grad-CAM overlays for image files / folders / npz archives, named by sample id (file names can hold
    patient names); returns the PNGs, the layer used and its map size."""
    predictor = Predictor(run_dir)
    model, meta = predictor.network, predictor.meta
    name, size = feature_map_size(model, meta, layer)
    if target_class is not None:
        target_class = class_index(meta, target_class)
    ids, images = _load_inputs(predictor, inputs)
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
    names = [n.replace("/", "_") for n in ids]
    paths = save_overlays(images.numpy(), maps, out_dir, [f"{n}_gradcam" for n in _unique(names)], titles)
    return paths, name, size
