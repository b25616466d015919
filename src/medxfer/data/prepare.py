"""From data options to what training needs: a validated, split manifest and its decoded images.

Usage::

    prep = prepare_data(cfg.data, size=64, seed=0)           # cfg.data: the data options of a TrainConfig
    prep.images, prep.manifest.table, prep.masks["train"], prep.y
    prep = prepare_data(cfg.data, 64, 0, splits=fold_split)   # cv: the folds handed over as data
    images = images_of(cfg.data, 64, 0, sample_ids)           # rebuild some samples (report, export)

Steps, each refusing with one line what it cannot use: read the manifest (npz, folder, CSV/Parquet,
DICOM folder, or an in-memory one), check the labels, apply given splits or make a stratified,
grouped one, decode every sample once (image files: by ``--workers`` processes into the decoded store on disk,
which the images map), handle duplicates across splits,
keep a label fraction, and check that every class has training images and val/test hold two classes.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from medxfer.data.cache import DecodeCache, default_cache_dir
from medxfer.data.decoding import default_workers
from medxfer.data.duplicates import handle_duplicates
from medxfer.data.loading import Skipped, load_images
from medxfer.data.manifest import SPLITS, Manifest, check_classes, check_split_classes, check_split_values
from medxfer.data.memory import check_memory
from medxfer.data.readers import ReadOptions
from medxfer.data.sizing import choose_size, native_size
from medxfer.data.sources import check_task, load_manifest
from medxfer.data.splits import assign_splits
from medxfer.errors import MedxferError

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A manifest with its split, and its decoded uint8 images (N, C, S, S), row for row."""

    manifest: Manifest
    images: torch.Tensor
    skipped: list[Skipped]
    read: ReadOptions
    duplicates: pd.DataFrame
    input_dtype: str | None = None       # the training pixels' type(s), for model.json's input contract
    size: int = 0                        # the side the images were resized to (given, or chosen from the data)

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    @property
    def table(self) -> pd.DataFrame:
        return self.manifest.table

    @property
    def y(self) -> torch.Tensor:
        """(N,) class indices, or the (N, K) float 0/1 matrix of a multi-label task."""
        return torch.from_numpy(self.manifest.targets().copy())

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return {s: torch.from_numpy((self.table["split"] == s).to_numpy().copy()) for s in SPLITS}


def read_options(opts) -> ReadOptions:
    return ReadOptions(window=opts.window, frame=opts.frame, slice=opts.slice, intensity=opts.intensity)


def load_source_manifest(opts, source: Manifest | None = None) -> Manifest:
    """The manifest of ``opts.path`` (or the in-memory ``source``), labels checked."""
    if source is None:
        if not opts.path:
            raise MedxferError("no data given: pass --data PATH (an .npz, a folder, a CSV/Parquet manifest, or a "
                               "DICOM folder with --labels) or --config FILE.")
        source = load_manifest(opts.path, label_names=list(opts.label_names) if opts.label_names else None,
                               labels_csv=opts.labels, on_unlabelled=opts.on_unlabelled, task=opts.task,
                               label_columns=list(opts.label_columns) if opts.label_columns else None,
                               no_finding=opts.no_finding)
    else:
        source = check_task(source, opts.task)
    check_classes(source)
    return source


def prepare_data(opts, size: int | None, seed: int, *, splits: dict | pd.Series | None = None,
                 source: Manifest | None = None, checks: bool = True, source_size: int = 224,
                 spatial_dims: int = 2, batch_size: int = 64, arch: str | None = None) -> Prepared:
    """See the module docstring. ``size``: the side to resize to, or None to choose it from the data's native
    size (read from headers before decoding) and ``source_size`` (:mod:`medxfer.data.sizing`); ``seed``: the
    training seed (split seed unless ``opts.split_seed``, and the label-fraction draw); ``splits``:
    sample_id -> split, replacing the data's own. Before decoding, the memory the images and training need is
    estimated (``batch_size``, ``arch``) and a run that cannot fit is refused in one line
    (:func:`medxfer.data.memory.check_memory`)."""
    manifest = load_source_manifest(opts, source)
    if splits is not None:
        manifest = apply_splits(manifest, splits)
    split_seed = seed if opts.split_seed is None else opts.split_seed
    manifest = assign_splits(manifest, seed=split_seed, split_by=opts.split_by)
    if size is None:
        size, why = choose_size(native_size(manifest), source_size, spatial_dims)
        manifest.notes.append(f"image size {size} px: {why} (--image-size to choose another)")   # logged below
    read = read_options(opts)
    cache = None
    if manifest.arrays is None and not opts.no_cache:
        cache = DecodeCache(opts.cache_dir or default_cache_dir())
        cache.check_writable()
    workers = getattr(opts, "workers", None)
    workers = default_workers(len(manifest.table)) if workers is None else workers
    if checks:  # what the decoded images and training will hold, in memory and on disk, before anything is decoded
        check_memory(manifest, size, volumes=spatial_dims == 3, batch_size=batch_size, arch=arch, workers=workers,
                     store_dir=cache.directory if cache is not None else None)
    loaded = load_images(manifest, size, read, cache, opts.on_bad_file, workers)
    if loaded.skipped:
        log.warning("skipped %d unreadable samples (listed in skipped.csv)", len(loaded.skipped))
    manifest = manifest.subset(loaded.keep)
    keep, duplicates = handle_duplicates(manifest, loaded.images, opts.duplicates)
    # all kept (the usual case): the images stay a view of the decoded store, no copy in memory
    manifest, images = manifest.subset(keep), loaded.images if keep.all() else loaded.images[torch.from_numpy(keep)]
    skipped, notes, input_dtype = loaded.skipped, loaded.notes, loaded.input_dtype
    del loaded   # a copy made above (some rows dropped) leaves the full set to be freed
    if opts.label_fraction < 1:
        manifest, images = label_fraction(manifest, images, opts.label_fraction, seed)
    if checks:
        check_split_classes(manifest)
        for note in manifest.notes:
            log.info(note)
    manifest.notes.extend(notes)  # logged where they arose; kept for config.yaml
    return Prepared(manifest, images, skipped, read, duplicates, input_dtype, size)


