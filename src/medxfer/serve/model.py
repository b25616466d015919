"""The served model: the ONE place where ``medxfer serve`` calls medxfer's internals.

Usage::

    m = ServedModel.from_run("runs/breast", engine="onnx")    # or "torch", or "auto"
    x = m.decode("/tmp/upload.png")         # uint8 (C, S, S), the run's preprocessing; raises ApiError
    probs = m.predict(torch.stack([x]))     # (N, K) calibrated probabilities
    m.predicted(probs)                      # class indices: validation threshold (binary) or argmax
    m.conformal_sets(probs)                 # the run's conformal sets (lists of labels), or None without a record
    pngs = m.explain(torch.stack([x]), classes=m.predicted(probs))   # Grad-CAM overlays, PNG bytes
    m.info()                                # labels, input contract, test metrics, model card, model id

Everything else in :mod:`medxfer.serve` talks to this class only, so when the prediction API of
medxfer changes, this file is the one to adapt. Errors about an image come out as
:class:`~medxfer.serve.errors.ApiError` with a reason that never holds a path or a header value.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from medxfer.data.readers import supported_suffixes
from medxfer.engine.inference import physical_cores
from medxfer.errors import BadFileError, MedxferError
from medxfer.evaluation.decisions import findings
from medxfer.evaluation.gradcam import explain_images, feature_map_size, overlay
from medxfer.predict import Predictor
from medxfer.serve.errors import ApiError
from medxfer.serve.uploads import png_size
from medxfer.trust.conformal import prediction_sets

#: Decoded images above this many pixels are refused (stricter than the readers' limit): the server
#: holds several images in memory at once. 2**26 is 8192 x 8192.
SERVE_MAX_PIXELS = 2**26
#: The side of the Grad-CAM overlay PNGs (the model's input is often 28-64 px: too small to see).
OVERLAY_SIDE = 256
ENGINES = ("auto", "onnx", "torch")
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def resolve_engine(run_dir: str | Path, engine: str) -> str:
    """``auto`` -> ``onnx`` when ``RUN/model.onnx`` exists, else ``torch``; ``onnx`` needs the file."""
    run_dir = Path(run_dir)
    if engine not in ENGINES:
        raise MedxferError(f"The 'engine' parameter must be one of {list(ENGINES)}. Got '{engine}' instead.")
    has_onnx = (run_dir / "model.onnx").is_file()
    if engine == "auto":
        return "onnx" if has_onnx else "torch"
    if engine == "onnx" and not has_onnx:
        raise MedxferError(f"no ONNX model in '{run_dir}'. Make one with 'medxfer export {run_dir}' "
                           "(it checks it against PyTorch), or pass --engine torch.")
    return engine


def model_id(run) -> str:
    """The first 16 hex of the SHA-256 of the run's weights (recorded in model.json)."""
    return run.weights_digest()[:16]


