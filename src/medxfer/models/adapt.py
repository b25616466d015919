"""Build the target model: source backbone (timm) + adapted input stem + new head.

Usage::

    model, info = build_model(spec, num_classes=2, in_chans=1)
    logits = model(x)            # x: float (N, C, S, S) in [0, 1]; normalisation happens inside

The model takes images in [0, 1]; the source's mean/std are buffers of the model, so predict,
export and Grad-CAM can never forget them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from medxfer.errors import MedxferError
from medxfer.models.catalog import SourceSpec
from medxfer.models.weights import source_state_dict


class MedxferNet(nn.Module):
    """A timm network with the source's input normalisation in front of it."""

    def __init__(self, net: nn.Module, mean, std, data_chans: int, spatial_dims: int = 2):
        super().__init__()
        self.net = net
        self.data_chans = data_chans
        self.net_chans = len(mean)
        self.spatial_dims = spatial_dims
        shape = (1, -1) + (1,) * spatial_dims
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.net_chans:
            x = x.expand(-1, self.net_chans, *([-1] * (x.dim() - 2)))  # grey replicated to the RGB stem
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logit features (what a frozen backbone hands the head)."""
        return self.net.forward_head(self.net.forward_features(self.normalize(x)), pre_logits=True)

    def head(self) -> nn.Module:
        return self.net.get_classifier()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def grey_contract(mean, std) -> tuple[tuple[float], tuple[float]]:
    """One-channel mean/std for a stem whose RGB weights were summed (timm ``in_chans=1``)."""
    return (float(sum(mean) / len(mean)),), (float(sum(std) / len(std)),)


def build_model(spec: SourceSpec, num_classes: int, data_chans: int, *, grey_mode: str = "sum",
                pretrained: bool = True, drop_rate: float = 0.0, spatial_dims: int = 2,
                inflate: str = "i3d") -> tuple[MedxferNet, dict]:
    """Create the target model from ``spec``; returns it and a record of what was loaded.

    ``spatial_dims=3``: the 2-D network (with the source's 2-D weights) is inflated to 3-D by
    ``inflate`` (``i3d`` or ``acs``, :mod:`medxfer.models.inflate`) and takes volumes (N, C, D, H, W).
    A 3-D source (``medxfer pretrain`` on volumes; its source.json says ``spatial_dims: 3``) already has
    the inflated layout: the network is inflated with the source's mode first, then its weights load.

    ``grey_mode`` for 1-channel data: ``sum`` (stem weights summed over RGB, timm ``in_chans=1``)
    or ``replicate`` (grey copied to three channels). Raises when the source's backbone keys do not
    match the architecture: a silently random backbone is never trained.
    """
    import timm

    if grey_mode not in ("sum", "replicate"):
        raise MedxferError(f"The grey mode must be 'sum' or 'replicate'. Got '{grey_mode}' instead.")
    net_chans = 1 if (data_chans == 1 and grey_mode == "sum") else 3  # a source's own stem is adapted to this
    net = timm.create_model(spec.arch.split(".")[0], pretrained=False, num_classes=num_classes,
                            in_chans=net_chans, drop_rate=drop_rate)
    info = {"arch": spec.arch, "source": spec.name, "weights": spec.weights, "weights_sha256": None,
            "missing_keys": [], "unexpected_keys": [], "in_chans": net_chans, "data_chans": data_chans,
            "grey_mode": grey_mode if data_chans == 1 else "rgb"}
    mean, std = spec.mean, spec.std
    if net_chans == 1 and len(mean) == 3:
        mean, std = grey_contract(mean, std)
    elif net_chans == 3 and len(mean) == 1:  # a grey source (e.g. pretrained here) into RGB data
        mean, std = tuple(mean) * 3, tuple(std) * 3
    _init_new_head(net)
    source_3d = _check_source_dims(spec, spatial_dims, inflate)
    if source_3d:  # a 3-D source's weights have the inflated layout: inflate first, then load
        _inflate(net, inflate)
    if pretrained:
        sd, digest = source_state_dict(spec, net)
        if sd is not None:
            info.update(_load_backbone(net, sd, spec, net_chans))
            info["weights_sha256"] = digest
    if spatial_dims == 3:
        if not source_3d:
            _inflate(net, inflate)
        info.update(spatial_dims=3, inflate=inflate)
    return MedxferNet(net, mean, std, data_chans, spatial_dims), info


def _inflate(net: nn.Module, mode: str) -> None:
    from medxfer.models.inflate import inflate_to_3d  # timm's layer classes: only for volumes

    inflate_to_3d(net, mode)


def _check_source_dims(spec: SourceSpec, spatial_dims: int, inflate: str) -> bool:
    """Whether ``spec`` is a 3-D source (made by ``medxfer pretrain`` on volumes); refuses what cannot use it."""
    if int(spec.extra.get("spatial_dims") or 2) != 3:
        return False
    mode = spec.extra.get("inflate") or "i3d"
    if spatial_dims != 3:
        raise MedxferError(f"source '{spec.name}' is a 3-D source (pretrained on volumes): train volumes with it "
                           "(--spatial-dims 3), or use a 2-D source for 2-D images.")
    if mode != inflate:
        raise MedxferError(f"source '{spec.name}' was made with --inflate {mode}, and its weights have that layout: "
                           f"pass --inflate {mode} (got {inflate}).")
    return True


def _init_new_head(net: nn.Module) -> None:
    """A new head starts near zero logits (timm's Goog init of a 2-class Linear gives logits of +-10)."""
    head = net.get_classifier()
    for m in head.modules() if isinstance(head, nn.Module) else []:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)


def _load_backbone(net: nn.Module, sd: dict, spec: SourceSpec, net_chans: int) -> dict:
    from timm.models import adapt_input_conv

    head_names = _head_prefixes(net)
    own = net.state_dict()
    # the source's head is kept only when it fits the target (same label space); else a new head
    sd = {k: v for k, v in sd.items()
          if not any(k.startswith(h + ".") for h in head_names) or (k in own and own[k].shape == v.shape)}
    first_conv = net.pretrained_cfg.get("first_conv") or "conv1"
    key = f"{first_conv}.weight"
    if key in sd and sd[key].shape[1] != net_chans:
        w = sd[key]  # grey source into RGB data: spread the one channel evenly (same response to grey)
        sd[key] = w.repeat(1, net_chans, *[1] * (w.dim() - 2)) / net_chans if w.shape[1] == 1 \
            else adapt_input_conv(net_chans, w)
    bad_shape = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in sd and not any(k.startswith(h + ".") for h in head_names)
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    if missing or bad_shape:
        detail = missing[:5] if missing else [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in bad_shape[:5]]
        raise MedxferError(
            f"weights for source '{spec.name}' do not match architecture '{spec.arch}': "
            f"{len(missing)} backbone keys missing, {len(bad_shape)} of the wrong shape (first: {', '.join(detail)}). "
            "medxfer will not train on a partly random backbone: pass weights made for this architecture."
        )
    net.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return {"missing_keys": [], "unexpected_keys": unexpected, "loaded_keys": len(sd) - len(unexpected)}


def _head_prefixes(net: nn.Module) -> list[str]:
    clf = net.pretrained_cfg.get("classifier") or "fc"
    return [clf] if isinstance(clf, str) else list(clf)


def target_model(arch: str, num_outputs: int, in_chans: int, mean, std, data_chans: int, spatial_dims: int = 2,
                 inflate: str = "i3d") -> MedxferNet:
    """The target network of a trained run, with random weights (load them with :func:`load_weights`)."""
    import timm

    net = timm.create_model(arch, pretrained=False, num_classes=num_outputs, in_chans=in_chans)
    if spatial_dims == 3:
        from medxfer.models.inflate import inflate_to_3d  # imports timm's layer classes: only for volumes

        inflate_to_3d(net, inflate)
    return MedxferNet(net, mean, std, data_chans, spatial_dims)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a run's ``model.safetensors`` into ``model`` (strict); a damaged or foreign file is one line."""
    from safetensors.torch import load_file

    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except Exception as e:  # noqa: BLE001 - safetensors / shape errors: a damaged or foreign file
        raise MedxferError(f"'{path}' cannot be loaded into the run's model ({type(e).__name__}): it is damaged "
                           "or from another run. Train the run again.") from None
    return model.eval()
