"""Read any supported image file into a float32 array (C, H, W) with values in [0, 1].

Usage::

    from medxfer.data.readers import ReadOptions, read_image

    x = read_image("scans/0042.dcm")                          # DICOM window, else min-max
    x = read_image("ct.nii.gz", ReadOptions(window="lung", slice="mip"))
    x = read_image("xray16.png", ReadOptions(intensity="p0.5-p99.5"))

The reader is chosen by suffix behind one base class (:class:`Reader`):

* PIL: ``.png .jpg .jpeg .tif .tiff .bmp``. 8-bit images are divided by 255. 16-bit greyscale
  (modes ``I;16``/``I``/``F``) keeps its full range until the intensity step: no 8-bit cast.
  ``1``/``L``/``LA`` become one grey channel (alpha dropped); ``RGB``/``RGBA``/``CMYK``/``YCbCr``
  become three RGB channels (alpha dropped); palette (``P``/``PA``) images are expanded to RGB and
  kept as one grey channel when the palette is grey. EXIF orientation is applied. Multi-page
  TIFF/GIF: the page is picked by ``frame``.
* DICOM (pydicom): ``.dcm .dicom`` and files without a suffix that carry the ``DICM`` preamble;
  see :class:`DicomReader` for the order of rescale, window and MONOCHROME1 inversion.
* NIfTI (nibabel): ``.nii .nii.gz``; see :class:`NiftiReader` for the orientation used.
* NumPy: ``.npy`` holding (H, W), (H, W, 3), (C, H, W) with C in {1, 3}, or a (D, H, W) volume.

Every failure to read a file raises :class:`~medxfer.errors.BadFileError` naming the file and a
reason (never a header value: identifiers stay out of errors).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medxfer.data.cache import os_reason
from medxfer.data.dicom import has_dicom_preamble, read_dicom, read_dicom_series
from medxfer.data.intensity import (
    MAX_PIXELS,
    MAX_VOXELS,
    BadPixels,
    check_pixels,
    parse_frame,
    parse_input_dtype,
    parse_intensity,
    parse_slice,
    parse_window,
    select_frame,
    to_unit_range,
    volume_to_2d,
)
from medxfer.errors import BadFileError, MedxferError

__all__ = [
    "MAX_PIXELS",
    "ReadOptions",
    "Reader",
    "read_image",
    "reader_for",
    "supported_suffixes",
    "to_unit_range",
    "volume_to_2d",
]


@dataclass(frozen=True)
class ReadOptions:
    """How a file becomes an image in [0, 1]; every field is a plain string (config.yaml friendly).

    ``window``: ``"auto"`` (the DICOM VOI LUT or WindowCenter/Width when present, else the
    intensity rule), ``"none"``, ``"C,W"`` such as ``"40,400"``, or a CT preset (applied to HU
    after the DICOM rescale): ``"lung"`` (-600,1500), ``"soft-tissue"`` (40,400), ``"bone"``
    (400,1800), ``"brain"`` (40,80), ``"mediastinum"`` (50,350).
    ``frame``: multi-frame DICOM, multi-page TIFF or 4D NIfTI: ``"middle"`` or an index ``"3"``.
    ``slice``: volumes: ``"middle"``, ``"index N"``, ``"mip"`` or ``"orthogonal"`` (three
    mid-planes as 3 channels).
    ``intensity``: used when no window applies: ``"auto"`` (8-bit /255, otherwise min-max),
    ``"minmax"`` or percentile clipping ``"p0.5-p99.5"``.
    ``input_dtype``: the pixel types a run was trained on (``model.json``), which fix how ``"auto"``
    scales its inputs and which it refuses (:mod:`medxfer.data.intensity`); ``""`` when training.

    Invalid values raise :class:`~medxfer.errors.MedxferError` when the options are built.
    """

    window: str = "auto"
    frame: str = "middle"
    slice: str = "middle"
    intensity: str = "auto"
    input_dtype: str = ""

    def __post_init__(self):
        parse_window(self.window)
        parse_frame(self.frame)
        parse_slice(self.slice)
        parse_intensity(self.intensity)
        parse_input_dtype(self.input_dtype)

    def key(self) -> dict:
        """The fields as a dict, for cache keys and config.yaml (``input_dtype`` only when set)."""
        return {k: v for k, v in asdict(self).items() if k != "input_dtype" or v}

    @classmethod
    def of_run(cls, meta) -> ReadOptions:
        """A trained run's options (``ModelMeta``): its reader options and its input contract."""
        return cls(**{**(meta.read or {}), "input_dtype": meta.input_dtype or ""})


