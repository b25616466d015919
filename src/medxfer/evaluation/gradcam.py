"""Grad-CAM heat maps: where in the image the evidence for a class came from.

Usage::

    from medxfer.evaluation.gradcam import explain_images, save_overlays

    run = Run.load("runs/breast"); model = run.load_model()
    maps = explain_images(model, run.model, images_uint8)     # (N, S, S) in [0, 1]
    save_overlays(images_uint8, maps, "cams/", names=["a", "b"], titles=["malignant 0.91", ...])

The maps come from the ``grad-cam`` package (``pytorch_grad_cam.GradCAM`` with
``ClassifierOutputTarget``) on the whole :class:`~medxfer.models.adapt.MedxferNet`, so the input
normalisation the model was trained with is applied. The target layer defaults to the network's
last feature stage (timm ``feature_info[-1]``); for EfficientNets it is ``bn2`` (after the head
convolution, same resolution, the layer Grad-CAM works best on). A last stage has stride 32: at
64 px its map would be 2x2, too coarse to point at anything, so for small inputs the default is the
last stage whose map is at least 4x4 (``blocks.4`` of an EfficientNet at 64 px, stride 16); the maps
stay coarse (one cell = 16 px) and ``--layer bn2`` forces the last stage. Names are relative to the
timm network (``model.net``; a ``net.`` prefix is accepted).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medxfer.data.augment import TTA
from medxfer.errors import MedxferError, did_you_mean
from medxfer.evaluation.decisions import decide
from medxfer.evaluation.tasks import probabilities
from medxfer.evaluation.plots import to_png

__all__ = ["class_index", "default_layer", "explain_images", "feature_map_size", "overlay",
           "predict_classes", "resolve_layer", "save_overlays"]


MIN_MAP_SIZE = 4  # the default layer is the last stage whose map is at least this wide


def default_layer(net: nn.Module, image_size: int | None = None) -> str:
    """The default Grad-CAM layer of a timm network: the last ``feature_info`` stage (``layer4`` for
    ResNets; for EfficientNets ``bn2``, the head conv's BN-act at the same resolution).

    With ``image_size``, when that stage's map would be narrower than :data:`MIN_MAP_SIZE` (2x2 for a
    stride-32 stage at 64 px: a map that cannot localise anything), the last stage that is at least
    that wide is taken instead (``blocks.4``, 4x4, for an EfficientNet at 64 px).
    """
    names = dict(net.named_modules())
    info = getattr(net, "feature_info", None)
    stages = [(d["module"], d.get("reduction") or 1) for d in info] if isinstance(info, list) else []
    if not stages:
        raise MedxferError(f"no default Grad-CAM layer for '{type(net).__name__}' (no timm feature_info). "
                           "Pass --layer NAME, e.g. one of: " + ", ".join(_some_layers(net)) + ".")
    last = "bn2" if "conv_head" in names and "bn2" in names else stages[-1][0]  # EfficientNet / MobileNet
    if image_size and image_size // stages[-1][1] < MIN_MAP_SIZE:
        wide = [m for m, r in stages if image_size // r >= MIN_MAP_SIZE]
        if wide:
            return wide[-1]
    return last


def _some_layers(net: nn.Module, k: int = 8) -> list[str]:
    info = getattr(net, "feature_info", None) or []
    stages = [d["module"] for d in info] if isinstance(info, list) else []
    tops = [n for n, _ in net.named_children()]
    return list(dict.fromkeys(stages + tops))[:k]


def network(model: nn.Module) -> nn.Module:
    """The network inside a run loaded with its test-time augmentation (``Run.load_model()``): Grad-CAM
    explains the network on the image itself, as ``medxfer explain`` and the report do."""
    return model.model if isinstance(model, TTA) else model


def resolve_layer(model: nn.Module, layer: str | None = None, image_size: int | None = None) -> tuple[str, nn.Module]:
    """``(name, module)`` for ``layer`` (relative to the timm network, ``net.`` prefix allowed), or the
    default layer for ``image_size`` when ``layer`` is None. Unknown names raise MedxferError."""
    model = network(model)
    net = model.net if hasattr(model, "net") else model
    name = default_layer(net, image_size) if layer is None else layer.strip()
    if name.startswith("net."):
        name = name[4:]
    modules = dict(net.named_modules())
    if name not in modules or name == "":
        raise MedxferError(f"unknown layer '{layer}' in '{type(net).__name__}'.{did_you_mean(name, modules)} "
                           f"Valid names include: {', '.join(_some_layers(net))} (any name from "
                           "model.net.named_modules()).")
    return name, modules[name]


def _as_float(images) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim not in (4, 5):
        raise MedxferError(f"Grad-CAM needs images (N, C, S, S) or volumes (N, C, S, S, S). Got shape "
                           f"{tuple(x.shape)} instead.")
    return x.float().div(255) if x.dtype == torch.uint8 else x.float()


def _output_shape(model: nn.Module, module: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    seen = {}

    def hook(m, i, o):  # a forward hook must return None, or it replaces the output
        seen.setdefault("shape", tuple(getattr(o, "shape", ())))

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen.get("shape", ())


def feature_map_size(model: nn.Module, meta, layer: str | None = None) -> tuple[str, tuple[int, ...]]:
    """The target layer's name and the spatial size of its output at the run's input size (``meta``: a
    :class:`~medxfer.runs.ModelMeta`)."""
    name, module = resolve_layer(model, layer, meta.image_size)
    x = torch.zeros(1, meta.data_chans, *([meta.image_size] * getattr(meta, "spatial_dims", 2)))
    return name, _output_shape(model, module, x)[2:]


def predict_classes(model: nn.Module, meta, images) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities (N, K) and predicted class indices (:func:`~medxfer.evaluation.decisions.decide`)."""
    x = _as_float(images)
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + 64]) for i in range(0, len(x), 64)]).numpy() if len(x) else \
            np.zeros((0, meta.outputs))
    probs = probabilities(meta.task, logits, meta.temperature)
    return probs, decide(probs, meta)


