"""Build a :class:`Manifest` from what the user has: npz, class folders, CSV/Parquet, DICOM folder.

Usage::

    m = load_manifest("data/breastmnist_28.npz", label_names=["malignant", "benign"])
    m = load_manifest("images/")                 # images/<class>/*.png or images/{train,val,test}/<class>/
    m = load_manifest("labels.csv")              # columns path,label[,patient_id][,split]
    m = load_manifest("dicoms/", labels_csv="labels.csv")   # DICOM folder + labels keyed by path/UID
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from medxfer.data.dicom import dicom_folder_manifest, has_dicom_preamble
from medxfer.data.folders import IGNORED_NAMES, read_layout
from medxfer.data.manifest import (SPLITS, Manifest, check_split_values, labels_from_values, multilabel_from_matrix,
                                   multilabel_from_text, order_note)
from medxfer.data.npzfile import NpzArchive
from medxfer.errors import MedxferError
from medxfer.privacy import hash_id, sample_id

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".nii", ".nii.gz", ".npy"}


def suffix_of(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def load_manifest(path: str | Path, *, label_names: list[str] | None = None, labels_csv: str | Path | None = None,
                  label_column: str = "label", on_unlabelled: str = "error", task: str = "auto",
                  label_columns: list[str] | None = None, no_finding: str | None = None) -> Manifest:
    """Read ``path`` into a Manifest, choosing the source kind by what the path is.

    Multi-label data (several findings per sample) is recognised by its labels: an (N, K) array in an
    npz, ``label_columns`` (or, with ``task="multilabel"``, every column but path/patient_id/split) of
    0/1 in a table, or a label column of '|'-separated findings."""
    path = Path(path)
    if not path.exists():
        raise MedxferError(f"data path '{path}' does not exist. Give an .npz file, a folder of class sub-folders, "
                           "a CSV/Parquet manifest, or a DICOM folder with --labels.")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".npz":
            m = from_npz(path, label_names)
        elif suffix in (".csv", ".parquet", ".pq"):
            m = from_table(path, label_names, label_column, task=task, label_columns=label_columns,
                           no_finding=no_finding)
        else:
            raise MedxferError(f"data file '{path}' has suffix '{suffix}': medxfer reads .npz, .csv or .parquet "
                               "manifests, or a folder.")
    elif labels_csv is not None:
        m = from_dicom_folder(path, Path(labels_csv), label_names, on_unlabelled=on_unlabelled)
    else:
        m = from_folder(path, label_names)
    return check_task(m, task, label_columns)


def check_task(m: Manifest, task: str, label_columns=None) -> Manifest:
    """Refuse a ``--task`` the labels cannot be (one line saying what the labels are)."""
    if task == "multilabel" and not m.multilabel:
        raise MedxferError(f"--task multilabel, but {m.origin} has one class per sample ({len(m.labels)} classes). "
                           "Give several findings per sample: an (N, K) 0/1 labels array, --label-columns, or a "
                           "label column of '|'-separated findings.")
    if task in ("binary", "multiclass", "ordinal") and m.multilabel:
        raise MedxferError(f"--task {task}, but {m.origin} has several findings per sample ({len(m.labels)}): use "
                           "--task multilabel (or auto).")
    if task == "binary" and len(m.labels) != 2:
        raise MedxferError(f"--task binary, but {m.origin} has {len(m.labels)} classes ({', '.join(m.labels[:6])}). "
                           "Use --task multiclass, or keep two classes.")
    if task == "ordinal" and len(m.labels) < 3:
        raise MedxferError(f"--task ordinal needs at least three ordered grades; {m.origin} has {len(m.labels)}.")
    if label_columns and not m.multilabel:
        raise MedxferError("--label-columns is for a CSV/Parquet manifest of multi-label data.")
    note = None if m.multilabel else order_note(m.labels)
    if note and note not in m.notes:  # every source passes here: the log says which class is which
        m.notes.append(note)
    return m


def _npz_array(npz: NpzArchive, key: str) -> np.ndarray:
    """One array of an npz whose headers were checked (object arrays are refused there)."""
    return npz.load(key)


def _npz_labels(y: np.ndarray, label_names, where: str, n: int) -> tuple[np.ndarray, list[str], bool]:
    """(labels per sample, names, multilabel) from an npz labels array: (N,) / (N,1) classes, (N,K) 0/1 findings."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if len(y) != n or y.ndim not in (1, 2):
        raise MedxferError(f"{where} has shape {y.shape} for {n} images; expected (N,) or (N,1) classes, or an (N,K) "
                           "0/1 array of findings.")
    if y.ndim == 2:
        return (*multilabel_from_matrix(y, label_names, where), True)
    return (*labels_from_values(pd.Series(y), label_names, where), False)