def read_image(path: str | Path, opts: ReadOptions = ReadOptions(), size: int | None = None) -> np.ndarray:
    """Read any supported file -> float32 array (C, H, W), C in {1, 3}, values in [0, 1].

    ``size``: the side the image will be resized to. Images at least 4x larger are reduced while
    decoding where the format allows (JPEG ``draft``, PIL ``reduce``: box averages down to at least
    twice ``size``), so large photos cost little memory; every caller with the same ``size`` (train,
    predict, export, serve) gets the same array.

    Raises BadFileError for a missing, empty, corrupt, truncated or unsupported file, a DICOM
    without pixel data, a missing decompression codec (the reason names the pip package), images
    above :data:`MAX_PIXELS` pixels or with a side of 0 (checked from the header, before decoding),
    images with NaN or infinite pixels, and pixels the run's input contract refuses
    (``opts.input_dtype``: a 16-bit file to a model trained on 8-bit images).
    """
    path = Path(path)
    try:
        if path.is_dir() and parse_slice(opts.slice) == "volume":   # a folder of DICOM slices: one 3-D sample
            return np.ascontiguousarray(np.clip(read_dicom_series(path, opts), 0.0, 1.0))
        if not path.is_file():
            raise BadFileError(path, _missing(path))
        if path.stat().st_size == 0:
            raise BadFileError(path, "empty file")
        reader = reader_for(path)
        arr = reader.read(path, opts) if size is None or not isinstance(reader, PILReader) else \
            reader.read(path, opts, size=size)
    except BadPixels as e:
        raise BadFileError(path, str(e)) from None
    want = 4 if parse_slice(opts.slice) == "volume" else 3   # (C, D, H, W) for a 3-D model, else (C, H, W)
    if arr.ndim == 3 and want == 4:
        raise BadFileError(path, "a 2-D image, where this 3-D model takes volumes (NIfTI, or npz (N,D,H,W))")
    if arr.ndim != want or arr.shape[0] not in (1, 3) or min(arr.shape[1:]) < 1:
        raise BadFileError(path, f"unexpected image shape {tuple(arr.shape)}")
    return np.ascontiguousarray(np.clip(arr.astype(np.float32, copy=False), 0.0, 1.0))


class Reader:
    """Base class: ``suffixes`` it claims and ``read(path, opts) -> (C, H, W) float32 in [0, 1]``."""

    suffixes: tuple[str, ...] = ()

    def read(self, path: Path, opts: ReadOptions) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


def _grey_or_rgb(arr: np.ndarray) -> np.ndarray:
    """(H, W) -> (1, H, W); (H, W, 3) -> (3, H, W)."""
    if arr.ndim == 2:
        return arr[None]
    return np.moveaxis(arr[..., :3], -1, 0)


