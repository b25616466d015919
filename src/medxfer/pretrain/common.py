"""What both pretraining methods share: the source directory, checkpoints, unlabelled images.

A source directory (what ``medxfer pretrain`` writes, what ``--source DIR`` reads)::

    source.json         name, arch, mean, std, input_size, in_chans, domain, description, method,
                        trained_on {data, labels, counts, image_size, epochs, seed, metrics}, created
    model.safetensors   the timm state dict of the backbone, timm key space, classifier dropped
    (OUT.partial/checkpoint.pt: the loop's last completed epoch while pretraining runs, for --resume)

``source.json`` is written last, so a directory that has it is complete.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medxfer import files
from medxfer.data.cache import DecodeCache, default_cache_dir
from medxfer.data.folders import walk
from medxfer.data.loading import arrays_to_uint8, load_images
from medxfer.data.manifest import Manifest
from medxfer.data.npzfile import NpzArchive
from medxfer.data.prepare import read_options
from medxfer.data.sources import is_image_file, load_manifest
from medxfer.data.splits import assign_splits
from medxfer.errors import MedxferError
from medxfer.files import sha256_file
from medxfer.models.catalog import resolve_source
from medxfer.models.weights import weights_file
from medxfer.privacy import sample_id
from medxfer.runs import checkpoint_path, staging_dir

SPLITS = ("train", "val", "test")
log = logging.getLogger(__name__)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# --------------------------------------------------------------------------------------------------
# the source directory


def backbone_state_dict(arch: str, in_chans: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the backbone keys of a timm ``arch`` (classifier dropped), checking none is missing.

    ``state`` is in timm key space (``conv_stem.weight``...). The reference is the same
    architecture built with ``num_classes=0``, so whatever timm calls the head is left out.
    """
    import timm

    ref = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans).state_dict()
    missing = [k for k in ref if k not in state]
    if missing:
        raise MedxferError(f"the trained model lacks {len(missing)} backbone keys of '{arch}' (first: {missing[0]}); "
                           "cannot write a source directory from it.")
    return {k: state[k].detach().contiguous().cpu().clone() for k in ref}


def write_source_dir(out: Path, arch: str, backbone: dict[str, torch.Tensor], meta: dict) -> dict:
    """Write ``model.safetensors`` then ``source.json`` (atomically each); returns the json written."""
    out = Path(out)
    digest = files.write_weights(out / "model.safetensors", backbone)
    meta = {"name": meta.get("name") or out.name, "arch": arch, **{k: v for k, v in meta.items() if k != "name"},
            "weights_sha256": digest,
            "format": "timm state dict of the backbone (timm key space, classifier dropped), safetensors",
            "created": now()}
    for key in ("mean", "std"):
        meta[key] = [float(v) for v in meta[key]]
    files.write_json(out / "source.json", meta)
    shutil.rmtree(staging_dir(out), ignore_errors=True)  # the finished pretraining's checkpoint folder
    return meta


def check_out_dir(out: Path, resume: bool) -> None:
    """Refuse to overwrite a finished source or an unfinished pretraining unless resuming."""
    out = Path(out)
    if resume:
        if not checkpoint_path(out).is_file():
            raise MedxferError(f"nothing to resume: '{checkpoint_path(out)}' does not exist (it is written after the "
                               "first epoch). Run without --resume to start.")
        return
    if checkpoint_path(out).exists():
        raise MedxferError(f"'{out}' holds a pretraining checkpoint: pass --resume to continue it, or choose "
                           "another --out (or delete that directory).")
    if (out / "source.json").exists():
        raise MedxferError(f"'{out}' is already a source directory: choose another --out, or delete it first.")


def init_record(init: str | None) -> dict | None:
    """What the pretraining started from (a source name and the sha256 of its weights file)."""
    if init is None:
        return None
    spec = resolve_source(init)
    f = weights_file(spec)
    return {"source": spec.name, "arch": spec.arch, "weights": spec.weights, "domain": spec.domain,
            "weights_sha256": sha256_file(f) if f is not None and Path(f).exists() else None}


# --------------------------------------------------------------------------------------------------
# unlabelled images for self-supervised pretraining


