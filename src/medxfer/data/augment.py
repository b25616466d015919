"""Augmentation on batch tensors after a preset (medxfer.data.presets); test-time augmentation that exports to ONNX.

Usage::

    aug = Augment("xray", seed=0)             # light (default) | strong | none | generic | xray | ultrasound
    xb = aug(xb)                              #   | ct | mri | dermoscopy | fundus; xb float in [0, 1]
    Augment("fundus", hflip=False)            # --hflip / --no-hflip overrides the preset's horizontal flip
    state = aug.state_dict(); aug.load_state_dict(state)     # resume draw for draw (``aug.gen`` too)
    dataclasses.asdict(PRESETS["xray"])       # every range of a preset, for config files and the README
    corrupt(xb, "jpeg", 40)                   # one corruption at a chosen level
    net = TTA(model, n=4)                     # logits averaged over tta_views(4): pure torch, ONNX-exportable

Inputs are float batches in [0, 1]: images (B, C, H, W) or volumes (B, C, D, H, W); outputs keep the
shape, dtype, device, range and (for images) channels-last layout. Each image gets its own draw. In
order: one resample for random resized crop + rotation + shift + allowed flips (bilinear, border
padding; reflection for dermoscopy); gamma, contrast, brightness (and saturation for colour presets); then corruptions after
MedMNIST-C (Di Salvo et al. 2024) -- Gaussian, speckle and shot (Poisson) noise, Gaussian blur, JPEG,
pixelate -- each with a small probability and a severity range of its own (levels: ``CORRUPTIONS``).
Horizontal flips are off unless a preset allows them (dermoscopy, fundus) or ``hflip=True``: left and
right differ in chest X-ray, CT, MRI. Vertical flips only in dermoscopy. Volumes: crop-resize in 3-D,
in-plane rotation, shifts, flips, intensity, noise, 3-D blur and pixelate; JPEG is skipped.

Why our own sampling: every random number comes from ``self.gen`` (a CPU ``torch.Generator``), so the
same seed gives the same batch and saving ``gen``'s state (the trainer does) resumes the stream
exactly; torch's global RNG is never touched. torchvision.transforms.v2 draws one set of parameters
per call for the whole batch, from the global RNG; kornia.augmentation draws per image but from the
global RNG too (``fork_rng`` fixes that), resamples once per geometric step, is slower and would be a
new dependency. So: plain torch ops (one affine_grid + grid_sample, a separable blur, interpolate)
and Pillow's JPEG (already a dependency; torchvision.io's is faster but deprecated since 0.29).
CPU time per batch of 64 x 1 x 64 x 64, one thread (median of 5 rounds, each the best of 15):
the former ``transforms.Augment`` light 4.1 ms, strong 4.2; here ``light`` 4.1, ``generic`` 8.2,
``ct`` 9.5, ``strong`` 10.0, ``xray`` 11.3 (gamma's ``pow`` ~2 ms, corruptions ~4 ms); RGB
``dermoscopy`` 19 (the former light on RGB 8.2); a like kornia pipeline (crop, affine, gamma, contrast,
brightness, noise, blur; no JPEG: kornia's needs RGB) under ``fork_rng`` 23 ms. JPEG of 64 images:
Pillow 14 ms, torchvision.io 6.3, kornia's batched ``jpeg_codec_differentiable`` 55; at p = 0.1
about six images per batch take that path.

TTA averages logits, not probabilities: the output stays logits, so the export contract ("output
logits"), temperature scaling (logits / T) and the validation threshold apply unchanged; for two
classes the mean logit difference is the log of the views' geometric-mean odds. Averaged
probabilities (the usual ensemble) would need a log to re-enter that path and would no longer be one
model's logits for a fitted temperature. Averaging shrinks logits where views disagree, so fit the
temperature and threshold with TTA on when it is used at test time.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medxfer.data.presets import (  # the presets are plain data, defined there (re-exported here)
    CORRUPTIONS,
    LEVELS,
    PRESETS,
    Corruption,
    Preset,
    check_corruption,
    corruptions,
    get_preset,
)
from medxfer.errors import MedxferError

class Augment:
    """Random augmentation of a float batch in [0, 1] after a preset; all draws from ``self.gen``."""

    def __init__(self, preset: str | Preset = "light", seed: int = 0, hflip: bool | None = None):
        self.preset = get_preset(preset)
        if hflip is not None:
            self.preset = replace(self.preset, hflip=bool(hflip))
        self.gen = torch.Generator().manual_seed(int(seed))

    def __bool__(self) -> bool:
        return not self.preset.identity

    def state_dict(self) -> dict:
        return {"preset": self.preset.name, "hflip": self.preset.hflip, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict | torch.Tensor) -> None:
        """A dict from :meth:`state_dict`, or a bare generator state (the trainer's ``augment_gen``)."""
        if isinstance(state, dict):
            if state.get("preset", self.preset.name) != self.preset.name:
                raise MedxferError(f"This augmentation state is for preset '{state['preset']}', not "
                                   f"'{self.preset.name}': resume with the same --augment.")
            state = state["gen"]
        self.gen.set_state(state)

    def _u(self, n: int, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=self.gen)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self:
            return x
        if x.dim() not in (4, 5) or not x.is_floating_point():
            raise MedxferError(f"Augment takes float (B, C, H, W) or (B, C, D, H, W); got {x.dtype} "
                               f"{tuple(x.shape)}.")
        channels_last = x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)
        p = self.preset
        if p.geometric:
            x = self._geometry(x)
        x = self._intensity(x)
        for c in p.corruptions:
            pick = torch.rand(len(x), generator=self.gen) < c.p
            level = self._u(len(x), c.lo, c.hi)
            if not pick.any() or (c.name == "jpeg" and x.dim() == 5):
                continue
            idx = pick.nonzero().flatten()
            sub = corrupt(x[idx.to(x.device)], c.name, level[idx], gen=self.gen, per_channel=p.colour)
            x.index_copy_(0, idx.to(x.device), sub)        # x is ours: _intensity returned a new tensor
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def _geometry(self, x: torch.Tensor) -> torch.Tensor:
        p, n, u = self.preset, len(x), self._u
        h, w = x.shape[-2:]
        area = u(n, *p.scale)
        r = torch.exp(u(n, math.log(p.ratio[0]), math.log(p.ratio[1])))
        sw, sh = (area * r).sqrt(), (area / r).sqrt()
        cx = u(n, -1, 1) * (1 - sw).clamp(min=0) + u(n, -2 * p.shift, 2 * p.shift)
        cy = u(n, -1, 1) * (1 - sh).clamp(min=0) + u(n, -2 * p.shift, 2 * p.shift)
        a = u(n, -math.radians(p.rotate), math.radians(p.rotate))
        fx = torch.where(torch.rand(n, generator=self.gen) < 0.5, -1.0, 1.0) if p.hflip else torch.ones(n)
        fy = torch.where(torch.rand(n, generator=self.gen) < 0.5, -1.0, 1.0) if p.vflip else torch.ones(n)
        cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros(n)
        # rotation in pixels, written in normalised coordinates (non-square images stay unsheared)
        row_x = [cos * sw * fx, -sin * (h / w) * sh * fy]
        row_y = [sin * (w / h) * sw * fx, cos * sh * fy]
        if x.dim() == 4:
            theta = torch.stack([torch.stack([*row_x, cx], 1), torch.stack([*row_y, cy], 1)], 1)
        else:  # volumes: crop-resize in 3-D, rotation and flips in-plane
            sd = area.sqrt()
            cz = u(n, -1, 1) * (1 - sd).clamp(min=0) + u(n, -2 * p.shift, 2 * p.shift)
            theta = torch.stack([torch.stack([*row_x, zero, cx], 1), torch.stack([*row_y, zero, cy], 1),
                                 torch.stack([zero, zero, sd, cz], 1)], 1)
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=p.padding, align_corners=False)

    def _intensity(self, x: torch.Tensor) -> torch.Tensor:
        p, n = self.preset, len(x)
        view = (n,) + (1,) * (x.dim() - 1)
        u = lambda v: self._u(n, -v, v).view(view).to(x)  # noqa: E731
        if p.gamma:
            x = x.clamp(0, 1).pow(torch.exp(u(p.gamma)))
        if p.contrast or p.brightness:
            c, b = 1 + u(p.contrast), u(p.brightness)
            mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
            x = (x - mean) * c + mean + b
        if p.colour and p.saturation:
            s = 1 + u(p.saturation)                          # drawn for any channel count: same stream
            if x.shape[1] == 3:
                grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
                x = grey + s * (x - grey)
        return x.clamp(0, 1)