def from_npz(path: Path, label_names: list[str] | None = None) -> Manifest:
    """An npz in the MedMNIST layout (``{train,val,test}_images`` / ``_labels``), or one ``images`` / ``labels``
    pair with optional ``label_names`` and ``patient_id`` (medxfer then makes the split). Labels (N,) or
    (N,1) are classes; (N,K) with K > 1 are K findings (multi-label).

    Every array is checked from its .npy header before any data is read (:mod:`medxfer.data.npzfile`):
    image shapes (no empty split, no side of 0, one image size and pixel type across splits), the
    pixel / voxel limits per image, one label row per image, and the total against the memory."""
    with NpzArchive(path) as npz:
        keys = set(npz.keys())
        splits = [s for s in SPLITS if f"{s}_images" in keys and f"{s}_labels" in keys]
        if "train" not in splits and not {"images", "labels"} <= keys:
            raise MedxferError(
                f"npz '{path}' has keys {sorted(keys)}; medxfer needs train_images and train_labels (and val_/test_ "
                "for given splits, MedMNIST layout), or images and labels (optional label_names, patient_id): images "
                "(N,H,W), (N,H,W,3) or (N,D,H,W), labels (N,), (N,1) or (N,K) 0/1 findings."
            )
        parts = [(s, f"{s}_images", f"{s}_labels") for s in splits] if "train" in splits else \
            [(None, "images", "labels")]
        image_keys = [xk for _, xk, _ in parts]
        npz.check_images(image_keys, hint="; give images for every split, or leave out the val_ and test_ arrays "
                         "and medxfer makes the split" if len(parts) > 1 else "")
        npz.check_alike(image_keys)
        for _, xk, yk in parts:
            shape, n = npz.shape(yk), npz.shape(xk)[0]
            if len(shape) not in (1, 2) or shape[0] != n:
                raise MedxferError(f"npz '{path}': {yk} has shape {shape} for {n} images; give one label row per "
                                   "image: (N,), (N,1) or an (N,K) 0/1 array of findings.")
        extra = [k for k in ("label_names", "patient_id") if k in keys]
        npz.check_memory(image_keys + [yk for _, _, yk in parts] + extra)
        if label_names is None and "label_names" in keys:
            label_names = [str(v) for v in _npz_array(npz, "label_names")]
        arrays = npz.load_stacked(image_keys)
        labels, split_col, ids = [], [], []
        for s, xk, yk in parts:
            y, n = _npz_array(npz, yk), npz.shape(xk)[0]
            labels.append(y.reshape(len(y), -1) if y.ndim == 2 else y)
            split_col += [s] * n
            ids += [f"{s}/{i:06d}" if s else f"{i:06d}" for i in range(n)]
        pid = _npz_array(npz, "patient_id") if "patient_id" in keys else None
    widths = {lab.shape[1] if lab.ndim == 2 else 1 for lab in labels}
    if len(widths) > 1:
        raise MedxferError(f"npz '{path}': the splits' labels have different widths {sorted(widths)}.")
    y_all = np.concatenate(labels)
    y_idx, names, multilabel = _npz_labels(y_all, label_names, f"npz '{path}' labels", len(arrays))
    if not label_names:
        names = [str(n) for n in names]
    table = pd.DataFrame({"sample_id": ids, "label": y_idx, "row": np.arange(len(arrays)), "split": split_col})
    if len(splits) < 3:
        table["split"] = None  # partial or no splits: make our own from all samples
    if pid is not None:
        if len(pid) != len(arrays):
            raise MedxferError(f"npz '{path}': patient_id has {len(pid)} entries for {len(arrays)} images.")
        table["patient_id"] = [hash_id(str(v)) for v in pid]
    return Manifest(table, names, f"npz:{path}", arrays=arrays, multilabel=multilabel)