def class_index(meta, target_class) -> int:
    labels = [str(x) for x in meta.labels]
    if isinstance(target_class, (int, np.integer)) and 0 <= target_class < len(labels):
        return int(target_class)
    if str(target_class) in labels:
        return labels.index(str(target_class))
    raise MedxferError(f"--class '{target_class}' is not a class of this run.{did_you_mean(str(target_class), labels)} "
                       f"The classes are: {', '.join(labels)}.")


def explain_images(model: nn.Module, meta, images_uint8, layer: str | None = None,
                   target_class=None, batch_size: int = 32) -> np.ndarray:
    """Grad-CAM maps (N, S, S) in [0, 1] for uint8 images (N, C, S, S) (or float in [0, 1]).

    ``target_class``: a class name or index explained for every image, or a sequence of class indices
    (one per image); None explains each image's predicted class (threshold on the positive class
    for binary runs). Each map is scaled to [0, 1]
    on its own (an all-zero map means no positive evidence at that layer).
    """
    from pytorch_grad_cam import GradCAM  # grad-cam pulls in opencv: only when maps are made
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = network(model)
    x = _as_float(images_uint8)
    _, module = resolve_layer(model, layer, x.shape[-1])
    if target_class is None:
        classes = predict_classes(model, meta, x)[1]
    elif np.ndim(target_class) == 1:
        classes = np.asarray([class_index(meta, int(c)) for c in target_class])
        if len(classes) != len(x):
            raise MedxferError(f"target_class has {len(classes)} entries for {len(x)} images; give one per image.")
    else:
        classes = np.full(len(x), class_index(meta, target_class))
    _check_spatial(model, module, x[:1], layer)
    model.eval()
    if x.dim() == 5:
        return _volume_cams(model, module, x, classes, batch_size)
    maps = []
    with GradCAM(model=model, target_layers=[module]) as cam:
        for i in range(0, len(x), batch_size):
            targets = [ClassifierOutputTarget(int(c)) for c in classes[i:i + batch_size]]
            maps.append(cam(input_tensor=x[i:i + batch_size], targets=targets))
    out = np.concatenate(maps) if maps else np.zeros((0, *x.shape[-2:]), np.float32)
    return np.clip(np.nan_to_num(out), 0, 1).astype(np.float32)


def _check_spatial(model, module, x, layer) -> None:
    shape = _output_shape(model, module, x)
    if len(shape) != x.dim():
        raise MedxferError(f"Grad-CAM needs a layer with a (N, C, H, W) output; layer '{layer or 'default'}' gives "
                           f"shape {shape}. Pass --layer with a convolutional stage, e.g. one of: "
                           f"{', '.join(_some_layers(model.net if hasattr(model, 'net') else model))}.")