def label_fraction(manifest: Manifest, images: torch.Tensor, fraction: float, seed: int):
    """Keep a stratified ``fraction`` of the train split (at least 2 per class); val/test untouched."""
    t = manifest.table
    rng = np.random.default_rng(seed)
    keep = np.ones(len(t), bool)
    train = (t["split"] == "train").to_numpy()
    if manifest.multilabel:  # findings overlap: a random draw of the train images (checked after for positives)
        idx = np.flatnonzero(train)
        keep[rng.permutation(idx)[max(2, int(round(len(idx) * fraction))):]] = False
    for label in ([] if manifest.multilabel else t["label"].unique()):
        idx = np.flatnonzero(train & (t["label"] == label).to_numpy())
        n = max(2, int(round(len(idx) * fraction)))
        keep[rng.permutation(idx)[n:]] = False
    out = manifest.subset(keep)
    out.notes.append(f"kept {fraction:g} of the train labels ({int((out.table['split'] == 'train').sum())} images)")
    return out, images[torch.from_numpy(keep)]


def apply_splits(manifest: Manifest, splits: dict | pd.Series, where: str = "the given splits") -> Manifest:
    """The manifest with its split column replaced by ``splits`` (sample_id -> train/val/test).

    Every sample must be listed and every listed sample must exist: splits made for other data are
    refused rather than half applied."""
    lookup = dict(splits.items()) if hasattr(splits, "items") else dict(splits)
    check_split_values(pd.Series(list(lookup.values()), dtype=object), where)
    ids = manifest.table["sample_id"].astype(str)
    absent = [s for s in ids if s not in lookup]
    if absent:
        raise MedxferError(f"{where} give no split for {len(absent)} of the {len(ids)} samples (first: "
                           f"'{absent[0]}'); every sample of the data needs one.")
    extra = set(lookup) - set(ids)
    if extra:
        raise MedxferError(f"{where} list {len(extra)} samples that are not in the data (first: "
                           f"'{sorted(extra)[0]}'). Were they made for other data?")
    t = manifest.table.copy()
    t["split"] = ids.map(lookup).to_numpy()
    out = manifest.with_table(t)
    out.notes.append(f"splits from {where}")
    return out


def images_of(opts, size: int, seed: int, sample_ids) -> torch.Tensor:
    """The decoded images of ``sample_ids`` (in that order), prepared exactly as training prepared them
    (the report's Grad-CAM gallery and the export's parity check rebuild a run's test images this way)."""
    # duplicates were handled and the split checked when the run trained: here samples are only looked up, under
    # the run's own rule (drop-from-train keeps every val and test sample; 'allow' would warn of copies it kept)
    rule = "allow" if opts.duplicates == "refuse" else opts.duplicates
    prep = prepare_data(dataclasses.replace(opts, duplicates=rule, label_fraction=1.0), size, seed, checks=False)
    row = {sid: i for i, sid in enumerate(prep.table["sample_id"].astype(str))}
    ids = [str(s) for s in sample_ids]
    missing = [s for s in ids if s not in row]
    if missing:
        raise MedxferError(f"the data '{opts.path}' no longer matches the run: sample '{missing[0]}' ({len(missing)} in "
                           "all) is not in it. Pass --data with the run's data.")
    return prep.images[np.array([row[s] for s in ids], dtype=int)]
