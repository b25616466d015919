"""Predict from a run directory alone.

Usage::

    p = Predictor("runs/breast")                      # engine="torch" (default) or "onnx"
    df = p.predict(["scan1.png", "folder/", "more.npz"])   # index, sample_id, prob_<class>..., predicted
    probs = p.probabilities(array)                    # (H,W), (N,H,W), (N,C,H,W), (N,H,W,C) or PIL images

Images go through exactly the training preprocessing (reader options, size, channels, uint8
quantisation, per-image intensity scaling for arrays) under the run's input contract (``input_dtype``
in model.json): a model trained on 8-bit images takes uint8 as it is and floats in [0, 1] as
``x * 255``, and refuses other floats and wider types (a 16-bit PNG) in one line; a model trained on
16-bit or float images scales every input per image; a window applies as in training; runs of earlier
releases (no ``input_dtype``) scale each input by its own type. Probabilities are calibrated with the run's
temperature(s); ``predicted`` applies the threshold chosen on validation (binary), the median grade
(ordinal) or the argmax; a multi-label run gives every finding at its own validation threshold,
joined by '|' (empty: none).

``conformal_set`` (runs with a conformal record, ``--conformal`` at training): the classes whose
validation-calibrated threshold the image passes, joined by '|' (ordinal: a contiguous range; multi-label:
``finding=absent|present`` per finding). It holds the true class with probability >= 1 - alpha for each
class, as long as the images are exchangeable with that class's validation images.

``adapt_prior=True`` (``predict --adapt-prior``): the class mix of the whole batch is estimated by EM from
its probabilities (labels unused; Saerens et al. 2002) starting from the run's validation mix, and
``prob_*`` and ``predicted`` are re-weighted to it (a binary run keeps its threshold, now on the adapted
probability); ``prior_adapted`` says the estimate on every row. The conformal sets stay those of the
unadapted probabilities: class-conditional coverage survives a change of class mix, re-weighted scores
would not keep it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medxfer.data.inputs import images_from_arrays, iter_inputs
from medxfer.data.readers import ReadOptions
from medxfer.engine.inference import OnnxRunner, TorchRunner
from medxfer.errors import MedxferError
from medxfer.evaluation.decisions import decide, findings
from medxfer.evaluation.tasks import probabilities
from medxfer.files import verify_file
from medxfer.runs import Run
from medxfer.trust.conformal import prediction_sets, set_text
from medxfer.trust.prior_shift import adapt_prior

log = logging.getLogger("medxfer.predict")

ENGINES = ("torch", "onnx")


class Predictor:
    """A trained model plus its preprocessing contract, rebuilt from ``run_dir``."""

    def __init__(self, run_dir: str | Path, engine: str = "torch", batch_size: int = 64, spinning: bool = True,
                 threads: int | None = None):
        """``threads``: CPU threads for the ONNX engine (default: PyTorch's, which ``--num-threads`` sets)."""
        if engine not in ENGINES:
            raise MedxferError(f"The 'engine' parameter must be one of {list(ENGINES)}. Got '{engine}' instead.")
        if batch_size < 1:
            raise MedxferError(f"The 'batch-size' parameter must be at least 1. Got {batch_size} instead.")
        self.run = Run.load(run_dir)
        self.run_dir, self.engine, self.batch_size = Path(run_dir), engine, batch_size
        self.meta = self.run.model
        self.read = ReadOptions.of_run(self.meta)
        self.network = self.run.load_model(tta=False)   # the network alone (Grad-CAM explains it)
        self.model = self.run.load_model()              # what predicts: with the run's test-time augmentation
        self.runner = TorchRunner(self.model) if engine == "torch" else self._onnx(spinning, threads)

    def _onnx(self, spinning: bool, threads: int | None) -> OnnxRunner:
        path = self.run_dir / "model.onnx"
        if not path.exists():
            raise MedxferError(f"no ONNX model in '{self.run_dir}'. Make one with 'medxfer export {self.run_dir} "
                               "--format onnx' first.")
        runner = OnnxRunner(path, threads=threads or torch.get_num_threads(), spinning=spinning)
        made_from = runner.metadata.get("weights_sha256")
        if made_from is None or made_from != self.meta.weights_sha256:
            raise MedxferError(f"'{path}' was exported from other weights than the run's model.safetensors (the run "
                               "was trained again after the export, or the file comes from another run). Run 'medxfer "
                               f"export {self.run_dir}' again.")
        verify_file(path, self.meta.onnx_sha256, "ONNX export")
        return runner

    @property
    def labels(self) -> list[str]:
        return list(self.meta.labels)

    # ------------------------------------------------------------------------------------ inputs
    def iter_inputs(self, inputs, on_bad_file: str = "error", skipped: list | None = None, paths: list | None = None):
        """Files, folders and npz archives through the run's preprocessing: ``(sample_ids, uint8 images)``."""
        return iter_inputs(inputs, self.meta.image_size, self.meta.data_chans, self.read, self.batch_size,
                           on_bad_file, skipped, paths)

    def images(self, x) -> torch.Tensor:
        """Arrays, tensors or PIL images -> uint8 (N, C, S, S), as ``medxfer predict`` prepares them."""
        return images_from_arrays(x, self.meta.image_size, self.meta.data_chans, self.read)

    # ------------------------------------------------------------------------------------ outputs
    def logits(self, images: torch.Tensor) -> np.ndarray:
        """Logits for uint8 images (N, C, S, S), in batches."""
        out = [self.runner(images[i:i + self.batch_size].float().div_(255).numpy())
               for i in range(0, len(images), self.batch_size)]
        width = len(self.labels) - (1 if self.meta.task == "ordinal" else 0)
        return np.concatenate(out) if out else np.zeros((0, width), np.float32)

    def probabilities_of(self, images: torch.Tensor) -> np.ndarray:
        """Calibrated probabilities (N, K) for uint8 images already prepared (see :meth:`images`)."""
        return probabilities(self.meta.task, self.logits(images), self.meta.temperature)

    def probabilities(self, x) -> np.ndarray:
        """Calibrated probabilities (N, K) for paths, folders, npz files, arrays, tensors or PIL images."""
        x = _as_list(x)
        if _are_paths(x):
            return self.predict(x)[[f"prob_{c}" for c in self.labels]].to_numpy()
        return self.probabilities_of(self.images(x))

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Predicted class indices: the validation threshold (binary) or the argmax."""
        return decide(probs, self.meta)

    def frame(self, ids: list[str], probs: np.ndarray, unadapted: np.ndarray | None = None,
              note: str | None = None) -> pd.DataFrame:
        """The table of ``probs``; ``unadapted``: the probabilities before --adapt-prior (the conformal sets are
        theirs), ``note``: the prior_adapted column's text."""
        df = pd.DataFrame(probs, columns=[f"prob_{c}" for c in self.labels])
        df.insert(0, "sample_id", ids)
        for name, t in self.thresholds().items():  # the decision's threshold beside the probability it applies to
            df[f"threshold_{name}"] = t
        if self.meta.conformal is not None:
            sets = prediction_sets(probs if unadapted is None else unadapted, self.meta.conformal)
            df["conformal_set"] = set_text(sets, self.labels)
        if note is not None:
            df["prior_adapted"] = note
        if self.meta.task == "multilabel":
            df["predicted"] = ["|".join(n for n, on in zip(self.labels, row) if on) for row in findings(probs, self.meta)]
        else:
            df["predicted"] = [self.labels[i] for i in self.decide(probs)]
        return df

    def thresholds(self) -> dict[str, float]:
        """The validation thresholds the decision applies: {positive class: t} for a binary run, one per finding
        for a multi-label run; empty where the decision is the argmax or the median grade."""
        m = self.meta
        if m.task == "multilabel" and isinstance(m.threshold, (list, tuple)):
            return {name: float(t) for name, t in zip(self.labels, m.threshold)}
        if m.positive_index is not None and m.threshold is not None:
            return {self.labels[m.positive_index]: float(m.threshold)}
        return {}

    def predict(self, inputs, on_bad_file: str = "error", paths: list | None = None,
                skipped: list | None = None, adapt_prior: bool = False) -> pd.DataFrame:
        """One table for files, folders, npz archives (or in-memory images): ``index`` (input order),
        pseudonymous ``sample_id`` (file names can hold patient names), probabilities, ``predicted``.
        ``skipped`` receives unreadable samples (``on_bad_file="skip"``); ``paths`` receives
        ``(sample_id, path)`` pairs for a mapping file; ``adapt_prior``: see the module docstring."""
        if adapt_prior:
            self._check_prior()
        inputs = _as_list(inputs)
        if not _are_paths(inputs):
            x = self.images(inputs)
            frames = [self.frame([f"image/{i:06d}" for i in range(len(x))], self.probabilities_of(x))]
        else:
            frames = [self.frame(ids, self.probabilities_of(x))
                      for ids, x in self.iter_inputs(inputs, on_bad_file, skipped, paths)]
        if not frames:
            raise MedxferError("no image to predict on among the inputs.")
        df = pd.concat(frames, ignore_index=True)
        if adapt_prior:
            df = self.adapted(df)
        df.insert(0, "index", np.arange(len(df)))
        return df

    def _check_prior(self) -> None:
        prior = self.meta.prior
        if self.meta.task == "multilabel" or prior is None:
            raise MedxferError("--adapt-prior needs the run's validation class mix, which " + (
                "a multi-label run does not have (each finding is its own decision)." if self.meta.task == "multilabel"
                else f"'{self.run_dir}' does not record (a run of an earlier release): train it again."))
        empty = [c for c, v in zip(self.labels, prior) if v <= 0]
        if empty:
            raise MedxferError(f"--adapt-prior: class '{empty[0]}' had no validation images, so its prevalence cannot "
                               "be re-weighted from the run's; predict without --adapt-prior.")

    def adapted(self, df: pd.DataFrame) -> pd.DataFrame:
        """``df``'s probabilities and decisions re-weighted to the batch's class mix (EM), said in one log line
        and in the prior_adapted column."""
        cols = [f"prob_{c}" for c in self.labels]
        probs = df[cols].to_numpy(float)
        r = adapt_prior(probs, self.meta.prior)
        est = ", ".join(f"{c} {v:.3f}" for c, v in zip(self.labels, r["prevalence"]))
        was = ", ".join(f"{v:.3f}" for v in r["source_prior"])
        state = f"converged in {r['iterations']} iterations" if r["converged"] else \
            f"not converged after {r['iterations']} iterations (the estimate is the last one)"
        log.info("prior adapted to these %d images (labels unused): estimated prevalence %s (validation: %s); EM %s",
                 len(probs), est, was, state)
        note = "; ".join(f"{c}={v:.3f}" for c, v in zip(self.labels, r["prevalence"])) + \
            f" (EM on {len(probs)} images, {'converged' if r['converged'] else 'not converged'})"
        return self.frame(list(df["sample_id"]), r["probs"], unadapted=probs, note=note)


def _are_paths(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(i, (str, Path)) for i in x)


def _as_list(x):
    return [x] if isinstance(x, (str, Path)) else x
