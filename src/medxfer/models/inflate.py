"""Inflate a 2-D timm network to 3-D for CT/MRI volumes (N, C, D, H, W), keeping its 2-D weights.

Usage::

    net = model.net                                   # a 2-D timm EfficientNet/ResNet with ImageNet weights
    inflate_to_3d(net, mode="i3d")                    # converts in place and returns net
    feats = net.forward_head(net.forward_features(vol), pre_logits=True)   # vol: (N, C, D, H, W)
    model.mean, model.std = expand_norm_buffers(model.mean, model.std, spatial_dims=3)

Modes:

- ``i3d`` (Carreira & Zisserman 2017): a k x k kernel becomes k x k x k, the 2-D kernel repeated over
  depth and divided by k; stride, dilation and padding of the height axis are carried over to depth.
  A volume that is constant along depth then gives exactly the 2-D network's response to one slice.
- ``acs`` (Yang et al. 2021, "Reinventing 2D convolutions for 3D images"): each 2-D kernel is kept as
  it is (same weight shape, so a 2-D state dict loads as is); the output channels are split in thirds
  that convolve the axial (H, W), coronal (D, W) and sagittal (D, H) planes. For a depth-constant
  input the axial third of a convolution is the 2-D convolution of each slice (so at the stem; deeper
  layers mix in the other planes, so ACS features are not the 2-D features). Implemented here: the
  ``acsconv`` package (0.1.1) breaks on torch >= 2 BatchNorm, leaves timm's BatchNormAct2d, TF
  "same" padding and squeeze-excite 2-D, and fails on depthwise convs with odd sizes.

Both modes turn BatchNorm into BatchNorm3d with the same statistics, pools into 3-D pools, global
pooling and squeeze-excite into means over (D, H, W), and keep timm's TF "same" padding (computed
per axis from the input size, as TensorFlow does).

``depth_padding``: ``replicate`` (default) pads the depth axis with copies of the border slices, so
a depth-constant volume stays depth-constant through every layer and the I3D property holds for any
depth, borders included (zero padding would dim the border slices by 1/k per layer, a shift the 2-D
batch-norm statistics never saw). ``zeros`` is plain Conv3d padding (the I3D and ACS papers'), exact
only away from the depth borders. Height and width are padded as in the 2-D network.

``reset_classifier`` keeps working: the new global pool it makes is inflated too. A fresh 2-D net
inflated with the same mode takes the inflated net's state dict (the way to reload a trained model).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, Conv2dSame, DropPath, SelectAdaptivePool2d
from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool, FastAdaptiveMaxPool
from timm.layers.conv2d_same import Conv2dSameExport
from timm.layers.padding import get_same_padding
from timm.layers.squeeze_excite import SEModule
from timm.models._efficientnet_blocks import (
    ConvBnAct,
    DepthwiseSeparableConv,
    EdgeResidual,
    InvertedResidual,
    SqueezeExcite,
)
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from medxfer.errors import MedxferError

__all__ = ["MODES", "ACSConv", "BatchNormAct3d", "InflatedConv3d", "expand_norm_buffers", "inflate_to_3d"]

MODES = ("i3d", "acs")
DEPTH_PADDINGS = ("replicate", "zeros")
_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def inflate_to_3d(net: nn.Module, mode: str = "i3d", *, depth_padding: str = "replicate") -> nn.Module:
    """Convert the 2-D timm ``net`` to 3-D in place and return it (same class, same module names).

    Raises :class:`MedxferError` naming the first layer it cannot convert, before changing anything.
    """
    if mode not in MODES:
        raise MedxferError(f"The 'mode' parameter must be 'i3d' or 'acs'. Got '{mode}' instead.")
    if depth_padding not in DEPTH_PADDINGS:
        raise MedxferError(
            f"The 'depth_padding' parameter must be 'replicate' or 'zeros'. Got '{depth_padding}' instead.")
    if getattr(net, "inflated_3d", None):
        raise MedxferError("The 'net' parameter must be a 2-D network. "
                           f"Got one already inflated ({net.inflated_3d['mode']}) instead.")
    _check_supported(net, mode)
    net = _convert(net, mode, depth_padding)
    net.inflated_3d = {"mode": mode, "depth_padding": depth_padding}
    if callable(getattr(type(net), "reset_classifier", None)):
        net.reset_classifier = functools.partial(_reset_classifier_3d, net)
    return net


def expand_norm_buffers(mean, std, spatial_dims: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean/std as float tensors of shape (1, C) + (1,) * spatial_dims, to broadcast over (N, C, D, H, W).

    Takes sequences or tensors of any shape holding C values (e.g. ``MedxferNet``'s (1, C, 1, 1)
    buffers): ``model.mean, model.std = expand_norm_buffers(model.mean, model.std)`` replaces them
    in place (same buffer names, so state dicts keep their keys). Note for ``MedxferNet.normalize``:
    expanding grey to the RGB stem needs ``x.expand(-1, C, *x.shape[2:])`` for 5-D input.
    """
    if spatial_dims not in (1, 2, 3):
        raise MedxferError(f"The 'spatial_dims' parameter must be 1, 2 or 3. Got {spatial_dims} instead.")
    shape = (1, -1) + (1,) * spatial_dims
    return (torch.as_tensor(mean, dtype=torch.float32).reshape(shape),
            torch.as_tensor(std, dtype=torch.float32).reshape(shape))


