"""A folder data set on disk: which folders are splits and classes, and what is left out and why.

Usage::

    layout = read_layout(Path("images"), is_image_file, named_as_image)   # images/<class>/..., or
                                           # images/{train,val,test}/<class>/...
    layout.samples                         # (split or None, class, file) in a stable order
    layout.notes                           # what was left out, counted (the manifest's notes: the log)

The layout is decided by what the folders hold, not by their names alone. Left out, and counted:
hidden folders (``.ipynb_checkpoints``), system folders (``__MACOSX``, a NAS's ``@eaDir``, ...) and
medxfer's own output (a run, an ``X.partial`` staging folder, a folder holding a checkpoint, a study
or a comparison, or holding only such folders), so ``cd DATA && medxfer train --data .`` never reads
the run it writes. ``train/``, ``val/``, ``test/`` holding class folders make a split layout; another
folder with images beside them is refused (ambiguous), one without images is left out and said.
Links to files and folders are followed; a link whose target is gone, or that loops, is kept as a
sample when it is named like an image (the bad-file policy then decides: refuse, or skip and list),
and a folder link back to one of its own ancestors is counted and not followed.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from medxfer.data.manifest import SPLITS
from medxfer.errors import MedxferError

#: folders that operating systems, NAS boxes and archivers write beside data (hidden ones are left out anyway)
SYSTEM_DIRS = frozenset({"__MACOSX", "__pycache__", "@eaDir", "$RECYCLE.BIN", "System Volume Information",
                         "lost+found"})
#: files that desktops write beside images: not counted as ignored files
IGNORED_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
#: any one of these files marks a folder medxfer wrote (an unfinished run's checkpoint, cv, compare, auto, pretrain)
OUTPUT_FILES = frozenset({"checkpoint.pt", "cv.json", "comparison.json", "study.db", "source.json"})


def left_out(folder: Path) -> str | None:
    """Why ``folder`` is not data ('hidden', 'system', 'medxfer output'), or None."""
    if folder.name.startswith("."):
        return "hidden"
    if folder.name in SYSTEM_DIRS:
        return "system"
    return "medxfer output" if is_medxfer_output(folder) else None


def is_medxfer_output(folder: Path) -> bool:
    """A run (model.json + model.safetensors), a staging folder (``X.partial``), a folder holding a
    checkpoint, a study or a comparison, or one whose visible contents are only such folders (hidden
    files such as medxfer's ``.X.lock`` aside) and which holds at least one of them or a lock."""
    if folder.name.endswith(".partial"):
        return True
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    names = {e.name for e in entries}
    if {"model.json", "model.safetensors"} <= names or names & OUTPUT_FILES:
        return True
    visible = [e for e in entries if not e.name.startswith(".")]
    if not visible:
        return any(n.startswith(".") and n.endswith(".lock") for n in names)
    return all(_is_dir(e) and is_medxfer_output(Path(e.path)) for e in visible)


@dataclass
class Found:
    """What lies under one folder: files (and links to files), broken links, folders left out by reason."""

    files: list[Path] = field(default_factory=list)
    broken: list[Path] = field(default_factory=list)
    left_out: Counter = field(default_factory=Counter)


def walk(folder: Path, above: tuple[Path, ...] = ()) -> Found:
    """Every file under ``folder`` (links followed, loops and left-out folders counted), sorted by path.
    ``above``: the folders it lies in (a link back to one of them loops too)."""
    found = Found()
    _walk(folder, frozenset(os.path.realpath(p) for p in (*above, folder)), found)
    found.files.sort()
    found.broken.sort()
    return found


def _walk(folder: Path, ancestors: frozenset, found: Found) -> None:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        found.left_out["unreadable"] += 1
        return
    for e in entries:
        path = Path(e.path)
        if _is_dir(e):
            why = left_out(path)
            real = os.path.realpath(path)
            if why is None and real in ancestors:
                why = "looping link"
            if why:
                found.left_out[why] += 1
            else:
                _walk(path, ancestors | {real}, found)
        elif _is_file(e):
            found.files.append(path)
        elif e.is_symlink():  # its target is gone, or it loops
            found.broken.append(path)


def _is_dir(e: os.DirEntry) -> bool:
    try:
        return e.is_dir()
    except OSError:  # a looping link
        return False


def _is_file(e: os.DirEntry) -> bool:
    try:
        return e.is_file()
    except OSError:
        return False


@dataclass
class Layout:
    samples: list[tuple[str | None, str, Path]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Images:
    """The image files (and image-named broken links) under one class folder, and what else was there."""

    files: list[Path]
    counts: Counter  # ignored files, broken links, folders left out


def read_layout(root: Path, is_image, looks_like_image) -> Layout:
    """The samples of a class-folder data set (see the module docstring).

    ``is_image(path)``: a file medxfer reads; ``looks_like_image(path)``: a name that says so (a broken
    link has no content to look at)."""
    def images(folder: Path) -> _Images:
        found, counts, files = walk(folder, (root, folder.parent)), Counter(), []
        counts.update(found.left_out)
        for f in found.files:
            if is_image(f):
                files.append(f)
            elif f.name not in IGNORED_NAMES:
                counts["ignored"] += 1
        for f in found.broken:
            ok = looks_like_image(f)
            counts["broken" if ok else "broken ignored"] += 1
            files += [f] if ok else []
        return _Images(sorted(files), counts)

    tops, direct, skipped = _folders(root, "", is_image)
    splits = {}
    for f in (f for f in tops if f.name in SPLITS):  # a split folder holds class folders
        classes, in_split, skipped_in = _folders(f, f"{f.name}/", is_image)
        splits[f.name] = ([(c.name, images(c)) for c in classes], in_split, skipped_in)
    layout, parts = Layout(), []
    if any(imgs.files for classes, _, _ in splits.values() for _, imgs in classes):
        classes_of = {f.name: images(f) for f in tops if f.name not in SPLITS}
        holding = [n for n, imgs in classes_of.items() if imgs.files]
        if holding:
            raise MedxferError(
                f"folder '{root}' holds split folders ({', '.join(sorted(splits))}) and class folders with images "
                f"beside them ({', '.join(repr(n) for n in holding[:5])}): medxfer cannot tell which layout is "
                "meant. Put every class folder under train/, val/ and test/ (train/<class>/...), move the split "
                "folders away, or give a CSV manifest.")
        skipped += [f"{n} (no images)" for n in classes_of]
        parts += [(None, imgs) for imgs in classes_of.values()]  # what they held is still counted
        for split in (s for s in SPLITS if s in splits):
            classes, in_split, skipped_in = splits[split]
            direct, skipped = direct + in_split, skipped + skipped_in
            layout.samples += [(split, name, f) for name, imgs in classes for f in imgs.files]
            parts += [(f"{split}/{name}", imgs) for name, imgs in classes]
    else:
        if tops and {f.name for f in tops} <= set(SPLITS) and any(n["images"] for _, n, _ in splits.values()):
            raise MedxferError(f"folder '{root}': {', '.join(f.name for f in tops)} hold images but no class folders. "
                               "Put each split's images in one folder per class (train/<class>/...), or give a CSV "
                               "manifest.")
        for f in tops:
            imgs = images(f)
            layout.samples += [(None, f.name, p) for p in imgs.files]
            parts.append((f.name, imgs))
    layout.notes = _notes(skipped, direct, parts)
    return layout


def _folders(base: Path, prefix: str, is_image) -> tuple[list[Path], Counter, list[str]]:
    """The sub-folders of ``base`` that may hold data (sorted), the images and broken links directly in
    ``base`` (counted: they are in no class folder), and the folders left out, named with their reason."""
    folders, direct, skipped = [], Counter(), []
    for e in sorted(os.scandir(base), key=lambda e: e.name):
        path = Path(e.path)
        if not _is_dir(e):
            if _is_file(e):
                direct["images"] += bool(is_image(path))
            elif e.is_symlink():
                direct["broken links"] += 1
            continue
        why = left_out(path)
        if why is None:
            folders.append(path)
        else:
            skipped.append(f"{prefix}{e.name} ({why})")
    return folders, direct, skipped


def _notes(skipped: list[str], direct: Counter, parts: list) -> list[str]:
    """What was left out, counted, for the manifest's notes. ``parts``: (class folder or None, its images)."""
    total, empty = Counter(), []
    for name, imgs in parts:
        total.update(imgs.counts)
        if name is not None and not imgs.files:
            empty.append(name)
    inner = {k: v for k, v in total.items() if k not in ("ignored", "broken", "broken ignored")}
    out = []
    if skipped:
        n = len(skipped)
        out.append(f"ignored {n} folder{'s' if n > 1 else ''} that hold no class data: {', '.join(skipped)}")
    if inner:
        out.append(f"left out {sum(inner.values())} folders inside class folders: "
                   + ", ".join(f"{n} {why}" for why, n in sorted(inner.items())))
    for what, n in sorted(direct.items()):
        if n:
            out.append(f"warning: ignored {n} {what} outside class folders (no class to learn from them)")
    if total["ignored"]:
        out.append(f"ignored {total['ignored']} files that are not images (by suffix and content)")
    if total["broken"]:
        n = total["broken"]
        out.append(f"warning: {n} broken link{'s' if n > 1 else ''} (target gone, or a loop) kept as unreadable "
                   "samples: --on-bad-file decides (refuse, or skip and list in skipped.csv)")
    if total["broken ignored"]:
        out.append(f"ignored {total['broken ignored']} broken links not named as images")
    if empty:
        out.append(f"warning: {len(empty)} class folder(s) hold no images and give no samples: {', '.join(empty)}")
    return out
