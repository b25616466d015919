"""Ship a trained run: ONNX (or TorchScript) with the preprocessing contract, checked against PyTorch.

Usage::

    report = export_run("runs/breast", fmt="onnx")          # writes runs/breast/model.onnx
    report["max_prob_diff"]                                  # on the run's own test images, < 1e-4
    runner = OnnxRunner("runs/breast/model.onnx")
    logits = runner(x)                                       # x: float32 (N, C, S, S) in [0, 1]
    read_onnx_metadata("runs/breast/model.onnx")["labels"]

The exported model is ``MedxferNet``: it takes float32 images in [0, 1] of shape (N, C, S, S) with a
dynamic batch, and returns logits; the source's normalisation is inside it. Everything else a
caller needs (labels, image size, channels, mean/std, temperature, threshold, positive label, reader
options) is in the ONNX ``metadata_props`` (JSON-encoded values) or, for TorchScript, in the
``medxfer.json`` extra file.

Parity: the exported model and PyTorch are run on real images (the run's test split, rebuilt from
its ``config.yaml``; or ``check_data`` paths), and the largest absolute difference of the calibrated
probabilities must be below ``PARITY_TOL``; otherwise nothing is written and an error is raised.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from medxfer.errors import MedxferError

PARITY_TOL = 1e-4
MAX_CHECK_IMAGES = 512
FORMATS = ("onnx", "torchscript")
META_KEYS = ("arch", "source", "labels", "image_size", "data_chans", "in_chans", "mean", "std", "grey_mode",
             "read", "temperature", "threshold", "positive_label", "strategy", "input", "weights_sha256")


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads do not help ONNX Runtime's matmuls)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    cores = set()
    try:
        phys = core = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "physical id":
                phys = value.strip()
            elif key == "core id":
                core = value.strip()
            elif not line.strip():
                if core is not None:
                    cores.add((phys, core))
                phys = core = None
        if core is not None:
            cores.add((phys, core))
    except OSError:
        pass
    return max(1, min(allowed, len(cores) or allowed))


class OnnxRunner:
    """An onnxruntime CPU session for an exported medxfer model: ``runner(x) -> logits``."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise MedxferError(f"ONNX model '{self.path}' does not exist. Make one with 'medxfer export RUN_DIR'.")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or physical_cores()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise MedxferError(f"cannot load ONNX model '{self.path}' ({str(e).splitlines()[0]}). "
                               "Export it again with 'medxfer export RUN_DIR'.") from e
        self.input_name = self.session.get_inputs()[0].name
        self.metadata = _decode_meta(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run(None, {self.input_name: x})[0]


def _decode_meta(props: dict) -> dict:
    out = {}
    for k, v in props.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, ValueError):
            out[k] = v
    return out


def read_onnx_metadata(path: str | Path) -> dict:
    """The preprocessing contract stored in an exported model's ``metadata_props`` (values decoded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return _decode_meta({p.key: p.value for p in model.metadata_props})


def contract(meta: dict) -> dict:
    """The metadata written into an exported model, from ``model.json``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        producer = f"medxfer {version('medxfer')}"
    except PackageNotFoundError:
        producer = "medxfer"
    out = {k: meta.get(k) for k in META_KEYS if k in meta}
    out["producer"] = producer
    out["output"] = "logits (N, num_classes); probabilities = softmax(logits / temperature)"
    return out


# ----------------------------------------------------------------------------------- check images
def run_test_images(run_dir: Path, meta: dict, log=print, limit: int = MAX_CHECK_IMAGES) -> tuple[torch.Tensor, str]:
    """The run's own test images (uint8), rebuilt from ``config.yaml`` as training prepared them
    (the same rebuild as the report's gallery)."""
    from medxfer.evaluation.report import load_test_images
    from medxfer.predict import match_uint8_channels
    from medxfer.runs import read_run

    run = read_run(run_dir)
    try:
        images = load_test_images(run)
    except MedxferError as e:
        raise MedxferError(f"cannot rebuild the run's test images ({e}) Pass --check-data PATH (images, folders "
                           "or an npz) to check the export on.") from e
    where = f"{min(len(images), limit)} test images of {run['config']['data']}"
    return match_uint8_channels(images[:limit], meta["data_chans"]), where


def path_images(paths: list[str | Path], meta: dict, limit: int = MAX_CHECK_IMAGES) -> tuple[torch.Tensor, str]:
    """Images from files, folders and npz archives, through the run's preprocessing (as ``predict``)."""
    from medxfer.data.readers import ReadOptions
    from medxfer.predict import iter_inputs

    chunks, n = [], 0
    for _, _, x in iter_inputs(paths, meta, ReadOptions(**meta["read"])):
        chunks.append(x)
        n += len(x)
        if n >= limit:
            break
    if not chunks:
        raise MedxferError(f"no images found in {[str(p) for p in paths]} to check the export on.")
    images = torch.cat(chunks)[:limit]
    return images, f"{len(images)} images from {', '.join(map(str, paths))}"


# ---------------------------------------------------------------------------------------- parity
def _torch_logits(model, images: torch.Tensor, batch: int = 64) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out.append(model(images[i:i + batch].float().div_(255)).numpy())
    return np.concatenate(out)


