"""Predict from a run directory alone.

Usage::

    p = Predictor("runs/breast")                      # engine="torch" (default) or "onnx"
    df = p.predict_paths(["scan1.png", "folder/", "more.npz"])
    df.columns  # sample_id, prob_<class>..., predicted

Images go through exactly the training preprocessing (reader options, size, channels, uint8
quantisation); probabilities are calibrated with the run's temperature; ``predicted`` applies the
threshold chosen on validation (binary) or the argmax.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medxfer.data.transforms import match_channels, resize_to_uint8
from medxfer.errors import BadFileError, MedxferError
from medxfer.evaluation.calibration import apply_temperature


class Predictor:
    """A trained model plus its preprocessing contract, rebuilt from ``run_dir``."""

    def __init__(self, run_dir: str | Path, engine: str = "torch", batch_size: int = 64):
        from medxfer.data.readers import ReadOptions
        from medxfer.models.adapt import load_run_model

        if engine not in ("torch", "onnx"):
            raise MedxferError(f"The 'engine' parameter must be 'torch' or 'onnx'. Got '{engine}' instead.")
        self.run_dir = Path(run_dir)
        self.engine = engine
        self.batch_size = batch_size
        self.model, self.meta = load_run_model(self.run_dir)
        self.read = ReadOptions(**self.meta["read"])
        self._onnx = None
        if engine == "torch":  # the layout training evaluated in; convolutions on CPU are faster in it
            self.model.to(memory_format=torch.channels_last)
        if engine == "onnx":
            from medxfer.export import OnnxRunner, check_onnx_matches_run

            onnx_path = self.run_dir / "model.onnx"
            if not onnx_path.exists():
                raise MedxferError(f"no ONNX model in '{self.run_dir}'. Make one with 'medxfer export {self.run_dir} "
                                   "--format onnx' first.")
            self._onnx = OnnxRunner(onnx_path)
            check_onnx_matches_run(self._onnx, self.meta, onnx_path)

    @property
    def labels(self) -> list[str]:
        return self.meta["labels"]

    def logits(self, images: torch.Tensor) -> np.ndarray:
        """Logits for uint8 images (N, C, S, S), in batches."""
        out = []
        for i in range(0, len(images), self.batch_size):
            x = images[i:i + self.batch_size].float().div_(255)
            if self._onnx is not None:
                out.append(self._onnx(x.numpy()))
            else:
                with torch.no_grad():
                    out.append(self.model(x.contiguous(memory_format=torch.channels_last)).numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        return apply_temperature(self.logits(images), self.meta.get("temperature") or 1.0)

    def frame(self, ids: list[str], probs: np.ndarray) -> pd.DataFrame:
        df = pd.DataFrame(probs, columns=[f"prob_{c}" for c in self.labels])
        df.insert(0, "sample_id", ids)
        thr, pos = self.meta.get("threshold"), self.meta.get("positive_label")
        if len(self.labels) == 2 and thr is not None and pos is not None:
            p = self.labels.index(pos)
            pred = np.where(probs[:, p] >= thr, p, 1 - p)
        else:
            pred = probs.argmax(1)
        df["predicted"] = [self.labels[i] for i in pred]
        return df

    def predict_paths(self, inputs: list[str | Path], on_bad_file: str = "error",
                      paths: list | None = None) -> tuple[pd.DataFrame, list]:
        """Image files, folders (searched recursively) and npz archives -> one table; and skipped samples.

        Rows are named by ``index`` (input order) and a pseudonymous ``sample_id`` (file names can hold
        patient names); ``paths``, when given, receives ``(sample_id, path)`` pairs for a mapping file."""
        skipped: list = []
        frames = [self.frame(ids, self.probabilities(x))
                  for ids, _, x in iter_inputs(inputs, self.meta, self.read, self.batch_size, on_bad_file, skipped,
                                               paths)]
        if not frames:
            raise MedxferError("no image to predict on among the inputs.")
        df = pd.concat(frames, ignore_index=True)
        df.insert(0, "index", np.arange(len(df)))
        return df, skipped


def _npz_images(path: Path):
    """(key, array) for every ``*images`` array of an npz; object (pickled) arrays are refused."""
    try:
        npz = np.load(path, allow_pickle=False)
        keys = [k for k in npz.files if k.endswith("images")]
        if not keys:
            raise MedxferError(f"npz '{path}' has no '*_images' array (keys: {npz.files}).")
        return [(k, npz[k]) for k in keys]
    except ValueError as e:  # object arrays need pickle, which is never allowed
        raise MedxferError(f"npz '{path}' holds an object (pickled) array, which medxfer never loads: save the images "
                           f"as a numeric array ({str(e).splitlines()[0][:80]}).") from None
    except (OSError, EOFError) as e:
        raise MedxferError(f"cannot read npz '{path}' ({type(e).__name__}). Is it a NumPy .npz archive?") from None


def match_uint8_channels(x: torch.Tensor, chans: int) -> torch.Tensor:
    """uint8 (N, C, S, S) -> (N, chans, S, S): grey replicated to RGB, RGB averaged to grey."""
    if x.shape[1] == chans:
        return x
    if chans == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    return x.float().mean(1, keepdim=True).round().to(torch.uint8)


def iter_inputs(inputs, meta: dict, read, batch_size: int = 64, on_bad_file: str = "error",
                skipped: list | None = None, paths: list | None = None):
    """Image files, folders (recursive) and npz archives through a run's preprocessing, in chunks.

    Yields ``(sample_ids, names, uint8 images (n, C, S, S))``: ``sample_ids`` are pseudonymous ids of
    the file paths as given (:func:`medxfer.data.privacy.sample_id`), or ``<split>/<index>`` for npz
    arrays (as in the run's predictions.csv); ``names`` are safe names for output files (the same
    ids). Unreadable files raise, or with ``on_bad_file="skip"`` go to ``skipped`` as
    :class:`~medxfer.data.loading.Skipped`. ``paths`` collects ``(sample_id, path)`` when given.
    """
    from medxfer.data.loading import Skipped, decode_arrays
    from medxfer.data.privacy import sample_id
    from medxfer.data.readers import read_image
    from medxfer.data.sources import is_image_file

    if batch_size < 1:
        raise MedxferError(f"The 'batch-size' parameter must be at least 1. Got {batch_size} instead.")
    if on_bad_file not in ("error", "skip"):
        raise MedxferError(f"The 'on-bad-file' parameter must be 'error' or 'skip'. Got '{on_bad_file}' instead.")

    size, chans = meta["image_size"], meta["data_chans"]
    files = []
    for item in map(Path, inputs):
        if not item.exists():
            raise MedxferError(f"input '{item}' does not exist.")
        if item.is_file() and item.suffix.lower() == ".npz":
            for k, arr in _npz_images(item):
                prefix = k[: -len("_images")].rstrip("_") or "images"
                for i in range(0, len(arr), batch_size):
                    ids = [f"{prefix}/{j:06d}" for j in range(i, min(i + batch_size, len(arr)))]
                    got = decode_arrays(arr, size, read, ids=ids, rows=np.arange(i, i + len(ids)),
                                        on_bad_file=on_bad_file, where=f"npz '{item.name}'")
                    if skipped is not None:
                        skipped += got.skipped
                    ids = [s for s, kept in zip(ids, got.keep) if kept]
                    yield ids, [f"{prefix}_{s.split('/')[-1]}" for s in ids], match_uint8_channels(got.images, chans)
        elif item.is_dir():
            files += sorted(f for f in item.rglob("*") if is_image_file(f))
        else:
            files.append(item)
    for i in range(0, len(files), batch_size):
        chunk, ids, names = [], [], []
        for f in files[i:i + batch_size]:
            sid = sample_id(str(f))
            if paths is not None:
                paths.append((sid, str(f)))
            try:
                arr = match_channels(read_image(f, read, size=size), chans)
            except BadFileError as e:
                if on_bad_file == "error" or skipped is None:
                    raise e.for_sample(sid, where=f"input file #{files.index(f) + 1}; --keep-paths maps ids to "
                                                  "files") from None
                skipped.append(Skipped(sid, e.reason, str(f)))
                continue
            chunk.append(resize_to_uint8(arr[None], size)[0])
            ids.append(sid)
            names.append(sid)
        if chunk:
            yield ids, names, torch.stack(chunk)
