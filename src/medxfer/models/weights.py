"""Load source weights from a bundled package, a local file, a source directory or the timm hub.

Nothing here runs code from a file: ``torch.load(weights_only=True)`` or safetensors only.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch

from medxfer.errors import MedxferError
from medxfer.files import sha256_file
from medxfer.models.catalog import SourceSpec


def weights_file(spec: SourceSpec) -> Path | None:
    """The local file that holds the source's weights, or None (hub / random)."""
    kind, _, ref = spec.weights.partition(":")
    if kind == "package":
        try:
            mod = importlib.import_module(ref)
        except ImportError as e:
            raise MedxferError(
                f"source '{spec.name}' needs the package '{ref}': pip install {ref.replace('_', '-')}"
            ) from e
        d = Path(mod.__file__).parent / "models"
        files = sorted(d.glob("*.pth"))
        if not files:
            raise MedxferError(f"package '{ref}' holds no .pth file in {d}: reinstall it (pip install --force-reinstall {ref.replace('_', '-')}).")
        return files[0]
    if kind == "file":
        return Path(ref)
    if kind == "dir":
        return Path(ref) / "model.safetensors"
    return None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or .pth/.pt (weights only), unwrapping common containers."""
    path = Path(path)
    if not path.is_file():
        raise MedxferError(f"weights file '{path}' does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad user file
        raise MedxferError(
            f"cannot read weights '{path}' ({type(e).__name__}: {str(e).splitlines()[0][:200]}). medxfer loads "
            "only plain state dicts (.safetensors, or .pth/.pt readable with torch.load(weights_only=True))."
        ) from e
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise MedxferError(f"weights '{path}' is not a state dict of tensors.")
    return {re.sub(r"^(module\.|model\.)", "", k): v for k, v in sd.items()}


def lite_to_timm(sd: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename lukemelas-style EfficientNet-Lite keys onto timm ``tf_efficientnet_lite*``."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    other = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
    where = [(s, i) for s, n in enumerate(stage_depths) for i in range(n)]
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "_blocks":
            b = int(parts[1])
            stage, i = where[b]
            names = first if b == 0 else other
            out[".".join(["blocks", str(stage), str(i), names[parts[2]], *parts[3:]])] = v
        else:
            out[".".join([top[parts[0]], *parts[1:]])] = v
    return out


def source_state_dict(spec: SourceSpec, model) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """The source's state dict in the timm key space of ``model`` and the sha256 of its file.

    Returns (None, None) for a random-init source.
    """
    kind = spec.weights.partition(":")[0]
    if kind == "none":
        return None, None
    if kind == "hub":
        return _hub_state_dict(spec), "hub"
    path = weights_file(spec)
    digest = check_digest(spec, path) if spec.sha256 else None
    sd = read_state_dict(path)
    if kind == "package":
        sd = lite_to_timm(sd, [len(s) for s in model.blocks])
    return sd, digest or sha256_file(path)


def check_digest(spec: SourceSpec, path: Path) -> str:
    """The SHA-256 of a shipped source's weights file, refused before loading when it is not the one recorded."""
    if not Path(path).is_file():
        raise MedxferError(f"source '{spec.name}' ships with medxfer, but its weights file '{path}' is missing: "
                           "reinstall medxfer (pip install --force-reinstall medxfer), or pass another --source.")
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise MedxferError(f"the weights of source '{spec.name}' ('{path}') have SHA-256 {digest[:16]}..., not the "
                           f"{spec.sha256[:16]}... medxfer shipped: the file is damaged or replaced. Reinstall "
                           "medxfer, or pass another --source.")
    return digest


def _hub_state_dict(spec: SourceSpec) -> dict[str, torch.Tensor]:
    import timm

    try:
        return timm.create_model(spec.arch, pretrained=True).state_dict()
    except Exception as e:  # noqa: BLE001 - offline or unknown tag
        raise MedxferError(
            f"could not download weights for '{spec.arch}' from the hub ({type(e).__name__}). This machine "
            "may be offline: download the weights elsewhere and pass --weights FILE, or use a bundled "
            "source such as efficientnet_lite0.in1k (see 'medxfer sources')."
        ) from e