def is_image_file(f: Path) -> bool:
    """A file medxfer reads: a known suffix, or a DICOM file without one (``DICM`` preamble)."""
    if not f.is_file() or f.name in IGNORED_NAMES or f.name.startswith("._") or f.name.startswith("."):
        return False
    if suffix_of(f) in IMAGE_SUFFIXES:
        return True
    return has_dicom_preamble(f)


def from_folder(root: Path, label_names: list[str] | None = None) -> Manifest:
    """``root/<class>/*`` or ``root/{train,val,test}/<class>/*``; class names are folder names.

    The layout is decided by what the folders hold (:mod:`medxfer.data.folders`): hidden and system
    folders and medxfer's own runs are left out, an ambiguous layout is refused. Samples are named by
    :func:`medxfer.privacy.sample_id` of their path relative to ``root`` (file names can hold patient
    names). Whatever is left out (empty class folders, non-image files, folders that are not data,
    broken links) is counted in the manifest's notes (config.yaml, the log), never dropped silently.
    """
    layout = read_layout(root, is_image_file, lambda f: suffix_of(f) in IMAGE_SUFFIXES)
    if not layout.samples:
        raise MedxferError(f"folder '{root}' has no images in class sub-folders (e.g. {root}/benign/001.png). "
                           f"Readable suffixes: {', '.join(sorted(IMAGE_SUFFIXES))} and DICOM files without a suffix.")
    split, classes, files = zip(*layout.samples)
    # paths as Python objects: a name that is not UTF-8 cannot be an (Arrow, UTF-8) string column
    table = pd.DataFrame({"sample_id": [sample_id(f.relative_to(root).as_posix()) for f in files],
                          "path": pd.Series([os.path.realpath(f) for f in files], dtype=object), "split": list(split)})
    y, names = labels_from_values(pd.Series(classes, dtype=object), label_names, f"'{root}'")
    table["label"] = y
    m = Manifest(table, names, f"folder:{root}")
    m.notes += layout.notes
    return m


def from_table(path: Path, label_names: list[str] | None = None, label_column: str = "label", *,
               task: str = "auto", label_columns: list[str] | None = None, no_finding: str | None = None) -> Manifest:
    """A CSV/Parquet with ``path,label`` and optional ``patient_id``, ``split`` (paths relative to it).

    Multi-label: ``label_columns`` of 0/1 (with ``task="multilabel"`` and no ``label`` column: every
    column but path/patient_id/split), or a ``label`` column of '|'-separated findings (``no_finding``
    names the value meaning none). Other columns are kept (for ``--split-by COLUMN`` and subgroup
    results). Samples are named by the pseudonymous :func:`medxfer.privacy.sample_id` of the ``path``
    value; messages name manifest rows by number, never by path.
    """
    try:
        df = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_csv(path)
    except Exception as e:  # noqa: BLE001
        raise MedxferError(f"cannot read manifest '{path}' ({type(e).__name__}).") from e
    if label_columns is None and task == "multilabel" and label_column not in df.columns:
        label_columns = [c for c in df.columns if c not in ("path", "patient_id", "split", "sample_id")]
    needed = ["path"] + (list(label_columns) if label_columns else [label_column])
    missing_cols = [c for c in needed if c not in df.columns]
    if missing_cols:
        raise MedxferError(f"manifest '{path}' lacks column(s) {missing_cols}; it has {list(df.columns)}. "
                           f"Needed: path,{label_column} (or --label-columns); optional: patient_id, split.")
    rel = df["path"].astype(str)
    files, absent = resolve_files(path.parent, rel.tolist())  # one file, one spelling ('./a.png', 'b/../a.png', a link)
    if len(absent):
        _absent_error([int(i) for i in absent], lambda i: path.parent / rel.iloc[i], f"'{path}'", "data row",
                      "paths are relative to the manifest's folder. Fix the paths or remove those rows.")
    _refuse_repeats(files, rel, path)
    notes = []
    if label_column in df and not label_columns:
        df[label_column] = _unlist(df[label_column], notes)
    multilabel = bool(label_columns) or task == "multilabel" or no_finding is not None or (
        label_column in df and _any_piped(df[label_column]))
    if label_columns:
        y, names = multilabel_from_matrix(df[list(label_columns)].to_numpy(), label_names or list(label_columns),
                                          f"--label-columns ({','.join(label_columns)}) of '{path}'")
    elif multilabel:
        y, names = multilabel_from_text(df[label_column], label_names, no_finding, f"'{path}'")
    else:
        y, names = labels_from_values(df[label_column], label_names, f"'{path}'")
    table = pd.DataFrame({"sample_id": [sample_id(p) for p in rel], "path": files, "label": y})
    if "patient_id" in df:
        table["patient_id"] = _hashed_patients(df["patient_id"])
    if "split" in df:
        table["split"] = check_split_values(df["split"], f"manifest '{path}'").to_numpy()
    used = {"path", label_column, "patient_id", "split", "sample_id", *(label_columns or ())}
    for col in df.columns:
        if col not in used and col not in table:
            table[col] = df[col].to_numpy()  # extra columns: --split-by COLUMN, subgroups
    return Manifest(table, names, f"table:{path}", notes=notes, multilabel=multilabel)


