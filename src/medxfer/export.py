"""Ship a trained run: ONNX (or TorchScript) with the preprocessing contract, checked against PyTorch.

Usage::

    report = export_run("runs/breast", fmt="onnx")          # writes runs/breast/model.onnx
    report["max_prob_diff"]                                  # on the run's own test images, < 1e-4
    OnnxRunner("runs/breast/model.onnx")(x)                  # x: float32 (N, C, S, S) in [0, 1] -> logits

The exported model is ``MedxferNet``: it takes float32 images in [0, 1] of shape (N, C, S, S) with a
dynamic batch, and returns logits; the source's normalisation is inside it. Everything else a
caller needs (labels, image size, channels, mean/std, temperature, threshold, positive label, reader
options, the SHA-256 of the weights it was made from) is in the ONNX ``metadata_props`` (JSON values)
or, for TorchScript, in the ``medxfer.json`` extra file. model.json and the run's files.sha256 record the
export's SHA-256 (amended under the run's lock by :func:`medxfer.run_writer.record_export`), so ``predict`` refuses a damaged export or one made before
the run was trained again. ``out`` elsewhere goes through the output guard (:func:`medxfer.runs.check_out`):
never into a run directory or over an input; an existing file only when it is a medxfer export (its
contract names medxfer as the producer), or with ``overwrite``.

Parity: the exported model and PyTorch are run on real images (the run's first test images, kept with the
run as training prepared them; or ``check_data`` paths), and the largest absolute difference of the calibrated
probabilities must be below ``PARITY_TOL``; otherwise nothing is written and an error is raised.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from medxfer import files
from medxfer.data.inputs import iter_inputs
from medxfer.data.prepare import images_of
from medxfer.data.readers import ReadOptions
from medxfer.data.transforms import match_channels_uint8
from medxfer.engine.inference import OnnxRunner, TorchRunner, read_onnx_metadata
from medxfer.errors import MedxferError
from medxfer.evaluation.tasks import probabilities
from medxfer.run_writer import record_export
from medxfer.runs import ModelMeta, Run, check_out

PARITY_TOL = 1e-4
MAX_CHECK_IMAGES = 512
FORMATS = ("onnx", "torchscript")
META_KEYS = ("arch", "source", "labels", "image_size", "data_chans", "in_chans", "mean", "std", "grey_mode",
             "read", "temperature", "threshold", "positive_label", "strategy", "input", "input_dtype", "weights_sha256",
             "task", "tta", "tta_hflip", "spatial_dims", "inflate")
OUTPUTS = {"multilabel": "logits (N, num_findings); P(finding k) = sigmoid(logits[:, k] / temperature[k])",
           "ordinal": "CORN logits (N, num_grades - 1); z = logits / temperature; P(grade > k) = prod_{j<=k} "
                      "sigmoid(z_j); P(grade = k) = P(grade > k-1) - P(grade > k)",
           "other": "logits (N, num_classes); probabilities = softmax(logits / temperature)"}
log = logging.getLogger(__name__)


def contract(meta: ModelMeta) -> dict:
    """The metadata written into an exported model, from ``model.json``."""
    try:
        producer = f"medxfer {version('medxfer')}"
    except PackageNotFoundError:
        producer = "medxfer"
    d = meta.to_dict()
    out = {k: d.get(k) for k in META_KEYS if k in d}
    out["producer"] = producer
    out["output"] = OUTPUTS.get(meta.task, OUTPUTS["other"])
    return out


# ----------------------------------------------------------------------------------- check images
def run_test_images(run: Run, limit: int = MAX_CHECK_IMAGES) -> tuple[torch.Tensor, str]:
    """The run's own test images (uint8): those kept with the run (runs.CHECK_IMAGES: from the run directory
    alone), or for a run of an earlier release rebuilt from its data as training prepared them."""
    kept = run.check_images()
    if kept is not None:
        images = match_channels_uint8(kept[:limit], run.model.data_chans)
        return images, f"{len(images)} test images kept with the run"
    ids = run.test_predictions["sample_id"].astype(str).tolist()[:limit]
    try:
        images = images_of(run.config.data, run.image_size, run.config.optim.seed, ids)
    except MedxferError as e:
        raise MedxferError(f"cannot rebuild the run's test images ({e}) Pass --check-data PATH (images, folders "
                           "or an npz) to check the export on.") from None
    return match_channels_uint8(images, run.model.data_chans), f"{len(images)} test images of {run.config.data.path}"


def path_images(paths: list[str | Path], meta: ModelMeta, limit: int = MAX_CHECK_IMAGES) -> tuple[torch.Tensor, str]:
    """Images from files, folders and npz archives, through the run's preprocessing (as ``predict``)."""
    chunks, n = [], 0
    for _, x in iter_inputs(paths, meta.image_size, meta.data_chans, ReadOptions.of_run(meta)):
        chunks.append(x)
        n += len(x)
        if n >= limit:
            break
    if not chunks:
        raise MedxferError(f"no images found in {[str(p) for p in paths]} to check the export on.")
    images = torch.cat(chunks)[:limit]
    return images, f"{len(images)} images from {', '.join(map(str, paths))}"


# ---------------------------------------------------------------------------------------- parity
def parity(reference: np.ndarray, candidate: np.ndarray, temperature, task: str = "binary") -> dict:
    """Largest differences of logits and calibrated probabilities (per class, finding or grade)."""
    p_ref, p_new = probabilities(task, reference, temperature), probabilities(task, candidate, temperature)
    return {"max_logit_diff": float(np.abs(reference - candidate).max()),
            "max_prob_diff": float(np.abs(p_ref - p_new).max()),
            "same_argmax": float((p_ref.argmax(1) == p_new.argmax(1)).mean())}


