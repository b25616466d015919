"""Exact duplicate images across train/val/test: found, reported, and refused unless allowed.

Usage::

    from medxfer.data.duplicates import handle_duplicates, find_cross_split_duplicates

    groups = find_cross_split_duplicates(manifest, images_uint8)   # rows of manifest <-> images
    keep, table = handle_duplicates(manifest, images_uint8, policy="drop-from-train")

Policies (``--duplicates``): ``drop-from-train`` (default) keeps the published val and test sets as
they are and removes the copies from train (and from val when the copy is in test); ``refuse``
stops with one line; ``allow`` keeps every copy and warns. Whatever the policy, the groups found
are listed in ``duplicates.csv`` with what was done to each member.

An image is a duplicate of another when its decoded, resized uint8 pixels (what the model sees)
are byte-identical. Identical files always decode to identical pixels, so the pixel hash finds
every copied file too; for file-based manifests the members of each group are also compared by
file bytes (SHA-256, memoised by the decode cache), and ``match`` says which: ``"file"`` (the
same file bytes) or ``"pixels"`` (different files, same decoded pixels, e.g. a re-saved copy).

Copies within one split are harmless and not reported. Copies across splits leak: a test image
the model was trained on inflates the test metrics. Note that the published MedMNIST splits hold
a few (BreastMNIST 28 px: 1 pair train/test, with different labels; PneumoniaMNIST 28 px: 8
groups, 18 images, train/val).
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pandas as pd

from medxfer.data.cache import file_digest
from medxfer.errors import MedxferError, did_you_mean

__all__ = ["POLICIES", "check_duplicates", "find_cross_split_duplicates", "handle_duplicates", "pixel_hashes",
           "same_hash"]

SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
log = logging.getLogger(__name__)
POLICIES = ("drop-from-train", "refuse", "allow")


def pixel_hashes(images) -> list[str]:
    """BLAKE2b digest of each image's bytes and shape; ``images`` is (N, ...) uint8, tensor or array."""
    arr = images.numpy() if hasattr(images, "numpy") else np.asarray(images)
    arr = np.ascontiguousarray(arr)
    shape = repr(arr.shape[1:]).encode()
    out = []
    for img in arr:
        h = hashlib.blake2b(img.tobytes(), digest_size=16)
        h.update(shape)
        out.append(h.hexdigest())
    return out


def find_cross_split_duplicates(manifest, images_uint8) -> list[dict]:
    """Groups of identical images that span more than one split, largest first.

    ``images_uint8`` rows align with ``manifest.table`` rows. Each group is a dict:
    ``sample_ids``, ``splits`` and ``labels`` (class names) of its members (train first, then
    val, then test), ``count`` (members), ``match`` (``"file"`` or ``"pixels"``, see the module
    docstring) and, for messages, ``first`` = ``(sample_id, split)`` and ``second`` = the first
    member in another split.
    """
    t = manifest.table
    if len(images_uint8) != len(t):
        raise ValueError(f"{len(images_uint8)} images for {len(t)} manifest rows; they must align.")
    if "split" not in t or len(t) == 0:
        return []
    hashes = pixel_hashes(images_uint8)
    splits = t["split"].astype(object).to_numpy()
    ids = t["sample_id"].astype(str).to_numpy()
    labels = t["label"].to_numpy()
    paths = t["path"].to_numpy() if "path" in t else None
    groups = []
    for members in same_hash(hashes):
        if len({splits[i] for i in members}) < 2:
            continue
        members = sorted(members, key=lambda i: (SPLIT_ORDER.get(splits[i], 3), i))
        first = members[0]
        second = next(i for i in members if splits[i] != splits[first])
        groups.append({
            "rows": [int(i) for i in members],
            "sample_ids": [str(ids[i]) for i in members],
            "splits": [str(splits[i]) for i in members],
            "labels": [_label_name(manifest.labels, labels[i]) for i in members],
            "count": len(members),
            "match": _match_kind(paths, members),
            "first": (str(ids[first]), str(splits[first])),
            "second": (str(ids[second]), str(splits[second])),
        })
    groups.sort(key=lambda g: (-g["count"], SPLIT_ORDER.get(g["first"][1], 3), g["first"][0]))
    return groups