# ---------------------------------------------------------------------------------------------
# 3-D layers


class InflatedConv3d(nn.Conv3d):
    """Conv3d with explicit per-axis padding: fixed pairs, or TF "same" computed from the input size."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, dilation, groups, bias,
                 pads, depth_mode: str, hw_mode: str, **dd):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias, **dd)
        self.pads, self.depth_mode, self.hw_mode = pads, depth_mode, hw_mode  # pads None: TF same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = self.pads or _same_pads(x.shape[-3:], self.kernel_size, self.stride, self.dilation)
        return _conv3d(x, self.weight, self.bias, self.stride, self.dilation, self.groups, pads,
                       self.depth_mode, self.hw_mode)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pads={self.pads or 'tf_same'}, depth_mode={self.depth_mode}"


class ACSConv(nn.Module):
    """A 2-D kernel applied on three planes: output channels split axial (H,W) / coronal (D,W) / sagittal (D,H).

    ``weight`` keeps the 2-D shape (out, in/groups, k, k). Square kernels, standard (groups=1) or
    depthwise; 1x1 kernels are plain pointwise convolutions (any groups). Along the axis a third does
    not convolve it reads the voxel under the kernel centre, so all thirds give the same output size
    (for TF "same" and even kernels too): it equals a Conv3d whose k x k x k kernel holds the 2-D kernel
    in its centre plane across that axis.
    """

    def __init__(self, conv: nn.Conv2d, pads2d, depth_mode: str, hw_mode: str):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = conv.in_channels, conv.out_channels, conv.groups
        kh, kw = conv.kernel_size
        self.kernel_size = (kh, kh, kw)  # the I3D extent; each third uses 1 along one axis
        self.stride = (conv.stride[0], *conv.stride)
        self.dilation = (conv.dilation[0], *conv.dilation)
        self.pads = None if pads2d is None else (pads2d[0], *pads2d)
        self.depth_mode, self.hw_mode = depth_mode, hw_mode
        self.depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
        o = conv.out_channels
        self.split = ((o + 2) // 3, (o + 1) // 3, o // 3)
        self.weight = conv.weight
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = self.pads or _same_pads(x.shape[-3:], self.kernel_size, self.stride, self.dilation)
        if self.kernel_size == (1, 1, 1):
            return _conv3d(x, self.weight[:, :, None], self.bias, self.stride, self.dilation, self.groups,
                           pads, self.depth_mode, self.hw_mode)
        outs, lo = [], 0
        for axis, n in zip((2, 3, 4), self.split):
            if n == 0:
                continue
            xi = x[:, lo:lo + n] if self.depthwise else x
            a = axis - 2  # the axis this third does not convolve: take the kernel centre's position there
            k, d = self.kernel_size[a], self.dilation[a]
            xi = _centre_take(xi, axis, pads[a], d * (k - 1) + 1, d * ((k - 1) // 2), self.stride[a],
                              self.depth_mode if a == 0 else self.hw_mode)
            plane_pads = tuple((0, 0) if i == a else p for i, p in enumerate(pads))
            outs.append(_conv3d(xi, self.weight[lo:lo + n].unsqueeze(axis), None, self.stride, self.dilation,
                                n if self.depthwise else 1, plane_pads, self.depth_mode, self.hw_mode))
            lo += n
        y = torch.cat(outs, 1)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1, 1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size[1:]}, stride={self.stride}, "
                f"groups={self.groups}, split={self.split}, pads={self.pads or 'tf_same'}, "
                f"depth_mode={self.depth_mode}")


class BatchNormAct3d(nn.BatchNorm3d):
    """timm's BatchNormAct2d for volumes: BatchNorm3d, then its drop and activation (same state dict keys)."""

    def __init__(self, num_features, eps, momentum, affine, track_running_stats, drop, act, **dd):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **dd)
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class SqueezeExcite3d(SqueezeExcite):
    """EfficientNet squeeze-excite with the squeeze over every spatial axis."""

    def forward(self, x):
        x_se = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3, 4), keepdim=True))))
        return x * self.gate(x_se)