def _refuse_repeats(files: list[str], rel: pd.Series, path: Path) -> None:
    """One file listed in two rows (the same path, another spelling of it, or a link to it) would train twice."""
    codes = pd.factorize(pd.Series(files, dtype=object))[0]
    repeated = np.flatnonzero(pd.Series(codes).duplicated().to_numpy())
    if len(repeated):
        i = int(repeated[0])
        j = int(np.argmax(codes == codes[i]))  # the row that named the file first
        n = len(np.unique(codes[repeated]))
        how = "the same path" if rel.iloc[i] == rel.iloc[j] else "another spelling of its path, or a link to it"
        raise MedxferError(f"manifest '{path}' lists {n} file{'s' if n > 1 else ''} twice ({len(repeated)} repeated "
                           f"rows; first: data row {i + 1} names the same file as data row {j + 1}, {how}). Each file "
                           "may appear once: remove the repeated rows.")


#: a folder with at least this many listed rows is read with one scandir instead of one lstat per row
LIST_FOLDER_ROWS = 64


def resolve_files(folder: Path, rel: list[str]) -> tuple[list[str], np.ndarray]:
    """``os.path.realpath(folder / p)`` of every listed path, and the rows whose file does not exist.

    The same answers as resolving each path and calling ``Path.exists()`` on it, without a realpath and a
    stat per row: each folder is resolved once, and a file that is not a link resolves to its folder's
    real path plus its name. A folder that many rows name is listed once (``os.scandir``: names and link
    flags, no inode read per file, which is what costs when a million files are not in the cache);
    other rows take one ``lstat``. Links, odd spellings ('a.png/', '/a.png', '..') and absent files take
    the general route, row by row.
    """
    total = Counter(p.rpartition("/")[0] for p in rel)  # rows per folder
    left = dict(total)
    real_dirs: dict[str, str | None] = {}
    listings: dict[str, dict[str, bool] | None] = {}
    files: list[str] = []
    absent: list[int] = []
    for i, p in enumerate(rel):
        head, sep, name = p.rpartition("/")
        real = None
        if name not in ("", ".", "..") and (head or not sep):
            real = real_dirs.get(head, "")
            if real == "":
                real = os.path.realpath(folder / head)
                real_dirs[head] = real = real if os.path.isdir(real) else None
        if real is not None:
            full = os.path.join(real, name)
            listing = listings.get(head, False) if total[head] >= LIST_FOLDER_ROWS else None
            if listing is False:
                listing = listings[head] = _listing(real)
            left[head] -= 1
            if left[head] == 0:
                listings.pop(head, None)  # its last row: the listing is not needed any more
            if listing is not None:
                if listing.get(name) is False:  # in the folder, not a link
                    files.append(full)
                    continue
            else:
                try:
                    if not stat.S_ISLNK(os.lstat(full).st_mode):
                        files.append(full)
                        continue
                except (OSError, ValueError):
                    pass
        full = os.path.realpath(folder / p)
        files.append(full)
        if not Path(full).exists():
            absent.append(i)
    return files, np.asarray(absent, dtype=np.int64)