class ServedModel:
    """A trained run behind a small, stable interface for the HTTP server."""

    def __init__(self, predictor, run_dir: Path, engine: str):
        self._p = predictor
        self.run_dir = run_dir
        self.engine = engine
        self.meta = predictor.meta
        self.labels: list[str] = [str(x) for x in predictor.labels]
        self.image_size: int = int(self.meta.image_size)
        self.channels: int = int(self.meta.data_chans)
        self.model_id = model_id(predictor.run)
        self._metrics = predictor.run.metrics
        card = run_dir / "model_card.md"
        self._card = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else None
        self._layer = None

    @classmethod
    def from_run(cls, run_dir: str | Path, engine: str = "auto", threads: int | None = None,
                 max_batch: int = 64) -> "ServedModel":
        """Load ``run_dir`` (``model.json`` + ``model.safetensors``; ``model.onnx`` for the ONNX engine).

        ``threads``: intra-op threads of the engine (default: the library's, and one for PyTorch
        when the engine is ONNX; set it when several server processes share the cores; it is set
        process-wide). ``max_batch``: the largest batch one model call runs.
        """
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise MedxferError(f"run directory '{run_dir}' does not exist. Train one with 'medxfer train ... --out DIR'.")
        engine = resolve_engine(run_dir, engine)
        if threads:
            torch.set_num_threads(threads)
        elif engine == "onnx":
            # PyTorch only decodes and resizes uploads (and runs Grad-CAM) here: one thread each. Its
            # OpenMP teams in several decode threads beside ONNX Runtime's pool cost 10x per image
            # on a loaded 2-core machine (15 ms vs 1.2 ms for a 28 px PNG).
            torch.set_num_threads(1)
        # a server's ONNX pool must not busy-wait between calls: it starves the event loop and the decoding
        # threads (about 25% fewer requests/s on 2 cores with spinning)
        predictor = Predictor(run_dir, engine=engine, batch_size=max(1, max_batch), spinning=False,
                              threads=threads or physical_cores())   # ONNX's pool: every core unless told
        return cls(predictor, run_dir, engine)

    # ------------------------------------------------------------------------------------ input
    @staticmethod
    def suffixes() -> list[str]:
        """File suffixes the readers take (DICOM files without a suffix are recognised by content)."""
        return list(supported_suffixes())

    def decode(self, path: str | Path) -> torch.Tensor:
        """One image file -> uint8 (C, S, S) through exactly the run's preprocessing (as ``predict``).

        Raises ApiError: 415 unsupported type, 413 too many pixels, 422 unreadable (corrupt,
        truncated, DICOM without pixel data, ...), 400 empty file.
        """
        path = Path(path)
        self._check_pixels(path)
        try:
            batches = list(self._p.iter_inputs([path]))
        except BadFileError as e:
            raise _rejection(e.reason, path) from None
        except MedxferError as e:  # e.g. a frame option that this file cannot satisfy
            raise ApiError(422, "unreadable_image", _scrub(str(e), path)) from None
        if not batches or len(batches[0][1]) != 1:
            raise ApiError(422, "unreadable_image", "no image in the file")
        return batches[0][1][0]

    def _check_pixels(self, path: Path) -> None:
        """Refuse images above SERVE_MAX_PIXELS from their header, before decoding anything."""
        name = path.name.lower()
        rows = cols = None
        if name.endswith(".png"):
            with open(path, "rb") as f:
                head = f.read(24)
            size = png_size(head)
            if size is not None:
                cols, rows = size
        if rows is None and name.endswith(_PIL_SUFFIXES):
            from PIL import Image

            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with Image.open(path) as img:
                        cols, rows = img.size
            except Image.DecompressionBombError:
                raise ApiError(413, "too_many_pixels", f"the image is above the limit of {SERVE_MAX_PIXELS} "
                               "pixels (possible decompression bomb)") from None
            except Exception:  # noqa: BLE001 - unreadable: the reader says why
                return
        elif name.endswith((".dcm", ".dicom")) or "." not in name:
            try:
                import pydicom

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # pydicom warnings can quote header values
                    ds = pydicom.dcmread(path, stop_before_pixels=True)
                rows, cols = int(ds.Rows), int(ds.Columns)
            except Exception:  # noqa: BLE001 - no or bad header: the reader says why
                return
        if rows is not None and cols is not None and rows * cols > SERVE_MAX_PIXELS:
            raise ApiError(413, "too_many_pixels", f"image of {cols}x{rows} pixels is above the server's limit of "
                           f"{SERVE_MAX_PIXELS} pixels")

    def decode_cost(self, f: BinaryIO, suffix: str) -> int:
        """Bytes that decoding this upload will hold at its peak, estimated from its header alone.

        ``f``: the upload as a binary file (read from its start, left at its start). Raises ApiError
        413 above SERVE_MAX_PIXELS. The estimate follows the readers: Pillow holds 1 byte per pixel
        for grey, 4 for RGB(A), 6 for 16-bit grey (and reduces large images while decoding; JPEG
        decodes at 1/2 to 1/8 scale); DICOM, NIfTI and .npy add float copies of every element. A
        header that cannot be read costs twice the file's size (the reader will refuse it quickly).
        """
        size = f.seek(0, 2)
        f.seek(0)
        try:
            shape = _header_shape(f, suffix, self.image_size)
        except ApiError:
            raise
        except Exception:  # noqa: BLE001 - unreadable header: the reader says why, after the budget
            shape = None
        finally:
            f.seek(0)
        if shape is None:
            return 2 * size
        pixels, bytes_per_pixel, planar = shape
        if planar and pixels > SERVE_MAX_PIXELS:
            raise ApiError(413, "too_many_pixels", f"image of {pixels} pixels is above the server's limit of "
                           f"{SERVE_MAX_PIXELS} pixels")
        return int(pixels * bytes_per_pixel * 1.1) + size + 2**20

    # ------------------------------------------------------------------------------------ model
    def predict(self, images: torch.Tensor) -> np.ndarray:
        """uint8 (N, C, S, S) -> calibrated probabilities (N, K) (the run's temperature)."""
        return np.asarray(self._p.probabilities_of(images), dtype=np.float64)

    def predicted(self, probs: np.ndarray) -> list[int]:
        """Class indices: the threshold chosen on validation for the positive class (binary runs),
        else the argmax: the rule of ``Predictor.frame`` (``medxfer predict``), in numpy (a
        DataFrame per request costs more than the model at small batch sizes)."""
        probs = np.asarray(probs)
        if len(probs) == 0:
            return []
        return self._p.decide(probs).astype(int).tolist()

    def conformal_sets(self, probs: np.ndarray) -> list | None:
        """The run's conformal prediction set of each image (as ``medxfer predict``'s conformal_set): a list of
        labels, or for a multi-label run {finding: [states]}; None when the run has no conformal record."""
        record = self.meta.conformal
        if record is None or len(probs) == 0:
            return None
        sets = prediction_sets(np.asarray(probs), record)
        if sets.ndim == 3:
            return [{lab: [st for st, on in zip(("absent", "present"), row[j]) if on]
                     for j, lab in enumerate(self.labels)} for row in sets]
        return [[lab for lab, on in zip(self.labels, row) if on] for row in sets]

    def findings(self, probs: np.ndarray) -> list[list[str]]:
        """Multi-label runs: the findings at or above their validation thresholds, per image."""
        return [[lab for lab, on in zip(self.labels, row) if on] for row in findings(np.asarray(probs), self.meta)]

    def decision(self) -> dict:
        """How ``predicted`` is chosen, for clients: threshold on the positive class, or argmax."""
        thr, pos = self.meta.threshold, self.meta.positive_label
        if self.meta.task == "multilabel":
            return {"rule": "threshold per finding (see 'findings')", "threshold": list(thr or []),
                    "positive_label": None}
        if self.meta.task == "ordinal":
            return {"rule": "median grade", "threshold": None, "positive_label": None}
        if len(self.labels) == 2 and thr is not None and pos is not None and str(pos) in self.labels:
            return {"rule": "threshold", "threshold": float(thr), "positive_label": str(pos)}
        return {"rule": "argmax", "threshold": None, "positive_label": None if pos is None else str(pos)}

    def explain(self, images: torch.Tensor, classes: list[int] | None = None) -> list[bytes]:
        """Grad-CAM (PyTorch model, whatever the engine) for ``classes`` (default: predicted) ->
        one RGB PNG per image: the input as the model saw it with the jet heat map on top."""
        if self._layer is None:
            self._layer = feature_map_size(self._p.network, self.meta)[0]
        target = None if classes is None else np.asarray(classes, dtype=np.int64)
        maps = explain_images(self._p.network, self.meta, images, layer=self._layer, target_class=target)
        out = []
        for img, cam in zip(images.numpy(), maps):
            rgb = (overlay(img, cam) * 255).round().astype(np.uint8)
            pil = Image.fromarray(rgb, "RGB")
            if max(pil.size) < OVERLAY_SIDE:
                pil = pil.resize((OVERLAY_SIDE, OVERLAY_SIDE), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            pil.save(buf, format="PNG")
            out.append(buf.getvalue())
        return out

    # ------------------------------------------------------------------------------------ about
    def info(self) -> dict:
        """What a client needs to know: labels, input contract, test metrics with CIs, model card."""
        m = self.meta
        test = self._metrics.get("test") if isinstance(self._metrics.get("test"), dict) else None
        return {
            "model_id": self.model_id,
            "engine": self.engine,
            "labels": self.labels,
            **{k: v for k, v in self.decision().items() if k != "rule"},
            "decision_rule": self.decision()["rule"],
            "temperature": m.temperature,
            "arch": m.arch,
            "source": m.source,
            "strategy": m.strategy,
            "input": {
                "image_size": self.image_size,
                "channels": self.channels,
                "read": dict(m.read or {}),
                "model_input": m.input,
                "accepted_suffixes": self.suffixes(),
                "max_pixels": SERVE_MAX_PIXELS,
            },
            "metrics": {"test": test, "threshold": self._metrics.get("threshold"),
                        "train_seconds": self._metrics.get("train_seconds")} if self._metrics else None,
            "model_card": self._card,
        }


#: Bytes Pillow holds per pixel while decoding an image of each mode (see ServedModel.decode_cost).
_PIL_BYTES = {"1": 1, "L": 1, "RGB": 4, "RGBA": 4, "RGBX": 4, "LA": 5, "La": 5, "P": 8, "PA": 8,
              "I;16": 6, "I;16L": 6, "I;16B": 6, "I;16N": 6}


def _header_shape(f: BinaryIO, suffix: str, side: int) -> tuple[int, float, bool] | None:
    """(pixels decoded, bytes per pixel, 2-D image?) from a file's header, or None when unknown."""
    if suffix == ".png":  # the IHDR chunk as it is (Pillow would first refuse a bad checksum)
        head = f.read(26)
        size = png_size(head)
        if size is not None and len(head) == 26:
            depth, colour = head[24], head[25]
            per = {0: 6 if depth == 16 else 1, 2: 4, 3: 8, 4: 5, 6: 4}.get(colour, 8)
            return size[0] * size[1], per * (2 if depth == 16 and colour in (2, 6) else 1), True
        f.seek(0)
    if suffix in _PIL_SUFFIXES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                img = Image.open(f)
            except Image.DecompressionBombError:
                raise ApiError(413, "too_many_pixels", f"the image is above the limit of {SERVE_MAX_PIXELS} "
                               "pixels (possible decompression bomb)") from None
            with img:
                w, h = img.size
                per = _PIL_BYTES.get(img.mode, 8)
                if img.format == "JPEG":  # decoded at 1/2 .. 1/8 scale when much larger than the model's input
                    scale = min(8, max(1, min(w, h) // (2 * max(1, side))))
                    scale = 1 << (scale.bit_length() - 1)
                    return w * h // (scale * scale), per, True
                return w * h, per, True
    if suffix in (".dcm", ".dicom"):
        import pydicom

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warnings can quote header values
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
        bits = int(getattr(ds, "BitsAllocated", 16) or 16)
        return rows * cols * samples, bits / 8 + 20, True  # raw, float64 rescale and window, float32 out
    if suffix in (".nii", ".nii.gz"):
        import gzip

        import nibabel

        stream = gzip.GzipFile(fileobj=f, mode="rb") if suffix == ".nii.gz" else f
        head = stream.read(540)
        cls = nibabel.Nifti2Header if int.from_bytes(head[:4], "little") in (540, 0x1C020000) else nibabel.Nifti1Header
        hdr = cls.from_fileobj(io.BytesIO(head))
        dims = [int(d) for d in hdr.get_data_shape()[:3]]
        return int(np.prod(dims)), hdr.get_data_dtype().itemsize + 4, False  # raw and a float32 copy
    if suffix == ".npy":
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        return int(np.prod(shape)), 2 * dtype.itemsize + 4, len(shape) < 3
    return None


def _scrub(text: str, path: Path) -> str:
    """Remove the temporary path (and its name) from a message."""
    for s in (str(path), path.name):
        text = text.replace(f"'{s}'", "the upload").replace(s, "the upload")
    return text


def _rejection(reason: str, path: Path) -> ApiError:
    reason = _scrub(reason, path)
    low = reason.lower()
    if "above the limit" in low:
        return ApiError(413, "too_many_pixels", reason)
    if low.startswith("unsupported file type"):
        return ApiError(415, "unsupported_type", reason)
    if low.startswith("empty file"):
        return ApiError(400, "empty_file", "empty file (0 bytes)")
    if "pip install" in low:
        return ApiError(422, "missing_codec", reason)
    return ApiError(422, "unreadable_image", reason)
