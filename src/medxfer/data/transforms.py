"""Preprocessing, done once at load: images resized to uint8, channels matched to the model's.

Usage::

    x8 = resize_to_uint8(arrays_float_0_1, size=64)      # (N, C, S, S) uint8, done once
    x = match_channels(x, 3)                             # (C, H, W) float: grey to RGB, RGB to luma

Augmentation on batch tensors (every step) is :mod:`medxfer.data.augment`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


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
