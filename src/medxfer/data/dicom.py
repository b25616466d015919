"""DICOM: read pixels into [0, 1] and build a manifest from a folder of DICOM files.

Usage::

    from medxfer.data.dicom import dicom_folder_manifest, read_dicom
    from medxfer.data.readers import ReadOptions

    x = read_dicom("scans/0042.dcm", ReadOptions(window="lung"))   # (C, H, W) float32 in [0, 1]
    df, skipped = dicom_folder_manifest(Path("scans"), Path("labels.csv"))
    df, skipped = dicom_folder_manifest(Path("scans"), Path("labels.csv"), on_unlabelled="skip")

Privacy: header values (PatientName, PatientID, dates, UIDs) never appear in errors, warnings or
the returned tables: errors name the file path; patient IDs are hashed with
:func:`medxfer.privacy.hash_id`.
"""

from __future__ import annotations

import difflib
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from medxfer.data.folders import walk
from medxfer.data.intensity import MAX_VOXELS, check_pixels, parse_window, select_frame, to_unit_range
from medxfer.errors import BadFileError, MedxferError, did_you_mean
from medxfer.privacy import hash_id, sample_id

__all__ = ["dicom_folder_manifest", "has_dicom_preamble", "read_dicom"]

log = logging.getLogger(__name__)

# Transfer syntax UID prefix -> (name, pip packages) for compressed DICOM.
_CODECS = {
    "1.2.840.10008.1.2.4.9": ("JPEG 2000", "pylibjpeg pylibjpeg-openjpeg"),
    "1.2.840.10008.1.2.4.20": ("HTJ2K", "pylibjpeg pylibjpeg-openjpeg"),
    "1.2.840.10008.1.2.4.8": ("JPEG-LS", "pylibjpeg pylibjpeg-libjpeg"),
    "1.2.840.10008.1.2.4.": ("JPEG", "pylibjpeg pylibjpeg-libjpeg"),
}
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_HEADER_TAGS = ["SOPInstanceUID", "StudyInstanceUID", "PatientID", "MediaStorageSOPClassUID"]
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


def _codec_hint(ts_uid: str) -> str:
    for prefix, (name, packages) in _CODECS.items():
        if ts_uid.startswith(prefix):
            return f"{name} DICOM needs {packages.split()[-1]}: pip install {packages}"
    return f"no decoder available for transfer syntax {ts_uid or '(unknown)'}"


def _import_pydicom():
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401  (pydicom >= 3)
    except ImportError:
        raise MedxferError("reading DICOM needs pydicom>=3: pip install 'pydicom>=3'") from None
    return pydicom