def _listing(real: str) -> dict[str, bool] | None:
    """name -> is a link, for every entry of a folder; None when it cannot be listed (rows then lstat)."""
    try:
        with os.scandir(real) as entries:
            return {e.name: e.is_symlink() for e in entries}
    except OSError:
        return None


def _hashed_patients(values: pd.Series) -> list:
    """:func:`hash_id` of each patient id (None where empty), each distinct text or integer hashed once."""
    memo: dict = {}
    out = []
    for v in values:
        if type(v) is str or type(v) is int:
            h = memo.get(v)
            if h is None:
                h = memo[v] = hash_id(v) if str(v).strip() else False
            out.append(h or None)
        else:
            out.append(hash_id(v) if pd.notna(v) and str(v).strip() else None)
    return out


def _any_piped(values: pd.Series) -> bool:
    """Whether any label is text holding '|' (a multi-label row), looking at each distinct value once."""
    try:
        distinct = pd.unique(values)
    except TypeError:  # values that cannot be hashed
        distinct = values
    return any(isinstance(v, str) and "|" in v for v in distinct)


def _unlist(values: pd.Series, notes: list[str]) -> pd.Series:
    """Labels stored as lists (Parquet list columns): one element is that element; several are findings
    ('a|b', a multi-label row); none is an empty cell. Said in ``notes``."""
    def is_list(v) -> bool:
        return isinstance(v, (list, tuple, np.ndarray))

    if values.dtype != object:  # lists live in object columns only
        return values
    lists = values.map(is_list)
    if not lists.any():
        return values
    sizes = values[lists].map(len)
    out = values.astype(object).map(lambda v: (v[0] if len(v) == 1 else "|".join(str(x) for x in v) if len(v)
                                               else None) if is_list(v) else v)
    notes.append(f"labels are lists: {int((sizes == 1).sum())} of one element (the class), {int((sizes > 1).sum())} "
                 f"of several (findings of a multi-label row), {int((sizes == 0).sum())} empty")
    return out


def from_dicom_folder(root: Path, labels_csv: Path, label_names: list[str] | None = None,
                      on_unlabelled: str = "error") -> Manifest:
    """A DICOM folder plus a labels CSV keyed by path, SOPInstanceUID, PatientID or StudyInstanceUID."""
    if not labels_csv.is_file():
        raise MedxferError(f"labels file '{labels_csv}' does not exist.")
    df, skipped = dicom_folder_manifest(root, labels_csv, on_unlabelled=on_unlabelled)
    y, names = labels_from_values(df["label"], label_names, f"'{labels_csv}'")
    base = root.resolve()
    rel = [Path(p).relative_to(base).as_posix() if Path(p).is_relative_to(base) else str(p) for p in df["path"]]
    table = pd.DataFrame({"sample_id": [sample_id(r) for r in rel], "path": df["path"].astype(str), "label": y})
    if "patient_id" in df:
        table["patient_id"] = df["patient_id"].astype(str)
    if "split" in df:
        table["split"] = check_split_values(df["split"], f"labels file '{labels_csv}'").to_numpy()
    m = Manifest(table, names, f"dicom:{root}")
    if skipped is not None and len(skipped):
        m.notes.append(f"skipped {len(skipped)} DICOM files without a label")
    return m


