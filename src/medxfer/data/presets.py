"""The augmentation presets: every range of each preset and the corruptions they may apply, as plain data
(no torch), so that the options (:mod:`medxfer.config`) list the presets from here and ``--help`` stays fast.

Usage::

    PRESETS["xray"].rotate                    # +- degrees
    dataclasses.asdict(get_preset("xray"))    # every range of a preset, for config files and the README
    corruptions(jpeg=0.1, gaussian_blur=0.05) # probabilities at the default levels (LEVELS)

:class:`medxfer.data.augment.Augment` applies a preset to batch tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from medxfer.errors import MedxferError, did_you_mean

CORRUPTIONS = {  # name -> what its level means
    "gaussian_noise": "std of additive N(0, s) noise, in intensity units",
    "speckle_noise": "std of multiplicative noise: x + x * N(0, s)",
    "shot_noise": "photons at full white (Poisson); lower is noisier",
    "gaussian_blur": "sigma as a fraction of the shorter in-plane side (volumes: same sigma in depth)",
    "jpeg": "JPEG quality, 1-100; lower is worse (images only)",
    "pixelate": "kept resolution, fraction of each side; lower is coarser",
}
LEVELS = {"gaussian_noise": (0.01, 0.05), "speckle_noise": (0.05, 0.2), "shot_noise": (60.0, 250.0),
          "gaussian_blur": (0.006, 0.02), "jpeg": (30.0, 75.0), "pixelate": (0.5, 0.85)}


def check_corruption(name: str) -> None:
    if name not in CORRUPTIONS:
        raise MedxferError(f"The corruption must be one of {list(CORRUPTIONS)}. Got '{name}' instead."
                           f"{did_you_mean(str(name), CORRUPTIONS)}")


@dataclass(frozen=True)
class Corruption:
    """Applied to each image with probability ``p``, at a level drawn uniformly from [lo, hi]."""

    name: str
    p: float
    lo: float
    hi: float


def corruptions(**probs: float) -> tuple[Corruption, ...]:
    """``corruptions(jpeg=0.1, gaussian_blur=0.05)``: the given probabilities, default levels (LEVELS)."""
    return tuple(Corruption(k, p, *LEVELS[k]) for k, p in probs.items() if p > 0)


@dataclass(frozen=True)
class Preset:
    """Every range of an augmentation preset. Angles in degrees, shifts as a fraction of the side."""

    name: str
    scale: tuple[float, float] = (1.0, 1.0)     # random resized crop: kept area fraction (> 1 zooms out)
    ratio: tuple[float, float] = (1.0, 1.0)     # crop aspect ratio (w/h), log-uniform
    rotate: float = 0.0                         # +- degrees (in-plane for volumes)
    shift: float = 0.0                          # +- fraction of the side, on top of the crop's position
    hflip: bool = False                         # mirror left/right with probability 1/2
    vflip: bool = False                         # mirror up/down with probability 1/2
    padding: str = "border"                     # outside the image: grid_sample's border | reflection | zeros
    gamma: float = 0.0                          # gamma = exp(U(-g, g))
    brightness: float = 0.0                     # + U(-b, b)
    contrast: float = 0.0                       # around the image mean, * (1 + U(-c, c))
    saturation: float = 0.0                     # colour presets: * (1 + U(-s, s)) away from grey
    colour: bool = False                        # true colour: noise per channel (else one field for all)
    corruptions: tuple[Corruption, ...] = ()

    def __post_init__(self):
        for c in self.corruptions:
            check_corruption(c.name)

    @property
    def geometric(self) -> bool:
        return (self.scale != (1.0, 1.0) or self.ratio != (1.0, 1.0) or self.rotate > 0 or self.shift > 0
                or self.hflip or self.vflip)

    @property
    def identity(self) -> bool:
        return not (self.geometric or self.gamma or self.brightness or self.contrast or self.saturation
                    or self.corruptions)


_GEO = {"scale": (0.75, 1.0), "ratio": (0.9, 1 / 0.9), "rotate": 10.0, "shift": 0.05}
PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("none"),
    # the default, close to the old one: small affine + brightness/contrast, no corruptions
    Preset("light", scale=(0.8, 1.0), ratio=(0.9, 1 / 0.9), rotate=10.0, shift=0.06, brightness=0.1, contrast=0.1),
    # wider ranges and every corruption; flips only with hflip=True (it used to flip)
    Preset("strong", scale=(0.6, 1.0), ratio=(0.8, 1.25), rotate=20.0, shift=0.1, gamma=0.3, brightness=0.2,
           contrast=0.2, corruptions=corruptions(gaussian_noise=0.1, speckle_noise=0.05, shot_noise=0.05,
                                                 gaussian_blur=0.1, jpeg=0.1, pixelate=0.05)),
    Preset("generic", **_GEO, gamma=0.2, brightness=0.1, contrast=0.15,
           corruptions=corruptions(gaussian_noise=0.05, gaussian_blur=0.05, jpeg=0.05, pixelate=0.05)),
    # exposure and processing curves vary; quantum mottle (shot noise); archived as JPEG
    Preset("xray", **_GEO, gamma=0.3, brightness=0.1, contrast=0.2,
           corruptions=corruptions(gaussian_noise=0.05, shot_noise=0.1, gaussian_blur=0.1, jpeg=0.1,
                                   pixelate=0.05)),
    # gain and dynamic range vary; speckle is the native noise
    Preset("ultrasound", **{**_GEO, "scale": (0.7, 1.0)}, gamma=0.3, brightness=0.15, contrast=0.25,
           corruptions=corruptions(speckle_noise=0.2, gaussian_noise=0.05, gaussian_blur=0.1, jpeg=0.1,
                                   pixelate=0.05)),
    # windowed HU: intensities mean something, so intensity changes stay small
    Preset("ct", **{**_GEO, "scale": (0.8, 1.0)}, gamma=0.1, brightness=0.05, contrast=0.1,
           corruptions=corruptions(gaussian_noise=0.1, gaussian_blur=0.1, jpeg=0.05, pixelate=0.05)),
    # arbitrary intensity scale; resolution varies between protocols
    Preset("mri", **{**_GEO, "rotate": 15.0}, gamma=0.3, brightness=0.1, contrast=0.2,
           corruptions=corruptions(gaussian_noise=0.1, gaussian_blur=0.1, jpeg=0.05, pixelate=0.1)),
    # a lesion has no up, down, left or right; colour varies with camera and lighting
    Preset("dermoscopy", scale=(0.5, 1.0), ratio=(0.75, 4 / 3), rotate=180.0, shift=0.05, hflip=True, vflip=True,
           padding="reflection", gamma=0.2, brightness=0.15, contrast=0.15, saturation=0.15, colour=True,
           corruptions=corruptions(gaussian_noise=0.05, gaussian_blur=0.1, jpeg=0.1, pixelate=0.05)),
    # mirroring turns a left eye into a right one (fine); upside-down fundi do not occur; often out of focus
    Preset("fundus", scale=(0.8, 1.0), ratio=(0.9, 1 / 0.9), rotate=30.0, shift=0.05, hflip=True, gamma=0.2,
           brightness=0.1, contrast=0.15, saturation=0.1, colour=True,
           corruptions=corruptions(gaussian_noise=0.05, gaussian_blur=0.15, jpeg=0.1, pixelate=0.05)),
)}


def get_preset(preset: str | Preset) -> Preset:
    """A preset by name (one clear error for an unknown one), or the given Preset."""
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise MedxferError(f"The 'augment' parameter must be one of {list(PRESETS)}. Got '{preset}' instead."
                           f"{did_you_mean(str(preset), PRESETS)}")
    return PRESETS[preset]
