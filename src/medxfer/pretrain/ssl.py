"""Self-supervised pretraining (SimCLR, BYOL, DINO) on unlabelled images; the backbone becomes a source.

Usage::

    from medxfer.pretrain import SSLConfig, pretrain_ssl
    meta = pretrain_ssl(SSLConfig(data="data/pneumoniamnist_28.npz", out="runs/ssl_pneu", method="simclr",
                                  init="efficientnet_lite0.in1k", image_size=64, epochs=5))
    # then: medxfer train --source runs/ssl_pneu --strategy linear-probe --data ...

Labels are never read. By default the train and val images are used, never the test images (see
:func:`medxfer.pretrain.common.unlabelled_images`). Losses and heads come from ``lightly``; the two
views are made on batch tensors (:class:`SSLAugment`): random resized crop, small rotation,
optional horizontal flip, gamma, brightness/contrast, Gaussian blur, a little noise. No colour
jitter: the images are grey. The backbone is built like a transfer target (``build_model`` with no
head), so the source's normalisation stays inside it. After each epoch ``OUT/checkpoint.pt`` is
written atomically; ``resume=True`` continues from it.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medxfer import runs
from medxfer.errors import MedxferError
from medxfer.pretrain.common import (CHECKPOINT, check_out_dir, init_record, load_checkpoint, save_checkpoint,
                                     unlabelled_images, write_source_dir, backbone_state_dict)

METHODS = ("simclr", "byol", "dino")
# settings that must not change between a run and its --resume
RESUME_KEYS = ("method", "arch", "init", "image_size", "batch_size", "seed", "data", "temperature", "proj_dim")


@dataclass(frozen=True)
class SSLConfig:
    data: str
    out: str
    method: str = "simclr"
    arch: str | None = None              # timm architecture (random init) when no init
    init: str | None = None              # a source to start from: bundled name or source directory
    image_size: int = 64
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None              # None: 1e-3 from random init, 3e-4 from a source
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    temperature: float = 0.5             # simclr NT-Xent temperature
    proj_dim: int = 128                  # simclr/byol projection size; dino output 2048
    seed: int = 0
    splits: tuple[str, ...] = ("train", "val")
    hflip: bool = False                  # only where left/right anatomy does not matter
    crop_scale: tuple[float, float] = (0.35, 1.0)
    grey_mode: str = "sum"
    precision: str = "auto"
    num_threads: int | None = None
    name: str | None = None
    description: str | None = None
    resume: bool = False
    cache_dir: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise MedxferError(f"The 'method' parameter must be one of {list(METHODS)}. Got '{self.method}' instead.")
        if self.arch is None and self.init is None:
            raise MedxferError("say what to pretrain: --arch NAME (a timm architecture, random init) and/or --init "
                               "SOURCE (a source to start from, e.g. efficientnet_lite0.in1k).")
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise MedxferError(f"The '{key.replace('_', '-')}' parameter must be at least 1. Got {getattr(self, key)} instead.")
        if self.batch_size < 2:
            raise MedxferError(f"The 'batch-size' parameter must be at least 2 for {self.method}. Got {self.batch_size} instead.")
        if not 8 <= self.image_size <= 2048:
            raise MedxferError(f"The 'image-size' parameter must be between 8 and 2048. Got {self.image_size} instead.")
        bad = [x for x in self.splits if x not in ("train", "val", "test")]
        if not self.splits or bad:
            raise MedxferError(f"The 'splits' parameter must name train and/or val. Got {list(self.splits)} instead.")
        if "test" in self.splits:
            raise MedxferError("pretraining never uses the test split: its images must stay unseen for evaluation.")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise MedxferError(f"The 'crop-scale' parameter must be 0 < min <= max <= 1. Got {self.crop_scale} instead.")

    @property
    def resolved_lr(self) -> float:
        return self.lr or (3e-4 if self.init else 1e-3)


# --------------------------------------------------------------------------------------------------
# two views, on batch tensors


class SSLAugment:
    """Random view of a float batch (B, C, S, S) in [0, 1]; grey-safe (no colour jitter)."""

    def __init__(self, crop_scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), rotate: float = 15.0, hflip: bool = False,
                 gamma: float = 0.3, brightness: float = 0.2, contrast: float = 0.3, blur_p: float = 0.5,
                 blur_sigma=(0.1, 2.0), noise: float = 0.02):
        self.crop_scale, self.ratio, self.rotate, self.hflip = crop_scale, ratio, rotate, hflip
        self.gamma, self.brightness, self.contrast = gamma, brightness, contrast
        self.blur_p, self.blur_sigma, self.noise = blur_p, blur_sigma, noise

    @staticmethod
    def _u(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        u = lambda lo, hi: self._u(n, lo, hi, gen)  # noqa: E731
        area = u(*self.crop_scale)
        r = torch.exp(u(math.log(self.ratio[0]), math.log(self.ratio[1])))
        cw, ch = torch.sqrt(area * r).clamp(max=1), torch.sqrt(area / r).clamp(max=1)
        cx, cy = u(-1, 1) * (1 - cw), u(-1, 1) * (1 - ch)
        a = u(-1, 1) * math.radians(self.rotate)
        flip = torch.where(u(0, 1) < 0.5, -1.0, 1.0) if self.hflip else torch.ones(n)
        cos, sin = torch.cos(a), torch.sin(a)
        theta = torch.stack([torch.stack([cw * cos * flip, -ch * sin, cx], 1),
                             torch.stack([cw * sin * flip, ch * cos, cy], 1)], 1).to(x)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        g = torch.exp(u(-self.gamma, self.gamma)).view(n, 1, 1, 1).to(x)
        x = x.clamp(1e-6, 1).pow(g)
        c = (1 + u(-self.contrast, self.contrast)).view(n, 1, 1, 1).to(x)
        b = u(-self.brightness, self.brightness).view(n, 1, 1, 1).to(x)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * c + mean + b
        scale = min(h, w) / 64
        sigma = u(*self.blur_sigma) * scale * (u(0, 1) < self.blur_p)
        x = gaussian_blur(x, sigma.to(x.device))
        if self.noise > 0:
            std = u(0, self.noise).view(n, 1, 1, 1).to(x)
            x = x + std * torch.randn((n, 1, h, w), generator=gen).to(x)  # one noise field for all channels
        return x.clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma (pixels) per image; sigma 0 leaves the image as it is."""
    n, c, h, w = x.shape
    if float(sigma.max()) <= 0.05:
        return x
    radius = min(int(math.ceil(3 * float(sigma.max()))), (min(h, w) - 1) // 2)
    if radius < 1:
        return x
    pos = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    s = sigma.clamp(min=1e-3).view(n, 1)
    kern = torch.exp(-pos.view(1, -1) ** 2 / (2 * s ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)      # (n*c, k)
    k = kern.shape[1]
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kern.view(n * c, 1, 1, k), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kern.view(n * c, 1, k, 1), groups=n * c)
    return y.view(n, c, h, w)


# --------------------------------------------------------------------------------------------------
# the methods (lightly heads and losses around a medxfer backbone)


class SSLModel(nn.Module):
    """Backbone (MedxferNet without head) + the method's heads, momentum copies and loss state."""

    def __init__(self, backbone: nn.Module, method: str, dim: int, proj_dim: int = 128, temperature: float = 0.5,
                 epochs: int = 10):
        from lightly.loss import DINOLoss, NegativeCosineSimilarity, NTXentLoss
        from lightly.models.modules import (BYOLPredictionHead, BYOLProjectionHead, DINOProjectionHead,
                                            SimCLRProjectionHead)
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.method = method
        self.backbone = backbone
        if method == "simclr":
            self.projection = SimCLRProjectionHead(dim, 512, proj_dim)
            self.criterion = NTXentLoss(temperature=temperature)
        elif method == "byol":
            self.projection = BYOLProjectionHead(dim, 1024, proj_dim)
            self.prediction = BYOLPredictionHead(proj_dim, 1024, proj_dim)
            self.criterion = NegativeCosineSimilarity()
        else:
            self.projection = DINOProjectionHead(dim, 512, 64, 2048, freeze_last_layer=1)
            self.criterion = DINOLoss(output_dim=2048, warmup_teacher_temp_epochs=max(1, min(30, epochs // 3)))
        if method in ("byol", "dino"):
            self.backbone_momentum = copy.deepcopy(backbone)
            if method == "dino":  # weight-normed last layer: deepcopy refuses it, so build and copy
                self.projection_momentum = DINOProjectionHead(dim, 512, 64, 2048)
                self.projection_momentum.load_state_dict(self.projection.state_dict())
            else:
                self.projection_momentum = copy.deepcopy(self.projection)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_momentum)

    def export_backbone(self) -> nn.Module:
        """The backbone that becomes the source: the online one (SimCLR, BYOL) or DINO's teacher."""
        return self.backbone_momentum if self.method == "dino" else self.backbone

    def update_momentum(self, m: float) -> None:
        from lightly.models.utils import update_momentum

        if self.method in ("byol", "dino"):
            update_momentum(self.backbone, self.backbone_momentum, m)
            update_momentum(self.projection, self.projection_momentum, m)

    def loss(self, v1: torch.Tensor, v2: torch.Tensor, epoch: int) -> torch.Tensor:
        """Loss of one batch of two views; ``epoch`` counts from 0 (DINO's teacher-temperature warm-up)."""
        x = torch.cat([v1, v2])
        if self.method == "simclr":
            z1, z2 = self.projection(self.backbone.features(x)).float().chunk(2)
            return self.criterion(z1, z2)
        with torch.no_grad():
            t1, t2 = self.projection_momentum(self.backbone_momentum.features(x)).float().chunk(2)
        if self.method == "byol":
            p1, p2 = self.prediction(self.projection(self.backbone.features(x))).float().chunk(2)
            return 0.5 * (self.criterion(p1, t2.detach()) + self.criterion(p2, t1.detach()))
        s1, s2 = self.projection(self.backbone.features(x)).float().chunk(2)
        return self.criterion([t1, t2], [s1, s2], epoch=epoch)

    def after_backward(self, epoch: int) -> None:
        if self.method == "dino":
            self.projection.cancel_last_layer_gradients(current_epoch=epoch)


def _momentum(method: str, step: int, total: int) -> float:
    start = 0.99 if method == "byol" else 0.996
    return 1 - (1 - start) * (math.cos(math.pi * step / max(1, total)) + 1) / 2


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def build_backbone(cfg: SSLConfig, data_chans: int):
    """The MedxferNet (no head) to pretrain, from ``cfg.init`` or random; and its spec and build info."""
    from medxfer.models.adapt import build_model
    from medxfer.models.catalog import resolve_source

    if cfg.init is not None:
        spec = resolve_source(cfg.init)
        if cfg.arch is not None and cfg.arch.split(".")[0] != spec.arch.split(".")[0]:
            raise MedxferError(f"--arch '{cfg.arch}' does not match the architecture of --init '{cfg.init}' "
                               f"('{spec.arch}'). Leave --arch out, or start from a source of that architecture.")
    else:
        spec = resolve_source(cfg.arch, "none")
    model, info = build_model(spec, 0, data_chans, grey_mode=cfg.grey_mode, pretrained=cfg.init is not None)
    return model, spec, info


# --------------------------------------------------------------------------------------------------
# the loop


def pretrain_ssl(cfg: SSLConfig, log=print, progress=None) -> dict:
    """Pretrain, checkpoint every epoch, write the source directory ``cfg.out``; returns its source.json."""
    from medxfer.engine.trainer import autocast, resolve_precision
    from medxfer.pipeline import seed_everything

    out = Path(cfg.out)
    check_out_dir(out, cfg.resume)
    ckpt = load_checkpoint(out / CHECKPOINT) if cfg.resume else None
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k in RESUME_KEYS}
    if ckpt is not None:
        changed = runs.changed_settings(ckpt["settings"], settings)
        if changed:
            k = changed[0]
            raise MedxferError(f"cannot resume: '{k}' was {ckpt['settings'].get(k)!r} in the checkpoint and is "
                               f"{settings.get(k)!r} now. Resume with the same settings (only --epochs may grow).")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)
    images, data_record = unlabelled_images(cfg.data, cfg.image_size, seed=cfg.seed, splits=cfg.splits,
                                            cache_dir=cfg.cache_dir, log=log)
    if len(images) < 2:
        raise MedxferError(f"'{cfg.data}' gives {len(images)} image(s) for pretraining: at least 2 are needed.")
    log(f"{cfg.method}: {len(images)} images ({data_record['splits_used']}), labels {data_record['labels']}, "
        f"{cfg.image_size} px, device {device.type}")
    seed_everything(cfg.seed)
    backbone, spec, info = build_backbone(cfg, images.shape[1])
    model = SSLModel(backbone, cfg.method, backbone.net.num_features, cfg.proj_dim, cfg.temperature, cfg.epochs)
    model.to(device)
    model.to(memory_format=torch.channels_last)   # 2-3x faster convolutions on CPU (bench: SSL section)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.resolved_lr, weight_decay=cfg.weight_decay)
    start, history = 1, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        start, history = int(ckpt["epoch"]) + 1, list(ckpt["history"])
        log(f"resuming after epoch {ckpt['epoch']} from {out / CHECKPOINT}")
    bs = min(cfg.batch_size, len(images))
    steps = len(images) // bs                                    # the last incomplete batch is dropped
    total, warmup = cfg.epochs * steps, max(1, int(cfg.warmup_epochs * steps))
    aug = SSLAugment(crop_scale=cfg.crop_scale, hflip=cfg.hflip)
    for epoch in range(start, cfg.epochs + 1):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)     # epoch-seeded: resume = same draws
        order = torch.randperm(len(images), generator=gen)
        model.train()
        losses = []
        for b in range(steps):
            step = (epoch - 1) * steps + b
            for group in optimizer.param_groups:
                group["lr"] = cfg.resolved_lr * _lr_factor(step, total, warmup)
            model.update_momentum(_momentum(cfg.method, step, total))
            xb = images[order[b * bs:(b + 1) * bs]].to(device).float().div_(255)
            v1, v2 = (aug(xb, gen).contiguous(memory_format=torch.channels_last) for _ in range(2))
            with autocast(precision, device):
                loss = model.loss(v1, v2, epoch - 1)
            if not torch.isfinite(loss):
                raise MedxferError(f"the {cfg.method} loss became {loss.item()} at epoch {epoch}: lower --lr "
                                   f"(now {cfg.resolved_lr:g}) and start again.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            model.after_backward(epoch - 1)
            optimizer.step()
            losses.append(loss.item())
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch, "loss": sum(losses) / len(losses), "lr": optimizer.param_groups[0]["lr"],
                  "seconds": seconds, "images_per_s": 2 * steps * bs / max(seconds, 1e-9)}
        history.append(record)
        save_checkpoint(out / CHECKPOINT, {"epoch": epoch, "model": model.state_dict(),
                                           "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                                           "history": history, "settings": settings})
        if progress is not None:
            progress(record)
    model.cpu()
    source = model.export_backbone()
    backbone_sd = backbone_state_dict(spec.arch.split(".")[0], info["in_chans"], source.net.state_dict())
    meta = {
        "name": cfg.name or out.name,
        "mean": source.mean.flatten().tolist(), "std": source.std.flatten().tolist(),
        "input_size": cfg.image_size, "in_chans": int(info["in_chans"]),
        "domain": f"{Path(cfg.data).stem} (self-supervised, {cfg.method}, no labels)",
        "description": cfg.description or (f"{spec.arch} {cfg.method} on {Path(cfg.data).name} "
                                           f"{'from ' + cfg.init if cfg.init else 'from random init'}"),
        "method": cfg.method,
        "init": init_record(cfg.init),
        "grey_mode": info["grey_mode"],
        "trained_on": {"data": str(cfg.data), "labels": data_record["labels"], "counts": data_record["images"],
                       "splits_used": data_record["splits_used"], "split_rule": data_record["split_rule"],
                       "test_excluded": data_record["test_excluded"], "image_size": cfg.image_size,
                       "epochs": len(history), "seed": cfg.seed, "batch_size": bs, "lr": cfg.resolved_lr,
                       "temperature": cfg.temperature if cfg.method == "simclr" else None,
                       "augment": {"crop_scale": list(cfg.crop_scale), "rotate": aug.rotate, "hflip": cfg.hflip,
                                   "gamma": aug.gamma, "brightness": aug.brightness, "contrast": aug.contrast,
                                   "blur_p": aug.blur_p, "noise": aug.noise},
                       "exported": "teacher" if cfg.method == "dino" else "online backbone",
                       "metrics": {"loss_first_epoch": history[0]["loss"], "loss_last_epoch": history[-1]["loss"],
                                   "seconds": round(sum(h["seconds"] for h in history), 2), "device": device.type,
                                   "history": history}},
    }
    return write_source_dir(out, spec.arch.split(".")[0], backbone_sd, meta)
