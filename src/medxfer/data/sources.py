"""Build a :class:`Manifest` from what the user has: npz, class folders, CSV/Parquet, DICOM folder.

Usage::

    m = load_manifest("data/breastmnist_28.npz", label_names=["malignant", "benign"])
    m = load_manifest("images/")                 # images/<class>/*.png or images/{train,val,test}/<class>/
    m = load_manifest("labels.csv")              # columns path,label[,patient_id][,split]
    m = load_manifest("dicoms/", labels_csv="labels.csv")   # DICOM folder + labels keyed by path/UID
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medxfer.data.manifest import SPLITS, Manifest, labels_from_values
from medxfer.errors import MedxferError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".nii", ".nii.gz", ".npy"}
IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}


def suffix_of(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def load_manifest(path: str | Path, *, label_names: list[str] | None = None, labels_csv: str | Path | None = None,
                  label_column: str = "label") -> Manifest:
    """Read ``path`` into a Manifest, choosing the source kind by what the path is."""
    path = Path(path)
    if not path.exists():
        raise MedxferError(f"data path '{path}' does not exist. Give an .npz file, a folder of class sub-folders, "
                           "a CSV/Parquet manifest, or a DICOM folder with --labels.")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return from_npz(path, label_names)
        if suffix in (".csv", ".parquet", ".pq"):
            return from_table(path, label_names, label_column)
        raise MedxferError(f"data file '{path}' has suffix '{suffix}': medxfer reads .npz, .csv or .parquet "
                           "manifests, or a folder.")
    if labels_csv is not None:
        return from_dicom_folder(path, Path(labels_csv), label_names)
    return from_folder(path, label_names)


def from_npz(path: Path, label_names: list[str] | None = None) -> Manifest:
    """A MedMNIST-style npz: ``{train,val,test}_images`` and ``{train,val,test}_labels``."""
    try:
        npz = np.load(path, allow_pickle=False)
        keys = set(npz.files)
    except Exception as e:  # noqa: BLE001 - corrupt archive
        raise MedxferError(f"cannot read npz '{path}' ({type(e).__name__}). Is it a NumPy .npz archive?") from e
    splits = [s for s in SPLITS if f"{s}_images" in keys and f"{s}_labels" in keys]
    if "train" not in splits:
        raise MedxferError(
            f"npz '{path}' has keys {sorted(keys)}; medxfer needs train_images and train_labels (and val_/test_ "
            "for given splits), MedMNIST layout: images (N,H,W) or (N,H,W,3), labels (N,) or (N,1)."
        )
    images, labels, split_col, ids = [], [], [], []
    for s in splits:
        x, y = npz[f"{s}_images"], npz[f"{s}_labels"]
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or len(y) != len(x):
            raise MedxferError(f"npz '{path}': {s}_labels has shape {npz[f'{s}_labels'].shape} for {len(x)} images; "
                               "expected (N,) or (N,1) single-label classes.")
        if x.ndim not in (3, 4):
            raise MedxferError(f"npz '{path}': {s}_images has shape {x.shape}; expected (N,H,W), (N,H,W,3) or (N,D,H,W).")
        images.append(x)
        labels.append(y)
        split_col += [s] * len(x)
        ids += [f"{s}/{i:06d}" for i in range(len(x))]
    arrays = np.concatenate(images)
    y_idx, names = labels_from_values(pd.Series(np.concatenate(labels)), label_names, f"'{path}'")
    if not label_names:
        names = [str(n) for n in names]
    table = pd.DataFrame({"sample_id": ids, "label": y_idx, "row": np.arange(len(arrays)), "split": split_col})
    if len(splits) < 3:
        table["split"] = None  # partial splits: make our own from all samples
    return Manifest(table, names, f"npz:{path}", arrays=arrays)


def from_folder(root: Path, label_names: list[str] | None = None) -> Manifest:
    """``root/<class>/*`` or ``root/{train,val,test}/<class>/*``; class names are folder names."""
    subdirs = {p.name for p in root.iterdir() if p.is_dir()}
    has_splits = "train" in subdirs and subdirs <= set(SPLITS)
    rows, ignored = [], []
    for split in (SPLITS if has_splits else (None,)):
        base = root / split if split else root
        if not base.is_dir():
            continue
        for class_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            for f in sorted(class_dir.rglob("*")):
                if not f.is_file() or f.name in IGNORED_NAMES or f.name.startswith("._"):
                    continue
                if suffix_of(f) in IMAGE_SUFFIXES:
                    rows.append({"path": str(f.resolve()), "label_raw": class_dir.name, "split": split,
                                 "sample_id": str(f.relative_to(root))})
                else:
                    ignored.append(str(f.relative_to(root)))
    if not rows:
        raise MedxferError(f"folder '{root}' has no images in class sub-folders (e.g. {root}/benign/001.png). "
                           f"Readable suffixes: {', '.join(sorted(IMAGE_SUFFIXES))}.")
    table = pd.DataFrame(rows)
    y, names = labels_from_values(table.pop("label_raw"), label_names, f"'{root}'")
    table["label"] = y
    m = Manifest(table, names, f"folder:{root}")
    if ignored:
        m.notes.append(f"ignored {len(ignored)} files that are not images (first: {ignored[0]})")
    return m


def from_table(path: Path, label_names: list[str] | None = None, label_column: str = "label") -> Manifest:
    """A CSV/Parquet with ``path,label`` and optional ``patient_id``, ``split`` (paths relative to it)."""
    try:
        df = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_csv(path)
    except Exception as e:  # noqa: BLE001
        raise MedxferError(f"cannot read manifest '{path}' ({type(e).__name__}: {str(e)[:120]}).") from e
    missing_cols = [c for c in ("path", label_column) if c not in df.columns]
    if missing_cols:
        raise MedxferError(f"manifest '{path}' lacks column(s) {missing_cols}; it has {list(df.columns)}. "
                           f"Needed: path,{label_column}; optional: patient_id, split.")
    files = [(path.parent / p).resolve() for p in df["path"].astype(str)]
    absent = [str(p) for p, f in zip(df["path"], files) if not f.exists()]
    if absent:
        raise MedxferError(f"{len(absent)} files listed in '{path}' do not exist (first: '{absent[0]}'); paths are "
                           "relative to the manifest's folder. Fix the paths or remove those rows.")
    y, names = labels_from_values(df[label_column], label_names, f"'{path}'")
    table = pd.DataFrame({"sample_id": df["path"].astype(str), "path": [str(f) for f in files], "label": y})
    if "patient_id" in df:
        from medxfer.data.privacy import hash_id

        table["patient_id"] = [hash_id(v) for v in df["patient_id"].astype(str)]  # never kept in clear
    if "split" in df:
        bad = sorted(set(df["split"].dropna().astype(str)) - set(SPLITS))
        if bad:
            raise MedxferError(f"manifest '{path}': split values {bad} are not allowed; use train, val or test.")
        table["split"] = df["split"].where(df["split"].notna(), None)
    if table["sample_id"].duplicated().any():
        dup = table["sample_id"][table["sample_id"].duplicated()].iloc[0]
        raise MedxferError(f"manifest '{path}' lists '{dup}' more than once; each file may appear once.")
    return Manifest(table, names, f"table:{path}")


def from_dicom_folder(root: Path, labels_csv: Path, label_names: list[str] | None = None,
                      on_unlabelled: str = "error") -> Manifest:
    """A DICOM folder plus a labels CSV keyed by path, SOPInstanceUID, PatientID or StudyInstanceUID."""
    from medxfer.data.dicom import dicom_folder_manifest

    if not labels_csv.is_file():
        raise MedxferError(f"labels file '{labels_csv}' does not exist.")
    df, skipped = dicom_folder_manifest(root, labels_csv, on_unlabelled=on_unlabelled)
    y, names = labels_from_values(df["label"], label_names, f"'{labels_csv}'")
    table = pd.DataFrame({"sample_id": [str(Path(p).relative_to(root.resolve())) if Path(p).is_relative_to(root.resolve())
                                        else str(p) for p in df["path"]],
                          "path": df["path"].astype(str), "label": y})
    if "patient_id" in df:
        table["patient_id"] = df["patient_id"].astype(str)
    if "split" in df:
        table["split"] = df["split"]
    m = Manifest(table, names, f"dicom:{root}")
    if skipped is not None and len(skipped):
        m.notes.append(f"skipped {len(skipped)} DICOM files without a label")
    return m