def _volume_cams(model: nn.Module, module: nn.Module, x: torch.Tensor, classes, batch_size: int) -> np.ndarray:
    """Grad-CAM of volumes: the layer's activations weighted by their depth/height/width-averaged gradients
    for each image's class, ReLU, trilinearly upsampled to the input, each scaled to [0, 1] -> (N, D, H, W).
    (Written out rather than taken from pytorch-grad-cam, whose 3-D path orders the output axes differently.)"""
    seen = {}

    def hook(m, i, o):
        seen["a"] = o
        o.register_hook(lambda g: seen.__setitem__("g", g))

    handle = module.register_forward_hook(hook)
    out = []
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].clone().requires_grad_(True)
            logits = model(xb)
            idx = torch.as_tensor(np.asarray(classes[i:i + batch_size]), dtype=torch.long)
            model.zero_grad(set_to_none=True)
            logits.gather(1, idx[:, None]).sum().backward()
            a, g = seen["a"].detach(), seen["g"].detach()
            cam = torch.relu((g.mean(dim=(2, 3, 4), keepdim=True) * a).sum(1, keepdim=True))
            cam = F.interpolate(cam, size=tuple(x.shape[-3:]), mode="trilinear", align_corners=False)[:, 0]
            top = cam.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1, 1)
            out.append((cam / top).numpy())
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    return np.clip(np.nan_to_num(np.concatenate(out)), 0, 1).astype(np.float32)


def mid_planes(vol: np.ndarray) -> np.ndarray:
    """A volume (..., D, H, W) as its three mid-planes side by side: axial | coronal | sagittal (..., H, W + D + D),
    each plane resized to H rows when D differs (nearest)."""
    vol = np.asarray(vol)
    d, h, w = vol.shape[-3:]
    axial, coronal, sagittal = vol[..., d // 2, :, :], vol[..., ::-1, h // 2, :], vol[..., ::-1, :, w // 2]
    rows = np.linspace(0, d - 1, h).round().astype(int)  # depth rows to H rows (cubic volumes: unchanged)
    return np.concatenate([axial, coronal[..., rows, :], sagittal[..., rows, :]], axis=-1)


def overlay(image, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """A grey (or RGB) image (C, S, S) uint8 / (S, S) with a jet-coloured map on top -> RGB float (S, S, 3).
    A volume (C, D, H, W) with a map (D, H, W) is drawn as its three mid-planes (:func:`mid_planes`)."""
    from matplotlib import colormaps  # matplotlib: only when an overlay is drawn

    if np.ndim(cam) == 3:
        image, cam = mid_planes(image), mid_planes(cam)
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:
        img = img.mean(0) if img.shape[0] != 3 else img.transpose(1, 2, 0)
    if img.max() > 1.0:
        img = img / 255.0
    base = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img
    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3]
    return np.clip((1 - alpha) * base + alpha * heat, 0, 1)


def save_overlays(images_uint8, maps: np.ndarray, out_dir: str | Path, names: list[str],
                  titles: list[str] | None = None, dpi: int = 100) -> list[Path]:
    """One PNG per image, ``out_dir/<name>.png``: the image beside it with its jet heat map, titled."""
    from matplotlib.figure import Figure  # matplotlib: only when overlays are saved

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = np.asarray(images_uint8)
    paths = []
    for i, name in enumerate(names):
        fig = Figure(figsize=(6, 3.4), layout="constrained")
        axes = fig.subplots(1, 2)
        img = images[i].astype(np.float32) / 255.0
        if img.ndim == 4:  # a volume: its mid-planes
            img = mid_planes(img)
        if img.ndim == 3 and img.shape[0] == 3:
            axes[0].imshow(img.transpose(1, 2, 0))
        else:
            axes[0].imshow(img.mean(0) if img.ndim == 3 else img, cmap="gray", vmin=0, vmax=1)
        axes[0].set_title("image", fontsize=9)
        axes[1].imshow(overlay(images[i], maps[i]))
        axes[1].set_title("Grad-CAM (jet: red = strongest evidence)", fontsize=8)
        for ax in axes:
            ax.axis("off")
        if titles:
            fig.suptitle(titles[i], fontsize=10)
        path = out_dir / f"{name}.png"
        path.write_bytes(to_png(fig, dpi=dpi))
        paths.append(path)
    return paths