# --------------------------------------------------------------------------------------------------
# corruptions (after MedMNIST-C)


def corrupt(x: torch.Tensor, name: str, level, gen: torch.Generator | None = None,
            per_channel: bool = False) -> torch.Tensor:
    """One corruption of a float batch in [0, 1] at ``level`` (a number, or one per image); see CORRUPTIONS.

    Noise is drawn from ``gen`` (CPU), one field for all channels unless ``per_channel``. Other channel
    counts than 1 and 3 go through JPEG channel by channel.
    """
    check_corruption(name)
    n, c = x.shape[:2]
    level = torch.as_tensor(level, dtype=torch.float32).flatten().expand(n)
    view, field = (n,) + (1,) * (x.dim() - 1), (n, c if per_channel else 1, *x.shape[2:])
    if name == "gaussian_noise":
        x = x + level.view(view).to(x) * torch.randn(field, generator=gen).to(x)
    elif name == "speckle_noise":
        x = x + x * level.view(view).to(x) * torch.randn(field, generator=gen).to(x)
    elif name == "shot_noise":
        base = x.detach().float().cpu()
        base = base if per_channel else base.mean(1, keepdim=True)
        lam = level.view(view)
        x = x + (torch.poisson(base * lam, generator=gen) / lam - base).to(x)
    elif name == "gaussian_blur":
        x = gaussian_blur(x, level.to(x.device) * min(x.shape[-2:]))
    elif name == "jpeg":
        x = jpeg(x, level)
    else:
        out = []
        for xi, f in zip(x, level.tolist()):
            size = [max(1, round(s * f)) for s in x.shape[2:]]
            small = F.interpolate(xi[None], size=size, mode="area")
            out.append(F.interpolate(small, size=list(x.shape[2:]), mode="nearest"))
        x = torch.cat(out)
    return x.clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of images or volumes, one sigma (pixels) per item; reflect padding."""
    n, c, *spatial = x.shape
    radius = min(math.ceil(3 * float(sigma.max())), (min(spatial) - 1) // 2)
    if radius < 1:
        return x
    pos = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kern = torch.exp(-pos.view(1, -1) ** 2 / (2 * sigma.to(x).clamp(min=1e-3).view(n, 1) ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)      # (n * c, k)
    conv, dims = (F.conv2d, 2) if len(spatial) == 2 else (F.conv3d, 3)
    y = x.reshape(1, n * c, *spatial)
    for axis in range(dims):
        shape, pad = [1] * dims, [0] * (2 * dims)
        shape[axis] = kern.shape[1]
        pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = radius
        y = conv(F.pad(y, pad, mode="reflect"), kern.view(n * c, 1, *shape), groups=n * c)
    return y.view_as(x)


def jpeg(x: torch.Tensor, quality) -> torch.Tensor:
    """JPEG encode + decode per image with Pillow at ``quality`` (one, or one per image); grey or RGB."""
    from PIL import Image

    n, c = x.shape[:2]
    u8 = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    qs = torch.as_tensor(quality).flatten().expand(n).round().clamp(1, 95).int().tolist()
    out = np.empty_like(u8)
    for i, q in enumerate(qs):
        planes = [np.ascontiguousarray(u8[i].transpose(1, 2, 0))] if c == 3 else list(u8[i])
        for j, plane in enumerate(planes):
            buf = io.BytesIO()
            Image.fromarray(plane).save(buf, format="JPEG", quality=q)
            buf.seek(0)
            dec = np.asarray(Image.open(buf))
            out[i, j if c != 3 else slice(None)] = dec.transpose(2, 0, 1) if c == 3 else dec
    return torch.from_numpy(out).to(x.device, x.dtype) / 255


# --------------------------------------------------------------------------------------------------
# test-time augmentation


@dataclass(frozen=True)
class View:
    """A deterministic TTA view: zoom about the centre and shift, then mirror the result if ``hflip``.

    ``zoom`` > 1 magnifies (a central crop of side 1/zoom); ``dx``/``dy`` move the content right/down
    by that fraction of the side (border padding).
    """

    zoom: float = 1.0
    dx: float = 0.0
    dy: float = 0.0
    hflip: bool = False

    def theta(self) -> torch.Tensor:
        f = -1.0 if self.hflip else 1.0      # output(u, v) samples the input at (f * u / zoom - 2 dx, ...)
        return torch.tensor([[f / self.zoom, 0.0, -2 * self.dx], [0.0, 1 / self.zoom, -2 * self.dy]])


_S = 0.04                                                                  # TTA shift, fraction of the side
_BASE_VIEWS = (View(), View(zoom=1.1), View(dx=_S), View(dx=-_S), View(dy=_S), View(dy=-_S))


def tta_views(n: int, hflip: bool = False) -> list[View]:
    """The first ``n`` views: identity, [mirror,] zoom, shifts; with ``hflip`` each view then its mirror."""
    views = [w for v in _BASE_VIEWS for w in ((v, replace(v, hflip=True)) if hflip else (v,))]
    if not isinstance(n, int) or not 1 <= n <= len(views):
        raise MedxferError(f"The 'tta' parameter must be between 1 and {len(views)}"
                           f"{'' if hflip else f' ({2 * len(views)} with --hflip)'}. Got {n} instead.")
    return views[:n]


class TTA(nn.Module):
    """``model``'s logits averaged over ``tta_views(n, hflip)`` (or ``views``); n=1 is the model itself.

    Pure torch ops (flip, affine_grid, grid_sample), so it exports to ONNX with a dynamic batch. Input
    (B, C, H, W) float in [0, 1], as the model takes it. The views go through the model as one batch
    of n * B (the exported graph holds the model once); pick the batch size with that in mind.
    """

    def __init__(self, model: nn.Module, n: int = 4, hflip: bool = False, views: list[View] | None = None):
        super().__init__()
        self.model = model
        self.views = tuple(views) if views is not None else tuple(tta_views(n, hflip))
        self.register_buffer("thetas", torch.stack([v.theta() for v in self.views]), persistent=False)

    def view(self, x: torch.Tensor, i: int) -> torch.Tensor:
        v = self.views[i]
        if v.zoom == 1 and v.dx == 0 and v.dy == 0:
            return x.flip(-1) if v.hflip else x
        grid = F.affine_grid(self.thetas[i:i + 1].to(x.dtype), [1, *x.shape[1:]], align_corners=False)
        return F.grid_sample(x, grid.expand(x.shape[0], -1, -1, -1), mode="bilinear", padding_mode="border",
                             align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.views) == 1:
            return self.model(self.view(x, 0))
        out = self.model(torch.cat([self.view(x, i) for i in range(len(self.views))]))
        return out.reshape(len(self.views), x.shape[0], *out.shape[1:]).mean(0)