class SEModule3d(SEModule):
    """timm's SEModule with the squeeze over every spatial axis."""

    def forward(self, x):
        x_se = x.mean((2, 3, 4), keepdim=True)
        if self.add_maxpool:
            x_se = 0.5 * x_se + 0.5 * x.amax((2, 3, 4), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.bn(self.fc1(x_se)))))


class GlobalPool3d(nn.Module):
    """Mean or max over (D, H, W); flattened to (N, C) or kept as (N, C, 1, 1, 1)."""

    def __init__(self, kind: str, flatten: bool):
        super().__init__()
        self.kind, self.flatten = kind, flatten

    def forward(self, x):
        keep = not self.flatten
        return x.mean((2, 3, 4), keepdim=keep) if self.kind == "avg" else x.amax((2, 3, 4), keepdim=keep)


class AvgPool3dSeparable(nn.Module):
    """AvgPool3d as a depth pool then a (H, W) pool: same numbers, and, like AvgPool2d, volumes smaller
    than the kernel are fine (torch's avg_pool3d refuses them even when padding or ceil_mode covers it)."""

    def __init__(self, kernel_size, stride, padding, ceil_mode: bool, count_include_pad: bool, depth_mode: str):
        super().__init__()
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), tuple(stride), tuple(padding)
        self.ceil_mode, self.count_include_pad, self.depth_mode = ceil_mode, count_include_pad, depth_mode

    def forward(self, x):
        (kd, kh, kw), (sd, sh, sw), (pd, ph, pw) = self.kernel_size, self.stride, self.padding
        if self.depth_mode != "constant" and pd:
            x, pd = _pad_axis(x, 2, pd, pd, self.depth_mode), 0
        _, c, d, h, w = x.shape
        ceil, cip = self.ceil_mode, self.count_include_pad
        x = F.avg_pool2d(x.reshape(-1, c, d, h * w), (kd, 1), (sd, 1), (pd, 0), ceil, cip)
        d = x.shape[2]
        x = F.avg_pool2d(x.reshape(-1, c * d, h, w), (kh, kw), (sh, sw), (ph, pw), ceil, cip)
        return x.reshape(-1, c, d, *x.shape[-2:])


class Pad3d(nn.Module):
    """Fixed padding ((d0, d1), (h0, h1), (w0, w1)): height/width in ``mode``, depth in ``depth_mode``."""

    def __init__(self, pads, mode: str, value: float, depth_mode: str):
        super().__init__()
        self.pads, self.mode, self.value, self.depth_mode = tuple(map(tuple, pads)), mode, value, depth_mode

    def forward(self, x):
        (d0, d1), (h0, h1), (w0, w1) = self.pads
        if self.depth_mode == self.mode:
            kw = {"value": self.value} if self.mode == "constant" else {}
            return F.pad(x, (w0, w1, h0, h1, d0, d1), mode=self.mode, **kw)
        x = _pad_axis(x, 2, d0, d1, self.depth_mode)
        if h0 or h1 or w0 or w1:
            kw = {"value": self.value} if self.mode == "constant" else {}
            x = F.pad(x, (w0, w1, h0, h1, 0, 0), mode=self.mode, **kw)
        return x


# ---------------------------------------------------------------------------------------------
# padding helpers (pads: ((d0, d1), (h0, h1), (w0, w1)))


def _same_pads(size, kernel, stride, dilation):
    pads = []
    for n, k, s, d in zip(size, kernel, stride, dilation):
        total = get_same_padding(int(n), k, s, d)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


def _pad_axis(x, axis, lo, hi, mode):
    if not (lo or hi):
        return x
    pad = [0] * 6
    pad[2 * (4 - axis)], pad[2 * (4 - axis) + 1] = lo, hi
    return F.pad(x, pad, mode=mode)