class PILReader(Reader):
    """PNG, JPEG, TIFF, BMP through Pillow (see the module docstring for modes)."""

    suffixes = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

    def read(self, path: Path, opts: ReadOptions, size: int | None = None) -> np.ndarray:
        from PIL import Image, ImageOps, UnidentifiedImageError

        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        bomb = (Image.DecompressionBombError, Image.DecompressionBombWarning)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    check_pixels(path, img.height, img.width)
                    n_frames = getattr(img, "n_frames", 1)
                    if n_frames > 1:
                        img.seek(select_frame(n_frames, opts.frame, path))
                    factor = _reduce_factor(img.size, size)
                    if factor > 1 and img.format == "JPEG":
                        img.draft(img.mode, (img.width // factor, img.height // factor))
                    img.load()
                    factor = _reduce_factor(img.size, size)  # draft may have done part of it
                    if factor > 1 and img.mode.startswith("I;16"):
                        img = img.convert("I")  # 16-bit: reduce works on 32-bit integers, full range kept
                    if factor > 1 and img.mode in ("L", "RGB", "RGBA", "I", "F"):
                        img = img.reduce(factor)
                    img = ImageOps.exif_transpose(img)
                    arr = self._to_array(img)
        except BadFileError:
            raise
        except bomb:
            raise BadFileError(path, f"image is above the limit of {MAX_PIXELS} pixels (possible decompression "
                               "bomb; set MEDXFER_MAX_PIXELS to allow larger images)") from None
        except UnidentifiedImageError:
            raise BadFileError(path, "not a readable image (corrupt or wrong suffix)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise BadFileError(path, f"corrupt or truncated image: {err}") from None
        return to_unit_range(_grey_or_rgb(arr), opts)

    @classmethod
    def from_image(cls, img, opts: ReadOptions) -> np.ndarray:
        """An in-memory PIL image through the same steps as a file: (C, H, W) float32 in [0, 1]."""
        from PIL import ImageOps

        check_pixels("<image>", img.height, img.width)
        return to_unit_range(_grey_or_rgb(cls._to_array(ImageOps.exif_transpose(img))), opts)

    @staticmethod
    def _to_array(img) -> np.ndarray:
        mode = img.mode
        if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
            return np.asarray(img).astype(np.uint16)
        if mode in ("I", "F", "L"):
            return np.asarray(img)
        if mode in ("1", "LA", "La"):
            return np.asarray(img.convert("L"))
        if mode in ("P", "PA"):
            rgb = np.asarray(img.convert("RGB"))
            same = (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
            return rgb[..., 0] if same else rgb
        return np.asarray(img.convert("RGB"))


def _reduce_factor(wh: tuple[int, int], size: int | None) -> int:
    """Integer reduction keeping at least twice ``size`` on the short side (1: none)."""
    if not size:
        return 1
    factor = min(wh) // (2 * int(size))
    return factor if factor >= 2 else 1


class DicomReader(Reader):
    """DICOM through pydicom: see :func:`medxfer.data.dicom.read_dicom` for the steps."""

    suffixes = (".dcm", ".dicom")

    def read(self, path: Path, opts: ReadOptions) -> np.ndarray:
        return read_dicom(path, opts)


class NiftiReader(Reader):
    """NIfTI (.nii, .nii.gz) through nibabel.

    The image is reoriented to the closest canonical (RAS+) orientation, then arranged as a
    (D, H, W) volume of axial slices: D = superior axis, H = anterior (anterior at the top row),
    W = the left-right axis. 4D images pick the volume per ``frame``; 2D images are one slice.
    Voxel scaling (scl_slope/scl_inter) is applied, so CT is in HU for the window presets; without
    it the stored type is kept (a uint8 volume is divided by 255, as every 8-bit image).
    """

    suffixes = (".nii", ".nii.gz")

    def read(self, path: Path, opts: ReadOptions) -> np.ndarray:
        try:
            import nibabel
        except ImportError:
            raise MedxferError("reading NIfTI needs nibabel: pip install nibabel") from None
        try:
            img = nibabel.load(str(path))
            shape = tuple(int(s) for s in img.shape)
            if len(shape) < 2 or len(shape) > 4:
                raise BadFileError(path, f"NIfTI image with {len(shape)} dimensions; expected 2-4")
            check_pixels(path, *shape[:3], limit=MAX_VOXELS)
            img = nibabel.as_closest_canonical(img)
            data = np.asanyarray(img.dataobj[..., select_frame(shape[3], opts.frame, path)] if len(shape) == 4
                                 else img.dataobj)
            if data.dtype.kind not in "biuf" or data.dtype.kind == "f" and data.dtype != np.float32:
                data = data.astype(np.float32)   # scaled voxels: float32, as before
        except BadFileError:
            raise
        except Exception as err:  # nibabel raises many types for corrupt or truncated files
            raise BadFileError(path, f"corrupt or truncated NIfTI file ({type(err).__name__})") from None
        if data.ndim == 2:
            data = data[:, :, None]
        vol = np.transpose(data, (2, 1, 0))[:, ::-1, :]
        return to_unit_range(volume_to_2d(vol, opts, path=path), opts)


class NumpyReader(Reader):
    """NumPy ``.npy`` (no pickles): (H, W), (H, W, 1|3), (1|3, H, W), or a (D, H, W) volume."""

    suffixes = (".npy",)

    def read(self, path: Path, opts: ReadOptions) -> np.ndarray:
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise BadFileError(path, f"corrupt or truncated .npy file ({type(err).__name__})") from None
        if arr.dtype.kind not in "biuf":
            raise BadFileError(path, f".npy of dtype {arr.dtype}; expected numbers")
        check_pixels(path, *arr.shape, limit=MAX_PIXELS if arr.ndim < 3 else MAX_VOXELS)
        try:
            arr = np.array(arr)
        except (ValueError, OSError) as err:
            raise BadFileError(path, f"truncated .npy file ({type(err).__name__})") from None
        if arr.ndim == 2:
            chw = arr[None]
        elif arr.ndim == 3 and arr.shape[-1] in (1, 3) and arr.shape[0] not in (1, 3):
            chw = np.moveaxis(arr, -1, 0)
        elif arr.ndim == 3 and arr.shape[0] in (1, 3):
            chw = arr
        elif arr.ndim == 3:
            chw = volume_to_2d(arr, opts, path=path)
        else:
            raise BadFileError(path, f".npy of shape {arr.shape}; expected (H,W), (H,W,C), "
                               "(C,H,W) or (D,H,W)")
        return to_unit_range(chw, opts)


_READERS: tuple[Reader, ...] = (PILReader(), DicomReader(), NiftiReader(), NumpyReader())


def supported_suffixes() -> list[str]:
    """Every suffix a reader claims (DICOM files without a suffix are also read)."""
    return [s for r in _READERS for s in r.suffixes]


def reader_for(path: str | Path) -> Reader:
    """The reader for ``path`` by suffix; DICOM by preamble when the suffix is unknown."""
    name = Path(path).name.lower()
    for reader in _READERS:
        if any(name.endswith(s) for s in reader.suffixes):
            return reader
    if has_dicom_preamble(path):
        return _READERS[1]
    suffix = "".join(Path(path).suffixes[-2:]) or "(none)"
    raise BadFileError(path, f"unsupported file type '{suffix}'; supported: "
                       f"{' '.join(supported_suffixes())} and DICOM files without a suffix")


def _missing(path: Path) -> str:
    """Why ``path`` is no file to read: a broken or looping link, a missing file, or a folder."""
    try:
        os.stat(path)
    except OSError as e:
        return os_reason(e)
    return "not a file (a folder or a device)"