def parity(reference: np.ndarray, candidate: np.ndarray, temperature: float) -> dict:
    from medxfer.evaluation.calibration import apply_temperature

    p_ref, p_new = apply_temperature(reference, temperature), apply_temperature(candidate, temperature)
    return {"max_logit_diff": float(np.abs(reference - candidate).max()),
            "max_prob_diff": float(np.abs(p_ref - p_new).max()),
            "same_argmax": float((p_ref.argmax(1) == p_new.argmax(1)).mean())}


def check_parity(model, run_fn, images: torch.Tensor, meta: dict, batch: int = 64) -> dict:
    """Run PyTorch and ``run_fn`` (float32 numpy batch -> logits) on ``images``; the differences."""
    ref = _torch_logits(model, images, batch)
    new = np.concatenate([run_fn(images[i:i + batch].float().div_(255).numpy()) for i in range(0, len(images), batch)])
    out = parity(ref, new, meta.get("temperature") or 1.0)
    out["n_images"] = int(len(images))
    return out


# ---------------------------------------------------------------------------------------- export
def export_onnx_file(model, meta: dict, path: Path, example: torch.Tensor) -> None:
    """``torch.onnx.export`` (dynamo, dynamic batch, one file) + the contract in ``metadata_props``."""
    import contextlib
    import io
    import logging

    import onnx

    batch = torch.export.Dim("batch", min=1, max=1024)
    x = example.float().div(255)
    if len(x) < 2:  # an example batch of 1 would be specialised
        x = x.repeat(2, 1, 1, 1)
    quiet = io.StringIO()
    level = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(quiet):
            torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes={"x": {0: batch}},
                              external_data=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; the user needs one line
        raise MedxferError(f"ONNX export of '{meta.get('arch')}' failed ({type(e).__name__}: "
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


def export_torchscript_file(model, meta: dict, path: Path, example: torch.Tensor) -> None:
    import warnings

    x = example.float().div(255)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (x,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"medxfer.json": json.dumps(contract(meta))})


def _publish(tmp: Path, out: Path) -> None:
    """Rename into place, readable like a normally created file (mkstemp makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, out)


def export_run(run_dir: str | Path, fmt: str = "onnx", out: str | Path | None = None,
               check_data: list[str | Path] | None = None, tol: float = PARITY_TOL, log=print) -> dict:
    """Export the run's model; check it against PyTorch on real images; write only when it agrees."""
    from medxfer.models.adapt import load_run_model

    if fmt not in FORMATS:
        raise MedxferError(f"The 'format' parameter must be one of {list(FORMATS)}. Got '{fmt}' instead.")
    from medxfer import runs

    run_dir = Path(run_dir)
    model, meta = load_run_model(run_dir)
    if not meta.get("weights_sha256"):  # a run from before the hash was recorded
        meta = {**meta, "weights_sha256": runs.sha256_file(run_dir / "model.safetensors")}
    default = run_dir / ("model.onnx" if fmt == "onnx" else "model.torchscript.pt")
    out = Path(out) if out else default
    images, where = path_images(check_data, meta) if check_data else run_test_images(run_dir, meta, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if fmt == "onnx":
            export_onnx_file(model, meta, tmp, images[:8])
            runner = OnnxRunner(tmp)
            report = check_parity(model, runner, images, meta)
            one = runner(images[:1].float().div(255).numpy())  # the batch really is dynamic
            if one.shape != (1, len(meta["labels"])):
                raise MedxferError(f"the exported model gave shape {one.shape} for one image.")
        else:
            export_torchscript_file(model, meta, tmp, images[:8])
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                loaded = torch.jit.load(str(tmp)).eval()

            def run_ts(x: np.ndarray) -> np.ndarray:
                with torch.no_grad():
                    return loaded(torch.from_numpy(x)).numpy()

            report = check_parity(model, run_ts, images, meta)
        report.update({"format": fmt, "path": str(out), "checked_on": where, "tolerance": tol,
                       "bytes": tmp.stat().st_size})
        if not report["max_prob_diff"] < tol:
            raise MedxferError(
                f"the {fmt} model does not match PyTorch on {where}: max probability difference "
                f"{report['max_prob_diff']:.2e} (tolerance {tol:g}; logits {report['max_logit_diff']:.2e}). "
                f"Nothing was written. Report this with the run's model.json.")
        digest = runs.sha256_file(tmp)
        _publish(tmp, out)
    except OSError as e:
        raise runs.write_error(out, e) from None
    finally:
        tmp.unlink(missing_ok=True)
    report["sha256"] = digest
    if out.resolve() == default.resolve():  # model.json records what the run's export is, to check it on load
        key = "onnx_sha256" if fmt == "onnx" else "torchscript_sha256"
        recorded = runs.read_json(run_dir / "model.json", "model.json")
        runs.write_json(run_dir / "model.json", {**recorded, key: digest})
    return report


def check_onnx_matches_run(runner: "OnnxRunner", meta: dict, onnx_path: Path) -> None:
    """Refuse an ONNX file made from other weights than the run's (a stale export), or damaged."""
    from medxfer import runs

    made_from = runner.metadata.get("weights_sha256")
    if made_from is None or made_from != meta.get("weights_sha256"):
        raise MedxferError(f"'{onnx_path}' was exported from other weights than the run's model.safetensors (the run "
                           "was trained again after the export, or the file comes from another run). Run 'medxfer "
                           f"export {onnx_path.parent}' again.")
    runs.verify_file(onnx_path, meta.get("onnx_sha256"), "ONNX export")