def _conv3d(x, weight, bias, stride, dilation, groups, pads, depth_mode, hw_mode):
    (d0, d1), (h0, h1), (w0, w1) = pads
    native = [0, 0, 0]
    if depth_mode == "constant" and d0 == d1:
        native[0] = d0
    else:
        x = _pad_axis(x, 2, d0, d1, depth_mode)
    if hw_mode == "constant" and h0 == h1 and w0 == w1:
        native[1:] = [h0, w0]
    elif h0 or h1 or w0 or w1:
        x = F.pad(x, (w0, w1, h0, h1, 0, 0), mode=hw_mode)
    return F.conv3d(x, weight, bias, stride, tuple(native), dilation, groups)


def _centre_take(x, axis, pad, extent, centre, stride, mode):
    """Along ``axis``, the positions a kernel of ``extent`` (padded by ``pad``) has its centre on.

    A kernel-1 conv with ``stride`` over the result gives exactly the full kernel's output length.
    """
    lo, hi = pad
    n = x.shape[axis]
    out = (n + lo + hi - extent) // stride + 1
    start = centre - lo
    length = (out - 1) * stride + 1
    front, back = max(0, -start), max(0, start + length - n)
    x = _pad_axis(x, axis, front, back, mode)
    return x.narrow(axis, start + front, length)


# ---------------------------------------------------------------------------------------------
# conversion


_CONVS_2D = (nn.Conv2d, Conv2dSame, Conv2dSameExport)
_PADS_2D = {nn.ZeroPad2d: "constant", nn.ConstantPad2d: "constant", nn.ReflectionPad2d: "reflect",
            nn.ReplicationPad2d: "replicate"}
_CONVERTIBLE = (*_CONVS_2D, *_PADS_2D, nn.BatchNorm2d, BatchNormAct2d, nn.MaxPool2d, nn.AvgPool2d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, FastAdaptiveAvgPool, FastAdaptiveMaxPool,
                SqueezeExcite, SEModule, nn.Dropout2d)
_CONTAINERS = (EfficientNet, ResNet, DepthwiseSeparableConv, InvertedResidual, EdgeResidual, ConvBnAct,
               BasicBlock, Bottleneck, SelectAdaptivePool2d, nn.Sequential, nn.ModuleList, nn.ModuleDict)
_ELEMENTWISE = (nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                nn.Hardsigmoid, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Dropout, nn.Linear, nn.Flatten, DropPath)
_DONE_3D = (InflatedConv3d, ACSConv, nn.BatchNorm3d, BatchNormAct3d, nn.MaxPool3d, AvgPool3dSeparable,
            nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, GlobalPool3d, Pad3d, nn.Dropout3d,
            SqueezeExcite3d, SEModule3d)


def _check_supported(net: nn.Module, mode: str) -> None:
    for name, m in net.named_modules():
        t = type(m)
        where = f"layer '{name or '(root)'}' of type '{t.__name__}'"
        if t in _CONVS_2D and mode == "acs" and tuple(m.kernel_size) != (1, 1):
            if m.kernel_size[0] != m.kernel_size[1] or m.dilation[0] != m.dilation[1]:
                raise MedxferError(f"ACS inflation needs square kernels: {where} has kernel {tuple(m.kernel_size)}, "
                                   f"dilation {tuple(m.dilation)}. Use mode 'i3d' for this network.")
            if not (m.groups == 1 or m.groups == m.in_channels == m.out_channels):
                raise MedxferError(f"ACS inflation supports standard and depthwise convolutions only: {where} has "
                                   f"groups={m.groups}. Use mode 'i3d' for this network.")
        if t is nn.AvgPool2d and m.divisor_override:
            raise MedxferError(f"inflate_to_3d cannot convert {where}: its divisor_override has no 3-D equivalent.")
        if t in _PADS_2D and mode == "acs":
            raise MedxferError(f"ACS inflation cannot follow a separate padding layer: {where}. Use mode 'i3d'.")
        if t in _CONVERTIBLE or t in _CONTAINERS or t in _ELEMENTWISE or t in _DONE_3D:
            continue
        if t.__module__.startswith("timm.layers.activations"):
            continue  # timm's element-wise activations (Swish, HardSwish, GELU, ...)
        raise MedxferError(
            f"inflate_to_3d cannot convert {where} to 3-D: supported are timm EfficientNet/ResNet networks made of "
            "Conv2d (incl. TF 'same'), BatchNorm2d, 2-D pools and padding, squeeze-excite and element-wise layers."
        )