def same_hash(hashes) -> list[list[int]]:
    """Rows that share a hash, one list per hash held by two rows or more (rows in order; the groups in
    the order their hash first appears). One hash table for all rows instead of a Python list per row."""
    codes = pd.factorize(np.asarray(hashes, dtype=object))[0]
    rows = np.flatnonzero(np.bincount(codes)[codes] > 1)
    if len(rows) == 0:
        return []
    rows = rows[np.argsort(codes[rows], kind="stable")]
    return [part.tolist() for part in np.split(rows, np.flatnonzero(np.diff(codes[rows])) + 1)]


def check_duplicates(manifest, images, allow: bool) -> list[dict]:
    """Refuse identical images in two splits (MedxferError) unless ``allow``; then log a warning.

    Returns the groups found (empty when none).
    """
    groups = find_cross_split_duplicates(manifest, images)
    if not groups:
        return groups
    n = sum(g["count"] for g in groups)
    (a, sa), (b, sb) = groups[0]["first"], groups[0]["second"]
    what = f"{n} images appear in more than one split (first: {a} ({sa}) = {b} ({sb}))"
    conflicts = sum(len(set(g["labels"])) > 1 for g in groups)
    if conflicts:
        what += f"; {conflicts} of the {len(groups)} groups carry different labels"
    if not allow:
        raise MedxferError(f"{what}. Remove the copies, or pass --duplicates drop-from-train (keeps val and test, "
                           "drops the copies from train) or --duplicates allow.")
    log.warning("%s; kept because duplicates are allowed: test metrics may be optimistic", what)
    return groups


def handle_duplicates(manifest, images, policy: str = "drop-from-train"):
    """Apply ``policy`` to the cross-split duplicates -> (bool keep mask per row, duplicates table).

    The table (one row per member of every group: ``group, sample_id, split, label, match, action``)
    is empty when there are none; it is written to ``duplicates.csv``.
    """
    if policy not in POLICIES:
        raise MedxferError(f"The 'duplicates' parameter must be one of {list(POLICIES)}. Got '{policy}' instead."
                           f"{did_you_mean(str(policy), POLICIES)}")
    keep = np.ones(len(manifest.table), bool)
    if policy == "refuse":
        check_duplicates(manifest, images, allow=False)
        return keep, pd.DataFrame(columns=["group", "sample_id", "split", "label", "match", "action"])
    groups = find_cross_split_duplicates(manifest, images)
    rows = []
    for g, group in enumerate(groups):
        top = max(SPLIT_ORDER.get(s, 0) for s in group["splits"])  # the copy in the latest split is kept
        for r, sid, split, label in zip(group["rows"], group["sample_ids"], group["splits"], group["labels"]):
            drop = policy == "drop-from-train" and SPLIT_ORDER.get(split, 0) < top
            keep[r] = not drop
            rows.append({"group": g, "sample_id": sid, "split": split, "label": label, "match": group["match"],
                         "action": f"dropped from {split}" if drop else "kept"})
    table = pd.DataFrame(rows, columns=["group", "sample_id", "split", "label", "match", "action"])
    if groups:
        n = sum(g["count"] for g in groups)
        conflicts = sum(len(set(g["labels"])) > 1 for g in groups)
        what = (f"{n} images in {len(groups)} groups appear in more than one split"
                + (f" ({conflicts} groups with different labels)" if conflicts else ""))
        if policy == "allow":
            log.warning("%s; kept (--duplicates allow): test metrics may be optimistic (duplicates.csv)", what)
        else:
            log.info("%s: %d copies dropped from train/val, the val and test sets kept as published (duplicates.csv; "
                     "--duplicates refuse|allow to change)", what, int((~keep).sum()))
    return keep, table


def _label_name(names, value) -> str:
    try:
        return str(names[int(value)])
    except (IndexError, TypeError, ValueError):
        return str(value)


def _match_kind(paths, members) -> str:
    if paths is None:
        return "pixels"
    try:
        digests = {file_digest(paths[i]) for i in members}
    except OSError:
        return "pixels"
    return "file" if len(digests) == 1 else "pixels"