def unlabelled_images(opts, size: int, *, seed: int = 0, splits: tuple[str, ...] = ("train", "val")
                      ) -> tuple[torch.Tensor, dict]:
    """uint8 images (N, C, size, size) of the ``splits`` asked for, labels ignored, and a record of them.

    Given splits are used as given. Labelled data without splits gets the split ``medxfer train
    --seed SEED`` would make, so the test images of a later run with that seed are never seen here.
    Data with neither labels nor splits (an npz with ``images``, a flat folder) is used whole; the
    record says so.

    ``opts``: the data options (path, reader options, caches, what to do with bad files).
    """
    path, read = Path(str(opts.path)), read_options(opts)
    if not path.exists():
        raise MedxferError(f"data path '{path}' does not exist. Give an .npz file, a folder of images or a "
                           "CSV/Parquet manifest.")
    if path.is_file() and path.suffix.lower() == ".npz":
        got = _npz_images(path, splits)
        if got is not None:
            arrays, record = got
            return arrays_to_uint8(arrays, size, read), record
    try:
        manifest = load_manifest(path)
        manifest = assign_splits(manifest, seed=seed, split_by=opts.split_by)
        labelled = True
    except MedxferError as e:
        if path.is_file():
            raise
        manifest = _unlabelled_folder(path, e)
        labelled = False
    t = manifest.table
    given = manifest.has_splits
    mask = t["split"].isin(splits).to_numpy() if given else np.ones(len(t), bool)
    manifest = manifest.subset(mask)
    cache = None
    if manifest.arrays is None and not opts.no_cache:
        cache = DecodeCache(opts.cache_dir or default_cache_dir())
        cache.check_writable()
    loaded = load_images(manifest, size, read, cache, opts.on_bad_file)
    kept = manifest.table[loaded.keep]
    record = {"splits_used": list(splits) if given else "all (the data defines no splits)",
              "labels": "ignored" if labelled else "none",
              "images": {str(s): int(n) for s, n in kept["split"].fillna("all").value_counts().items()},
              "split_rule": ("none" if not given else f"medxfer's split with seed {seed}"
                             if any(n.startswith("made a stratified") for n in manifest.notes) else "given"),
              "test_excluded": bool(given and "test" not in splits)}
    if loaded.skipped:
        record["skipped"] = len(loaded.skipped)
    if not given:
        log.warning("the data defines no train/val/test split: every image is used for pretraining; keep these "
                    "images out of any later test set")
    return loaded.images, record


def _npz_images(path: Path, splits: tuple[str, ...]):
    """Images straight from an npz: the asked splits when all three are given, or ``images`` when unlabelled.
    Every array is checked from its header first (shapes, pixel limits, the memory), as for training.

    Returns None for labelled npz files with partial splits (they take medxfer's seeded split).
    """
    with NpzArchive(path) as npz:
        keys = set(npz.keys())
        have = [s for s in SPLITS if f"{s}_images" in keys]
        if set(have) == set(SPLITS):
            names = [f"{s}_images" for s in splits]
            record = {"splits_used": list(splits),
                      "labels": "ignored" if any(f"{s}_labels" in keys for s in SPLITS) else "none",
                      "split_rule": "given", "test_excluded": "test" not in splits}
        elif "train_labels" in keys:
            return None
        else:
            names = [k for k in sorted(keys) if (k == "images" or k.endswith("_images")) and k != "test_images"]
            if not names:
                raise MedxferError(f"npz '{path}' has keys {sorted(keys)}; for pretraining medxfer needs 'images' or "
                                   "'{train,val,test}_images' arrays, (N,H,W) or (N,H,W,3).")
            record = {"splits_used": "all (the data defines no splits)" if names == ["images"] else
                      [k[:-7] for k in names], "labels": "none", "split_rule": "none",
                      "test_excluded": "test_images" in keys}
        npz.check_images(names)
        npz.check_alike(names)
        npz.check_memory(names)
        named = list(splits) if record["split_rule"] == "given" else names    # counts by split, or by array
        record["images"] = {n: int(npz.shape(k)[0]) for n, k in zip(named, names)}
        return npz.load_stacked(names), record


def _unlabelled_folder(root: Path, why: MedxferError):
    """Every image file under ``root`` (any depth); a top-level train/val/test folder names the split. Hidden and
    system folders and medxfer's own output are left out, as for labelled folders, and counted in the log."""
    walked = walk(root)
    found = [f for f in walked.files if is_image_file(f)]
    if walked.left_out or walked.broken:
        log.info("left out of '%s': %s%s", root, ", ".join(f"{n} {why}" for why, n in sorted(walked.left_out.items())),
                 f"; {len(walked.broken)} broken link(s)" if walked.broken else "")
    if not found:
        raise MedxferError(f"folder '{root}' holds no images ({why}).")
    rel = [f.relative_to(root) for f in found]
    top = [r.parts[0] if len(r.parts) > 1 else None for r in rel]
    has_splits = all(t in SPLITS for t in top)
    table = pd.DataFrame({"sample_id": [sample_id(r.as_posix()) for r in rel], "path": [os.path.realpath(f) for f in found],
                          "label": 0, "split": top if has_splits else None})
    return Manifest(table, ["unlabelled"], f"folder:{root}")