def _convert(module: nn.Module, mode: str, depth_padding: str) -> nn.Module:
    new = _convert_one(module, mode, depth_padding)
    for name, child in list(new.named_children()):
        converted = _convert(child, mode, depth_padding)
        if converted is not child:
            setattr(new, name, converted)
    return new


def _reset_classifier_3d(net: nn.Module, num_classes: int, global_pool: str | None = None) -> None:
    type(net).reset_classifier(net, num_classes, global_pool)
    _check_supported(net, net.inflated_3d["mode"])
    _convert(net, net.inflated_3d["mode"], net.inflated_3d["depth_padding"])


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _dd(m: nn.Module) -> dict:
    t = next(iter(m.parameters()), None)
    t = t if t is not None else next(iter(m.buffers()), None)
    return {} if t is None else {"device": t.device, "dtype": t.dtype}


def _static_pads(conv: nn.Conv2d):
    """The 2-D conv's padding as ((top, bottom), (left, right)); torch 'same' puts the odd pixel last."""
    p = conv.padding
    if p == "valid":
        return ((0, 0), (0, 0))
    if p == "same":
        totals = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
        return tuple((t // 2, t - t // 2) for t in totals)
    return tuple((int(q), int(q)) for q in p)


def _convert_one(m: nn.Module, mode: str, depth_padding: str) -> nn.Module:
    t = type(m)
    depth_mode = "replicate" if depth_padding == "replicate" else None
    if t in _CONVS_2D:
        hw_mode = _PAD_MODES[m.padding_mode]
        pads2d = None if t is not nn.Conv2d else _static_pads(m)
        if mode == "acs":
            new = ACSConv(m, pads2d, depth_mode or hw_mode, hw_mode)
        else:
            kh, kw = m.kernel_size
            new = InflatedConv3d(m.in_channels, m.out_channels, (kh, kh, kw), (m.stride[0], *m.stride),
                                 (m.dilation[0], *m.dilation), m.groups, m.bias is not None,
                                 None if pads2d is None else (pads2d[0], *pads2d), depth_mode or hw_mode,
                                 hw_mode, device="meta")  # no random init: the weights come next
            weight = m.weight.detach().unsqueeze(2).repeat(1, 1, kh, 1, 1) / kh
            new.weight = nn.Parameter(weight, requires_grad=m.weight.requires_grad)
            if m.bias is not None:
                new.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
    elif t in (nn.BatchNorm2d, BatchNormAct2d):
        args = (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        if t is BatchNormAct2d:
            new = BatchNormAct3d(*args, m.drop, m.act, **_dd(m))
        else:
            new = nn.BatchNorm3d(*args, **_dd(m))
        new.load_state_dict(m.state_dict(), strict=False)  # the drop/act children hold no state
        for name, p in m.named_parameters(recurse=False):
            getattr(new, name).requires_grad_(p.requires_grad)
    elif t is nn.MaxPool2d:
        k, s, p, d = (_pair(v) for v in (m.kernel_size, m.stride, m.padding, m.dilation))
        new = nn.MaxPool3d((k[0], *k), (s[0], *s), (p[0], *p), (d[0], *d), m.return_indices, m.ceil_mode)
    elif t is nn.AvgPool2d:
        k, s, p = (_pair(v) for v in (m.kernel_size, m.stride, m.padding))
        new = AvgPool3dSeparable((k[0], *k), (s[0], *s), (p[0], *p), m.ceil_mode, m.count_include_pad,
                                 depth_mode or "constant")
    elif t in (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d):
        o = _pair(m.output_size)
        cls = nn.AdaptiveAvgPool3d if t is nn.AdaptiveAvgPool2d else nn.AdaptiveMaxPool3d
        new = cls((o[0], *o))
    elif t in (FastAdaptiveAvgPool, FastAdaptiveMaxPool):
        new = GlobalPool3d("avg" if t is FastAdaptiveAvgPool else "max", m.flatten)
    elif t in (SqueezeExcite, SEModule):
        m.__class__ = SqueezeExcite3d if t is SqueezeExcite else SEModule3d  # same children and state
        return m
    elif t in _PADS_2D:
        left, right, top, bottom = m.padding
        kind = _PADS_2D[t]
        new = Pad3d(((top, bottom), (top, bottom), (left, right)), kind, float(getattr(m, "value", 0.0)),
                    depth_mode or kind)
    elif t is nn.Dropout2d:
        new = nn.Dropout3d(m.p, m.inplace)
    else:
        return m
    return new.train(m.training)

