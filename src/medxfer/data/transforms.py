"""Preprocessing (once, at load) and augmentation (on batch tensors, every step).

Usage::

    x8 = resize_to_uint8(arrays_float_0_1, size=64)      # (N, C, S, S) uint8, done once
    aug = Augment("light", seed=0); xb = aug(xb)         # xb float (B, C, S, S) in [0, 1]

Presets suit grey medical images: no colour jitter, no vertical flips; ``light`` (default) is a small
random affine (rotation, scale, shift) plus brightness/contrast; ``strong`` adds horizontal flips and
wider ranges (only where left/right anatomy does not matter); ``none`` turns it off.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from medxfer.errors import MedxferError

PRESETS = {
    "none": None,
    "light": dict(rotate=10.0, scale=0.10, shift=0.06, brightness=0.10, contrast=0.10, hflip=False),
    "strong": dict(rotate=20.0, scale=0.20, shift=0.10, brightness=0.20, contrast=0.20, hflip=True),
}


def resize_to_uint8(x: torch.Tensor | np.ndarray, size: int) -> torch.Tensor:
    """Float images in [0, 1], (N, C, H, W) -> uint8 (N, C, size, size), antialiased bilinear; volumes
    (N, C, D, H, W) -> (N, C, size, size, size), trilinear (area-averaged when shrinking)."""
    x = torch.as_tensor(x, dtype=torch.float32)
    if x.dim() == 5:
        if x.shape[-3:] != (size, size, size):
            shrink = all(s >= size for s in x.shape[-3:])
            x = F.interpolate(x, size=(size, size, size), mode="area" if shrink else "trilinear",
                              **({} if shrink else {"align_corners": False}))
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


#: RGB to grey: ITU-R BT.601 luma, the one rule for files, arrays and batches
GREY_WEIGHTS = (0.299, 0.587, 0.114)


def match_channels(x: np.ndarray, chans: int) -> np.ndarray:
    """(C, H, W) float -> (chans, H, W): grey replicated to RGB, RGB to luma (:data:`GREY_WEIGHTS`)."""
    if x.shape[0] == chans:
        return x
    if chans == 3:
        return np.repeat(x[:1], 3, axis=0)
    r, g, b = GREY_WEIGHTS
    return (r * x[0:1] + g * x[1:2] + b * x[2:3]).astype(np.float32)


def match_channels_uint8(x: torch.Tensor, chans: int) -> torch.Tensor:
    """uint8 batch (N, C, S, S) -> (N, chans, S, S) by the same rule as :func:`match_channels`."""
    if x.shape[1] == chans:
        return x
    if chans == 3:
        return x.expand(-1, 3, *([-1] * (x.dim() - 2))).contiguous()
    w = torch.tensor(GREY_WEIGHTS, dtype=torch.float32).view(1, 3, *([1] * (x.dim() - 2)))
    return (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


class Augment:
    """Random augmentation of a float batch (B, C, S, S) in [0, 1], one draw per image."""

    def __init__(self, preset: str = "light", seed: int = 0):
        if preset not in PRESETS:
            raise MedxferError(f"The augmentation preset must be one of {list(PRESETS)}. Got '{preset}' instead.")
        self.preset = preset
        self.params = PRESETS[preset]
        self.gen = torch.Generator().manual_seed(seed)

    def __bool__(self) -> bool:
        return self.params is not None

    def _u(self, n: int, scale: float) -> torch.Tensor:
        return (torch.rand(n, generator=self.gen) * 2 - 1) * scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.params is None:
            return x
        p, n = self.params, x.shape[0]
        angle = self._u(n, math.radians(p["rotate"]))
        scale = 1 + self._u(n, p["scale"])
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        flip = torch.where(torch.rand(n, generator=self.gen) < 0.5, -1.0, 1.0) if p["hflip"] else torch.ones(n)
        theta = torch.stack([torch.stack([cos * flip, -sin, self._u(n, p["shift"]) * 2], 1),
                             torch.stack([sin * flip, cos, self._u(n, p["shift"]) * 2], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid.to(x.device), mode="bilinear", padding_mode="border", align_corners=False)
        b = self._u(n, p["brightness"]).view(n, 1, 1, 1).to(x)
        c = (1 + self._u(n, p["contrast"])).view(n, 1, 1, 1).to(x)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return ((x - mean) * c + mean + b).clamp(0, 1)