def has_dicom_preamble(path: str | Path) -> bool:
    """True when the file carries the 128-byte preamble followed by ``DICM``."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


# long (68 lines, 20 of docstring): the steps of PS3.4 grey-scale rendering, in order, read best in one piece
def read_dicom(path: str | Path, opts) -> np.ndarray:
    """One DICOM file -> float32 (C, H, W) in [0, 1]; ``opts`` is a ReadOptions. The steps:

    1. pick the frame of a multi-frame file (``NumberOfFrames`` > 1) per ``opts.frame``;
    2. grey images: Modality LUT / Rescale Slope+Intercept (``pydicom.pixels.apply_modality_lut``),
       so CT is in HU;
    3. ``window="auto"``: the VOI LUT Sequence when present (scaled by the LUT's output range),
       else the first WindowCenter/WindowWidth (VOILUTFunction LINEAR, LINEAR_EXACT or SIGMOID)
       mapped to [0, 1] by the window bounds; a preset or 'C,W' replaces the header window;
       without a window: the intensity rule (8-bit /255, else min-max or percentiles);
    4. MONOCHROME1 is inverted after windowing (``1 - x``).

    RGB and YBR (converted to RGB by pydicom) give 3 channels; PALETTE COLOR is expanded to RGB.
    """
    path = Path(path)
    pydicom = _import_pydicom()
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warnings can quote header values
            ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise BadFileError(path, "not a valid DICOM file") from None
    except Exception:  # pydicom raises many types for corrupt or truncated headers
        raise BadFileError(path, "corrupt or truncated DICOM file") from None
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise BadFileError(path, "DICOM without pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        n_frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    except (AttributeError, TypeError, ValueError):
        raise BadFileError(path, "DICOM header lacks valid Rows/Columns") from None
    check_pixels(path, rows, cols)
    index = select_frame(n_frames, opts.frame, path) if n_frames > 1 else None
    arr = _decode(path, ds, index)

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        scale = 255.0 if rgb.dtype == np.uint8 else 65535.0
        return np.moveaxis(rgb.astype(np.float32) / np.float32(scale), -1, 0)
    if samples > 1 or arr.ndim == 3:
        return to_unit_range(np.moveaxis(arr[..., :3], -1, 0), opts)
    if arr.ndim != 2:
        raise BadFileError(path, f"unexpected DICOM pixel array shape {arr.shape}")

    try:
        if _has_rescale(ds):
            arr = apply_modality_lut(arr, ds)
        lut_range, dicom_window = None, None
        if parse_window(opts.window) == "auto":
            if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
                arr, lut_range = _voi_lut_sequence(arr, ds)
            else:
                dicom_window = _header_window(ds)
    except (AttributeError, ValueError, TypeError, IndexError, KeyError):
        raise BadFileError(path, "invalid Modality LUT or VOI LUT in the DICOM header") from None
    if lut_range is not None:
        low, high = lut_range
        out = np.clip((arr - low) / max(high - low, 1e-12), 0.0, 1.0).astype(np.float32)
    else:
        out = to_unit_range(arr, opts, dicom_window=dicom_window)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out[None]


def _decode(path: Path, ds, index: int | None) -> np.ndarray:
    meta = getattr(ds, "file_meta", None)
    ts_uid = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if index is None:
                arr = ds.pixel_array
            else:
                from pydicom.pixels import pixel_array

                arr = pixel_array(ds, index=index)
    except Exception:  # corrupt pixel data surfaces as many exception types: find the real cause
        raise BadFileError(path, _decode_failure(ts_uid)) from None
    if index is None and int(ds.get("NumberOfFrames") or 1) > 1:
        arr = arr[0]
    return arr


def _decode_failure(ts_uid: str) -> str:
    """Why decoding failed: no decoder exists for this transfer syntax (video, ...), its codec package is
    not installed, or the data is corrupt (a decoder was there and could not read it)."""
    try:
        from pydicom.pixels import get_decoder
        from pydicom.uid import UID

        name = UID(ts_uid).name if ts_uid else "unknown transfer syntax"
        decoder = get_decoder(ts_uid)
    except NotImplementedError:
        return (f"unsupported DICOM transfer syntax '{name}': no decoder exists for it (video and other encodings "
                "are not images medxfer reads); export the frames as images")
    except Exception:  # noqa: BLE001 - an invalid or missing UID
        return f"corrupt or truncated DICOM pixel data (transfer syntax {ts_uid or 'missing'})"
    if not decoder.is_available:
        return _codec_hint(ts_uid)
    compressed = ts_uid not in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
    return f"corrupt or truncated {'compressed ' if compressed else ''}DICOM pixel data ({name})"


def _voi_lut_sequence(arr: np.ndarray, ds):
    from pydicom.pixels import apply_voi_lut

    lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64).ravel()
    out = apply_voi_lut(arr, ds, index=0, prefer_lut=True)
    return out.astype(np.float64), (float(lut.min()), float(lut.max()))


def _has_rescale(ds) -> bool:
    if "ModalityLUTSequence" in ds:
        return True
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    return (slope is not None and float(slope) != 1.0) or (
        intercept is not None and float(intercept) != 0.0
    )


def _first(value) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return float(value[0]) if len(value) else None
    return float(value)


def _header_window(ds):
    """(center, width, VOILUTFunction) of the first header window, or None."""
    try:
        center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    except (ValueError, TypeError):
        return None
    if center is None or width is None or not width > 0:
        return None
    return center, width, str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()


# ----------------------------------------------------------------------------- folder manifest

_KEYS = ("path", "SOPInstanceUID", "StudyInstanceUID", "PatientID")


def _find_dicom_files(folder: Path) -> list[Path]:
    """The DICOM files under ``folder``, walked as class folders are (:func:`medxfer.data.folders.walk`: hidden,
    system and medxfer output folders left out, links followed), what is left out said in the log. A broken
    link named ``.dcm`` is kept (the bad-file policy decides); one without the suffix is counted. Folder by
    folder, files first, in name order (the order ``os.walk`` gave: a split made from it does not move)."""
    found = walk(folder)
    named = {p for p in found.broken if p.suffix.lower() in (".dcm", ".dicom")}
    files = [p for p in found.files if not p.name.startswith(".")
             and (p.suffix.lower() in (".dcm", ".dicom") or has_dicom_preamble(p))]
    said = [f"{n} {why}" for why, n in sorted(found.left_out.items())]
    if found.left_out:
        log.info("DICOM folder: left out %d folders (%s)", sum(found.left_out.values()), ", ".join(said))
    if found.broken:
        log.warning("DICOM folder: %d broken links (target gone, or a loop): %d named .dcm kept as unreadable "
                    "samples (--on-bad-file decides), %d ignored", len(found.broken), len(named),
                    len(found.broken) - len(named))
    return sorted([*files, *named], key=lambda p: _walk_order(p.relative_to(folder).parts))


def _walk_order(parts: tuple[str, ...]) -> list:
    return [(1, d) for d in parts[:-1]] + [(0, parts[-1])]


def _read_header(path: Path, pydicom) -> dict | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except Exception:  # unreadable header: reported by file path only
        return None
    sop_class = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", ""))
    return {
        "SOPInstanceUID": str(ds.get("SOPInstanceUID", "") or "").strip(),
        "StudyInstanceUID": str(ds.get("StudyInstanceUID", "") or "").strip(),
        "PatientID": str(ds.get("PatientID", "") or "").strip(),
        "dicomdir": sop_class == _DICOMDIR_SOP_CLASS,
    }


def _norm_rel(value: str) -> str:
    return Path(os.path.normpath(str(value).strip())).as_posix()


def _load_labels(labels_csv: Path, label_key: str):
    import pandas as pd

    try:
        table = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise MedxferError(f"cannot read labels file '{labels_csv}' ({type(err).__name__}).") from None
    if "label" not in table.columns:
        close = difflib.get_close_matches("label", list(table.columns), n=1, cutoff=0.5)
        hint = f" If '{close[0]}' holds the labels, rename it to 'label'." if close else ""
        raise MedxferError(
            f"labels file '{labels_csv}' has no 'label' column (columns: {', '.join(table.columns)})."
            + hint
        )
    if label_key == "auto":
        present = [k for k in _KEYS if k in table.columns]
        if not present:
            raise MedxferError(
                f"labels file '{labels_csv}' needs a key column, one of {', '.join(_KEYS)}; "
                f"it has {', '.join(table.columns)}."
            )
        label_key = present[0]
    elif label_key not in _KEYS:
        raise MedxferError(f"The 'label_key' parameter must be 'auto' or one of {', '.join(_KEYS)}. "
                           f"Got {label_key!r} instead.{did_you_mean(label_key, _KEYS)}")
    elif label_key not in table.columns:
        raise MedxferError(f"labels file '{labels_csv}' has no '{label_key}' column."
                           f"{did_you_mean(label_key, table.columns)}")
    table = table.copy()
    table["_key"] = table[label_key].map(_norm_rel if label_key == "path" else str.strip)
    table = table[table["_key"] != ""]
    per_key = table.groupby("_key")["label"].nunique()
    conflicting = per_key[per_key > 1]
    if len(conflicting):
        rows = [str(i + 2) for i in table.index[table["_key"].isin(conflicting.index)][:3]]
        raise MedxferError(
            f"labels file '{labels_csv}': {len(conflicting)} {label_key} values have more than one "
            f"label (CSV lines {', '.join(rows)}, ...). Give each {label_key} one label."
        )
    return table.drop_duplicates("_key").set_index("_key"), label_key


# long (76 lines, 20 of docstring): one pass over the folder that labels, hashes and skips; split, it would pass state around
def dicom_folder_manifest(folder: Path, labels_csv: Path | None, *, label_key: str = "auto",
                          on_unlabelled: str = "error", salt: str | None = None):
    """Label every DICOM file under ``folder`` -> ``(df, skipped_df)``.

    Files: ``.dcm``/``.dicom``, or any name with the ``DICM`` preamble (DICOMDIR files and hidden
    files are ignored); only headers are read. ``labels_csv`` has a ``label`` column, a key column
    (``label_key='auto'`` takes the first present of ``path`` (relative to ``folder``),
    ``SOPInstanceUID``, ``StudyInstanceUID``, ``PatientID``), and optionally ``split`` and
    ``patient_id``. ``labels_csv=None``: the label is the first sub-folder name
    (``folder/<label>/...``).

    ``df`` columns: ``path`` (absolute), ``label``, ``patient_id`` (hashed with ``salt``: the
    CSV's ``patient_id``, else the header PatientID; None when neither is there), ``split`` (when
    the CSV has one). ``skipped_df`` columns ``file, reason``: files without a label or with an
    unreadable header; empty unless ``on_unlabelled='skip'`` (``'error'`` raises MedxferError
    naming the count and the first 3 files).
    """
    import pandas as pd

    if on_unlabelled not in ("error", "skip"):
        raise MedxferError("The 'on_unlabelled' parameter must be 'error' or 'skip'. "
                           f"Got {on_unlabelled!r} instead.")
    folder = Path(folder)
    if not folder.is_dir():
        raise MedxferError(f"DICOM folder '{folder}' does not exist or is not a folder.")
    pydicom = _import_pydicom()
    root = folder.resolve()
    labels, key = _load_labels(Path(labels_csv), label_key) if labels_csv is not None else (None, None)
    need_header = key != "path"

    rows, skipped, used = [], [], set()
    for file in _find_dicom_files(root):
        rel = file.relative_to(root).as_posix()
        header = _read_header(file, pydicom)
        if header is not None and header["dicomdir"]:
            continue
        if header is None and (need_header or file.suffix.lower() not in (".dcm", ".dicom")):
            skipped.append((rel, "unreadable DICOM header"))
            continue
        if labels is None:
            parts = rel.split("/")
            match = {"label": parts[0]} if len(parts) > 1 else None
        else:
            value = rel if key == "path" else header[key]
            match = labels.loc[value] if value and value in labels.index else None
            used.add(value)
        if match is None:
            where = "the labels file" if labels is not None else "a sub-folder name"
            skipped.append((rel, f"no label in {where}"))
            continue
        csv_patient = str(match.get("patient_id", "") or "").strip() if labels is not None else ""
        raw_patient = csv_patient or (header["PatientID"] if header else "")
        row = {"path": str(file), "label": str(match["label"]),
               "patient_id": hash_id(raw_patient, salt) if raw_patient else None}
        if labels is not None and "split" in labels.columns:
            row["split"] = str(match["split"]).strip() or None
        rows.append(row)

    if labels is not None:
        unused = [k for k in labels.index if k not in used]
        if unused:  # keys are paths or UIDs: counted, not shown
            warnings.warn(f"{len(unused)} rows of labels file '{labels_csv}' match no DICOM file "
                          f"under '{folder}'.", stacklevel=2)
    skipped_df = pd.DataFrame(skipped, columns=["file", "reason"])
    if skipped and on_unlabelled == "error":
        first = ", ".join(f"{sample_id(f)} ({r})" for f, r in skipped[:3])
        how = ("add rows for them to the labels file" if labels_csv is not None
               else "put them in a sub-folder named after their label")
        raise MedxferError(
            f"{len(skipped)} DICOM files under '{folder}' have no label (first: {first}). "
            f"Fix: {how}, or pass --on-unlabelled skip to list them in skipped.csv and go on."
        )
    if not rows:
        raise MedxferError(f"no labelled DICOM file found under '{folder}'.")
    columns = ["path", "label", "patient_id"] + (["split"] if rows and "split" in rows[0] else [])
    return pd.DataFrame(rows, columns=columns), skipped_df


# ---------------------------------------------------------------------------------------- series
def series_files(folder: Path) -> list[Path]:
    """The DICOM files directly in ``folder`` (by suffix or preamble; DICOMDIR and hidden files ignored)."""
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".") and f.name != "DICOMDIR"
                  and (f.suffix.lower() in (".dcm", ".dicom") or has_dicom_preamble(f)))


def read_dicom_series(folder: str | Path, opts) -> np.ndarray:
    """A folder holding one DICOM series -> float32 (1, D, H, W) in [0, 1] (a 3-D sample).

    Slices are sorted by their position along the slice normal (ImagePositionPatient projected on
    the cross product of ImageOrientationPatient's row and column directions), else by InstanceNumber;
    each slice gets its Modality LUT (CT in HU); the window (``opts.window``; 'auto': the first
    slice's header window) or the intensity rule then applies to the whole volume, so slices keep
    their relative intensities. MONOCHROME1 is inverted. One series per folder: a folder mixing series
    or slice sizes is refused."""
    folder = Path(folder)
    pydicom = _import_pydicom()
    from pydicom.pixels import apply_modality_lut

    files = series_files(folder)
    if not files:
        raise BadFileError(folder, "no DICOM files in this series folder")
    heads = []
    for f in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                heads.append(pydicom.dcmread(f, stop_before_pixels=True))
        except Exception:  # noqa: BLE001 - pydicom raises many types for corrupt headers
            raise BadFileError(f, "corrupt or truncated DICOM file") from None
    if len({str(h.get("SeriesInstanceUID", "")) for h in heads}) > 1:
        raise BadFileError(folder, "the folder holds slices of more than one series; give one series per folder")
    try:
        sizes = {(int(h.Rows), int(h.Columns)) for h in heads}
    except (AttributeError, TypeError, ValueError):
        raise BadFileError(folder, "a slice's header lacks valid Rows/Columns") from None
    if len(sizes) > 1:
        raise BadFileError(folder, f"slices of different sizes {sorted(sizes)} in one series")
    (rows, cols), = sizes
    check_pixels(folder, len(files), rows, cols, limit=MAX_VOXELS)
    order = np.argsort(_slice_positions(heads), kind="stable")
    slices, first = [], None
    for i in order:
        ds = pydicom.dcmread(files[i])
        arr = _decode(files[i], ds, None).astype(np.float32)
        if arr.ndim != 2:
            raise BadFileError(files[i], f"a series slice must be one grey frame; got shape {arr.shape}")
        slices.append(apply_modality_lut(arr, ds).astype(np.float32) if _has_rescale(ds) else arr)
        first = first or ds
    vol = np.stack(slices)
    window = _header_window(first) if parse_window(opts.window) == "auto" else None
    out = to_unit_range(vol, opts, dicom_window=window)
    if str(first.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        out = 1.0 - out
    return out[None]


def _slice_positions(heads) -> np.ndarray:
    try:
        row, col = (np.asarray(v, float) for v in np.reshape(np.asarray(heads[0].ImageOrientationPatient, float), (2, 3)))
        normal = np.cross(row, col)
        return np.array([float(np.dot(np.asarray(h.ImagePositionPatient, float), normal)) for h in heads])
    except (AttributeError, TypeError, ValueError):
        return np.array([float(h.get("InstanceNumber") or i) for i, h in enumerate(heads)])
