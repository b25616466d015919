"""Running a trained model for inference: PyTorch or an exported ONNX graph, one call convention.

Usage::

    runner = OnnxRunner("runs/breast/model.onnx")          # or TorchRunner(model)
    logits = runner(x)                                     # x: float32 numpy (N, C, S, S) in [0, 1]
    read_onnx_metadata("runs/breast/model.onnx")["labels"] # the preprocessing contract stored in the file
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from medxfer.errors import MedxferError


class TorchRunner:
    """A PyTorch model as a runner: ``runner(x) -> logits`` (channels_last, the layout training used)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        if _is_2d(model):
            self.model.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def __call__(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if t.ndim == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return self.model(t).float().numpy()


def _is_2d(model: torch.nn.Module) -> bool:
    return not any(isinstance(m, torch.nn.Conv3d) for m in model.modules())


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

    def __init__(self, path: str | Path, threads: int | None = None, spinning: bool = True):
        import onnxruntime as ort  # a heavy import: only when an ONNX model is run

        self.path = Path(path)
        if not self.path.is_file():
            raise MedxferError(f"ONNX model '{self.path}' does not exist. Make one with 'medxfer export RUN_DIR'.")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or physical_cores()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spinning:  # a server: pool threads must not busy-wait between calls (they starve the event loop)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
    import onnx  # a heavy import: only when an ONNX file is read

    model = onnx.load(str(path), load_external_data=False)
    return _decode_meta({p.key: p.value for p in model.metadata_props})