def from_arrays(images, labels, *, label_names: list[str] | None = None, splits=None, patient_ids=None) -> Manifest:
    """In-memory images (N, H, W), (N, H, W, 3) or volumes (N, D, H, W), and one label per image.

    ``splits`` (train/val/test per image) and ``patient_ids`` are optional, as in a manifest; samples are
    named ``images/<index>``."""
    images = np.asarray(images)
    y = np.asarray(labels)
    if images.ndim not in (3, 4) or y.ndim not in (1, 2) or len(y) != len(images):
        raise MedxferError(f"in-memory data: images of shape {images.shape} and labels of shape {y.shape}; give images "
                           "(N,H,W), (N,H,W,3) or (N,D,H,W) and N labels (or an (N,K) 0/1 array of findings).")
    idx, names, multilabel = _npz_labels(y, label_names, "the labels given", len(images))
    table = pd.DataFrame({"sample_id": [f"images/{i:06d}" for i in range(len(y))], "label": idx,
                          "row": np.arange(len(y))})
    if splits is not None:
        table["split"] = check_split_values(pd.Series(list(splits), dtype=object), "the splits given").to_numpy()
    if patient_ids is not None:
        table["patient_id"] = [hash_id(str(v)) for v in patient_ids]
    return Manifest(table, [str(n) for n in names], "arrays", arrays=images, multilabel=multilabel)


def _refuse_absent(listed: list[Path], files: list[Path], where: str, row: str, fix: str) -> None:
    """One line for the listed files that do not exist (the first row, how many are broken or looping links)."""
    absent = [i for i, f in enumerate(files) if not f.exists()]
    if absent:
        _absent_error(absent, listed.__getitem__, where, row, fix)


def _absent_error(absent: list[int], listed, where: str, row: str, fix: str) -> None:
    """The error for ``absent`` rows; ``listed(i)`` is row i's path as listed (to count broken links)."""
    links = sum(listed(i).is_symlink() for i in absent)
    raise MedxferError(f"{len(absent)} files listed in {where} do not exist (first: {row} {absent[0] + 1}"
                       f"{f'; {links} of them broken or looping links' if links else ''}); {fix}")


def from_frame(df: pd.DataFrame, label_names: list[str] | None = None, root: str | Path = ".", **kw) -> Manifest:
    """A DataFrame like a CSV manifest (path, label[, patient_id, split, ...]), read by the manifest rules.

    Its paths are relative to ``root``, the working directory by default (or absolute): a DataFrame has no
    folder of its own. Samples are named by the path as given (as a manifest's rows are), messages by row,
    and none names the temporary table the rules read it from. Types are kept (Parquet): patient '007'
    stays '007'; a column Arrow cannot hold (mixed types) is read as text."""
    import tempfile

    import pyarrow as pa

    if "path" not in df.columns:
        raise MedxferError(f"the DataFrame lacks a 'path' column; it has {list(df.columns)}. Needed: path,label "
                           "(or --label-columns); optional: patient_id, split.")
    given = [os.fsdecode(p) if isinstance(p, (bytes, os.PathLike)) else str(p) for p in df["path"]]
    listed = [Path(root) / p for p in given]
    _refuse_absent(listed, listed, "the DataFrame", "row", "its paths are relative to the working directory, or "
                   "absolute. Fix the paths (or chdir) or remove those rows.")
    odd = [i for i, p in enumerate(given) if any("\ud800" <= c <= "\udfff" for c in p)]  # bytes kept as surrogates
    if odd:
        raise MedxferError(f"{len(odd)} paths in the DataFrame are not valid UTF-8 text (first: row {odd[0] + 1}). Give "
                           "such files as a folder (medxfer reads any file name there) or rename them.")
    frame = df.copy()
    frame["path"] = [os.path.abspath(f) for f in listed]
    for col in frame.columns:
        try:
            pa.array(frame[col], from_pandas=True)
        except (pa.ArrowException, TypeError, ValueError):  # mixed types: as text (missing values stay missing)
            frame[col] = frame[col].map(lambda v: v if v is None or v is pd.NA or v != v else str(v)).astype(object)
    with tempfile.TemporaryDirectory() as tmp:  # one reader for files and frames: the manifest rules apply as they are
        table = Path(tmp) / "manifest.parquet"
        frame.to_parquet(table, index=False)
        try:
            m = from_table(table, label_names, **kw)
        except MedxferError as e:  # messages name the DataFrame, never the temporary table
            text = str(e).replace(f"manifest '{table}'", "the DataFrame").replace(f"'{table}'", "the DataFrame")
            raise MedxferError(text.replace(str(table), "the DataFrame")) from None
    m.table["sample_id"] = [sample_id(p) for p in given]  # the path as given, as a manifest's rows are named
    m.origin = "dataframe"
    return m