def check_parity(model, run_fn, images: torch.Tensor, meta: ModelMeta, batch: int = 64) -> dict:
    """Run PyTorch and ``run_fn`` (float32 numpy batch -> logits) on ``images``; the differences."""
    ref_fn = TorchRunner(model)

    def logits(fn) -> np.ndarray:
        return np.concatenate([fn(images[i:i + batch].float().div_(255).numpy()) for i in range(0, len(images), batch)])

    out = parity(logits(ref_fn), logits(run_fn), meta.temperature, meta.task)
    out["n_images"] = int(len(images))
    return out


# ---------------------------------------------------------------------------------------- export
def export_onnx_file(model, meta: ModelMeta, path: Path, example: torch.Tensor) -> None:
    """``torch.onnx.export`` (dynamo, dynamic batch, one file) + the contract in ``metadata_props``."""
    import onnx  # a heavy import: only when exporting

    batch = torch.export.Dim("batch", min=1, max=1024)
    x = example.float().div(255)
    if len(x) < 2:  # an example batch of 1 would be specialised
        x = x.repeat(2, *([1] * (x.ndim - 1)))
    level = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes={"x": {0: batch}},
                              external_data=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; the user needs one line
        raise MedxferError(f"ONNX export of '{meta.arch}' failed ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}). Try --format torchscript.") from e
    finally:
        logging.getLogger("torch.onnx").setLevel(level)
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for k, v in contract(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, json.dumps(v)
    proto.doc_string = ("medxfer model: input float32 (N, C, S, S) in [0, 1] (normalisation inside), output logits; "
                        "see metadata_props for the preprocessing contract")
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def export_torchscript_file(model, meta: ModelMeta, path: Path, example: torch.Tensor) -> None:
    x = example.float().div(255)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (x,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"medxfer.json": json.dumps(contract(meta))})


def publish(tmp: Path, out: Path) -> None:
    """Rename into place, readable like a normally created file (mkstemp makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, out)


def _write_and_check(model, meta: ModelMeta, fmt: str, tmp: Path, images: torch.Tensor) -> dict:
    """Export to ``tmp`` and compare it with PyTorch on ``images``."""
    if fmt == "onnx":
        export_onnx_file(model, meta, tmp, images[:8])
        runner = OnnxRunner(tmp, threads=torch.get_num_threads())   # --num-threads sets it
        report = check_parity(model, runner, images, meta)
        one = runner(images[:1].float().div(255).numpy())  # the batch really is dynamic
        if one.shape != (1, meta.outputs):
            raise MedxferError(f"the exported model gave shape {one.shape} for one image.")
        return report
    export_torchscript_file(model, meta, tmp, images[:8])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(tmp)).eval()

    def run_ts(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return loaded(torch.from_numpy(x)).numpy()

    return check_parity(model, run_ts, images, meta)


def is_export(path: Path) -> bool:
    """Whether ``path`` is a model medxfer exported: a TorchScript archive with ``medxfer.json``, or an ONNX
    file whose contract names medxfer as the producer (the mark that lets a new export replace it)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return any(n.endswith("extra/medxfer.json") for n in z.namelist())
        return str(read_onnx_metadata(path).get("producer", "")).startswith("medxfer")
    except Exception:  # noqa: BLE001 - anything that cannot be read as an export is not one
        return False


def export_run(run_dir: str | Path, fmt: str = "onnx", out: str | Path | None = None,
               check_data: list[str | Path] | None = None, tol: float = PARITY_TOL, overwrite: bool = False) -> dict:
    """Export the run's model; check it against PyTorch on real images; write only when it agrees."""
    if fmt not in FORMATS:
        raise MedxferError(f"The 'format' parameter must be one of {list(FORMATS)}. Got '{fmt}' instead.")
    run = Run.load(run_dir)
    default = run.dir / ("model.onnx" if fmt == "onnx" else "model.torchscript.pt")
    out = Path(out) if out else default
    into_run = out.resolve() == default.resolve()  # the run's own export: recorded in the run
    if not into_run:
        check_out(out, inputs=[run.dir, *(check_data or [])], overwrite=overwrite, ours=is_export)
    model = run.load_model()
    meta = run.model.replace(weights_sha256=run.weights_digest())  # runs from before the hash was recorded
    images, where = path_images(check_data, meta) if check_data else run_test_images(run)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise files.write_error(out, e) from None
    tmp = Path(tmp_name)
    try:
        report = _write_and_check(model, meta, fmt, tmp, images)
        report.update({"format": fmt, "path": str(out), "checked_on": where, "tolerance": tol,
                       "bytes": tmp.stat().st_size})
        if not report["max_prob_diff"] < tol:
            raise MedxferError(
                f"the {fmt} model does not match PyTorch on {where}: max probability difference "
                f"{report['max_prob_diff']:.2e} (tolerance {tol:g}; logits {report['max_logit_diff']:.2e}). "
                f"Nothing was written. Report this with the run's model.json.")
        report["sha256"] = files.sha256_file(tmp)
        if into_run:
            record_export(run, fmt, report["sha256"], meta.weights_sha256, lambda: publish(tmp, out))
        else:
            publish(tmp, out)
    except OSError as e:
        raise files.write_error(out, e) from None
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported %s (%s): max probability difference %.2e on %s", out, fmt, report["max_prob_diff"], where)
    return report
