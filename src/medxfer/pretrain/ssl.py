"""Self-supervised pretraining (SimCLR, BYOL, DINO) on unlabelled images; the backbone becomes a source.

Usage::

    from medxfer.pretrain import SSLConfig, pretrain_ssl
    meta = pretrain_ssl(SSLConfig.create(data="data/pneumoniamnist_28.npz", out="runs/ssl_pneu", method="simclr",
                                         image_size=64, epochs=5))
    # then: medxfer train --source runs/ssl_pneu --strategy linear-probe --data ...

Labels are never read. By default the train and val images are used, never the test images (see
:func:`medxfer.pretrain.common.unlabelled_images`). Losses and heads come from ``lightly``; the two
views are made on batch tensors (:class:`SSLAugment`): random resized crop, small rotation,
optional horizontal flip, gamma, brightness/contrast, Gaussian blur, a little noise. No colour
jitter: the images are grey. The backbone is built like a transfer target (``build_model`` with no
head), so the source's normalisation stays inside it. The step runs on medxfer's training loop, so
it checkpoints every epoch (``OUT.partial/checkpoint.pt``, ``--resume``) and runs under DDP
(``torchrun``; SimCLR gathers the negatives of every process).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from medxfer.config import Config, DataOptions, ModelOptions, Options, RuntimeOptions, option
from medxfer.data.augment import gaussian_blur
from medxfer.engine.dist import DistContext, cleanup, init_distributed, shard
from medxfer.engine.handlers import Checkpoint, EpochLog, ProgressBar, read_loop_checkpoint
from medxfer.tracking import tracking_for
from medxfer.engine.loop import Loop, Step
from medxfer.engine.optim import build_optimizer
from medxfer.engine.trainer import autocast, resolve_precision
from medxfer.errors import MedxferError
from medxfer.models.adapt import build_model
from medxfer.models.catalog import resolve_source
from medxfer.pretrain.common import backbone_state_dict, check_out_dir, init_record, unlabelled_images, write_source_dir
from medxfer.runs import checkpoint_path

METHODS = ("simclr", "byol", "dino")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SSLOptions(Options):
    """How the self-supervised model is trained."""

    method: Literal["simclr", "byol", "dino"] = option("simclr", "Self-supervised method (lightly's losses).")
    epochs: int = option(10, "Epochs (10 is a quick start; on PneumoniaMNIST 30 gave clearly better features: "
                         "linear-probe validation AUC 0.98 vs 0.96).", low=1)
    batch_size: int = option(128, "Images per step (per process); contrastive losses need many negatives.", low=2)
    lr: float | None = option(None, "Learning rate.", show="1e-3 from random weights, 3e-4 from a source",
                              low=0.0, low_open=True)
    weight_decay: float = option(0.05, "AdamW weight decay (never on biases and norm weights).", low=0.0)
    warmup_epochs: float = option(1.0, "Linear warm-up, then cosine decay.", low=0.0)
    temperature: float = option(0.5, "SimCLR: NT-Xent temperature.", low=0.0, low_open=True)
    proj_dim: int = option(128, "SimCLR/BYOL projection size (DINO: 2048).", low=1)
    seed: int = option(0, "Seed of the views and of the split medxfer makes when the data has none.", low=0)
    splits: str = option("train,val", "Which splits' images to learn from, comma-separated (never test).")
    hflip: bool = option(False, "Random horizontal flips (only where left/right anatomy does not matter).")
    crop_scale: tuple[float, float] = option((0.35, 1.0), "Random resized crop: area range.", hidden=True)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = option("auto", "Mixed precision.")
    name: str | None = option(None, "Source name.", show="the directory's name")
    description: str | None = option(None, "One line describing the source.", show="made from the settings")

    def __post_init__(self):
        super().__post_init__()
        parts = [s.strip() for s in self.splits.split(",") if s.strip()]
        bad = [x for x in parts if x not in ("train", "val", "test")]
        if not parts or bad:
            raise MedxferError(f"The 'splits' parameter must name train and/or val. Got '{self.splits}' instead.")
        if "test" in parts:
            raise MedxferError("pretraining never uses the test split: its images must stay unseen for evaluation.")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise MedxferError(f"The 'crop-scale' parameter must be 0 < min <= max <= 1. Got {self.crop_scale} instead.")

    @property
    def split_list(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.splits.split(",") if s.strip())


@dataclass(frozen=True)
class SSLConfig(Config):
    """Self-supervised pretraining: the data, the model to start from, the method, where it goes."""

    GROUPS: ClassVar[dict[str, type]] = {"data": DataOptions, "model": ModelOptions, "ssl": SSLOptions,
                                         "runtime": RuntimeOptions}
    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    ssl: SSLOptions = field(default_factory=SSLOptions)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)

    @property
    def from_source(self) -> bool:
        return self.model.weights != "none"

    @property
    def resolved_lr(self) -> float:
        return self.ssl.lr or (3e-4 if self.from_source else 1e-3)

    def signature(self) -> dict:
        """What a resume must share with its checkpoint (--epochs may grow)."""
        d = self.to_dict()
        ssl = {k: v for k, v in d["ssl"].items() if k not in ("epochs", "name", "description")}
        return {"data": {"path": d["data"]["path"]}, "model": d["model"], "ssl": ssl}


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

    def record(self) -> dict:
        return {"crop_scale": list(self.crop_scale), "rotate": self.rotate, "hflip": self.hflip, "gamma": self.gamma,
                "brightness": self.brightness, "contrast": self.contrast, "blur_p": self.blur_p, "noise": self.noise}

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape

        def u(lo, hi):
            return lo + (hi - lo) * torch.rand(n, generator=gen)

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
        sigma = u(*self.blur_sigma) * (min(h, w) / 64) * (u(0, 1) < self.blur_p)
        if float(sigma.max()) > 0.05:
            x = gaussian_blur(x, sigma.to(x.device))
        if self.noise > 0:
            std = u(0, self.noise).view(n, 1, 1, 1).to(x)
            x = x + std * torch.randn((n, 1, h, w), generator=gen).to(x)  # one noise field for all channels
        return x.clamp(0, 1)


# --------------------------------------------------------------------------------------------------
# the methods (lightly heads and losses around a medxfer backbone)
class SSLModel(nn.Module):
    """Backbone (MedxferNet without head) + the method's heads, momentum copies and loss; ``forward(v1,
    v2, epoch)`` is the loss of a batch of two views (so DDP wraps it like any module)."""

    def __init__(self, backbone: nn.Module, method: str, dim: int, proj_dim: int = 128, temperature: float = 0.5,
                 epochs: int = 10, gather: bool = False):
        from lightly.loss import DINOLoss, NegativeCosineSimilarity, NTXentLoss  # lightly: only when pretraining
        from lightly.models.modules import (
            BYOLPredictionHead,
            BYOLProjectionHead,
            DINOProjectionHead,
            SimCLRProjectionHead,
        )
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.method = method
        self.backbone = backbone
        if method == "simclr":
            self.projection = SimCLRProjectionHead(dim, 512, proj_dim)
            self.criterion = NTXentLoss(temperature=temperature, gather_distributed=gather)
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

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, epoch: int) -> torch.Tensor:
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


class SSLStep(Step):
    """One SSL optimiser step: two views of a batch (epoch-seeded, so a resumed epoch draws the same),
    the method's loss, the learning-rate and momentum schedules."""

    def __init__(self, model: SSLModel, images: torch.Tensor, cfg: SSLConfig, ctx: DistContext, precision: str):
        self.model, self.images, self.cfg, self.ctx, self.precision = model, images, cfg, ctx, precision
        self.train_module = model if not ctx.enabled else nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, [{"params": params, "lr": cfg.resolved_lr}], cfg.ssl.weight_decay)
        self.bs = min(cfg.ssl.batch_size, max(2, len(images) // ctx.world))
        self.steps = max(1, (len(images) // ctx.world) // self.bs)   # the last incomplete batch is dropped
        self.total = cfg.ssl.epochs * self.steps
        self.warmup = max(1, int(cfg.ssl.warmup_epochs * self.steps))
        self.aug = SSLAugment(crop_scale=cfg.ssl.crop_scale, hflip=cfg.ssl.hflip)
        self.step, self.epoch, self.gen = 0, 0, torch.Generator()

    def batches(self, epoch: int):
        self.epoch = epoch
        self.gen = torch.Generator().manual_seed(self.cfg.ssl.seed * 100_003 + epoch + 7919 * self.ctx.rank)
        order = shard(torch.randperm(len(self.images), generator=torch.Generator().manual_seed(
            self.cfg.ssl.seed * 100_003 + epoch)), self.ctx)
        self.train_module.train()
        self.step = (epoch - 1) * self.steps
        for b in range(self.steps):
            yield order[b * self.bs:(b + 1) * self.bs]

    def train_batch(self, idx) -> tuple[float, int]:
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.resolved_lr * _lr_factor(self.step, self.total, self.warmup)
        self.model.update_momentum(_momentum(self.cfg.ssl.method, self.step, self.total))
        xb = self.images[idx].to(self.ctx.device).float().div_(255)
        v1, v2 = (self.aug(xb, self.gen).contiguous(memory_format=torch.channels_last) for _ in range(2))
        with autocast(self.precision, self.ctx.device):
            loss = self.train_module(v1, v2, self.epoch - 1)
        if not torch.isfinite(loss):
            raise MedxferError(f"the {self.cfg.ssl.method} loss became {loss.item()} at epoch {self.epoch}: lower "
                               f"--lr (now {self.cfg.resolved_lr:g}) and start again.")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.model.after_backward(self.epoch - 1)
        self.optimizer.step()
        self.step += 1
        return loss.item(), len(idx)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        torch.set_rng_state(st["torch_rng"])


def build_backbone(cfg: SSLConfig, data_chans: int):
    """The MedxferNet (no head) to pretrain, from ``--source`` (its weights, or random with --weights none)."""
    spec = resolve_source(cfg.model.source, cfg.model.weights)
    model, info = build_model(spec, 0, data_chans, grey_mode=cfg.model.grey_mode, pretrained=cfg.from_source)
    return model, spec, info


# --------------------------------------------------------------------------------------------------
def pretrain_ssl(cfg: SSLConfig) -> dict:
    """Pretrain on the loop (checkpoint every epoch, DDP under torchrun), write the source directory
    ``--out``; returns its source.json (rank 0; other ranks return {})."""
    out = Path(cfg.runtime.out)
    ctx = init_distributed()
    try:
        if ctx.is_main:
            check_out_dir(out, cfg.runtime.resume)
        if cfg.runtime.num_threads:
            torch.set_num_threads(cfg.runtime.num_threads)
        torch.manual_seed(cfg.ssl.seed)
        size = cfg.model.image_size or resolve_source(cfg.model.source, cfg.model.weights).input_size
        images, record = unlabelled_images(cfg.data, size, seed=cfg.ssl.seed, splits=cfg.ssl.split_list)
        if len(images) < 2:
            raise MedxferError(f"'{cfg.data.path}' gives {len(images)} image(s) for pretraining: at least 2 are needed.")
        log.info("%s: %d images (%s), labels %s, %d px, device %s", cfg.ssl.method, len(images),
                 record["splits_used"], record["labels"], size, ctx.device.type)
        torch.manual_seed(cfg.ssl.seed)
        backbone, spec, info = build_backbone(cfg, images.shape[1])
        model = SSLModel(backbone, cfg.ssl.method, backbone.net.num_features, cfg.ssl.proj_dim, cfg.ssl.temperature,
                         cfg.ssl.epochs, gather=ctx.enabled).to(ctx.device)
        model.to(memory_format=torch.channels_last)   # 2-3x faster convolutions on CPU (bench: SSL section)
        step = SSLStep(model, images, cfg, ctx, resolve_precision(cfg.ssl.precision, ctx.device))
        ckpt = checkpoint_path(out)
        with tracking_for(cfg) as tracker:
            tracker.log_config(cfg)
            loop = Loop(step, [EpochLog(), ProgressBar(f"pretrain {cfg.ssl.method}", cfg.ssl.epochs, step.steps,
                                                       enabled=ctx.is_main),
                               Checkpoint(ckpt, cfg.signature(), enabled=ctx.is_main), tracker.handler],
                        cfg.ssl.epochs, ctx.world)
            state = loop.run(read_loop_checkpoint(ckpt, cfg.signature()) if cfg.runtime.resume else None)
            if not ctx.is_main:
                return {}
            meta = write_source(cfg, out, model.cpu(), spec, info, record, state.history, size, step)
            tracker.log_files(sorted(p for p in out.iterdir() if p.suffix in (".json", ".safetensors")))
        ckpt.unlink(missing_ok=True)
        return meta
    finally:
        cleanup(ctx)


def write_source(cfg: SSLConfig, out: Path, model: SSLModel, spec, info, record, history, size, step) -> dict:
    source = model.export_backbone()
    backbone_sd = backbone_state_dict(spec.arch.split(".")[0], info["in_chans"], source.net.state_dict())
    data = Path(str(cfg.data.path))
    init = cfg.model.source if cfg.from_source else None
    seconds = sum(h["seconds"] for h in history)
    meta = {
        "name": cfg.ssl.name or out.name,
        "mean": source.mean.flatten().tolist(), "std": source.std.flatten().tolist(),
        "input_size": size, "in_chans": int(info["in_chans"]),
        "domain": f"{data.stem} (self-supervised, {cfg.ssl.method}, no labels)",
        "description": cfg.ssl.description or (f"{spec.arch} {cfg.ssl.method} on {data.name} "
                                               f"{'from ' + init if init else 'from random init'}"),
        "method": cfg.ssl.method, "init": init_record(init), "grey_mode": info["grey_mode"],
        "trained_on": {"data": str(data), "labels": record["labels"], "counts": record["images"],
                       "splits_used": record["splits_used"], "split_rule": record["split_rule"],
                       "test_excluded": record["test_excluded"], "image_size": size, "epochs": len(history),
                       "seed": cfg.ssl.seed, "batch_size": step.bs, "lr": cfg.resolved_lr,
                       "temperature": cfg.ssl.temperature if cfg.ssl.method == "simclr" else None,
                       "augment": step.aug.record(),
                       "exported": "teacher" if cfg.ssl.method == "dino" else "online backbone",
                       "metrics": {"loss_first_epoch": history[0]["train_loss"] if history else None,
                                   "loss_last_epoch": history[-1]["train_loss"] if history else None,
                                   "seconds": round(seconds, 2), "processes": step.ctx.world,
                                   "device": step.ctx.device.type, "history": history}},
    }
    return write_source_dir(out, spec.arch.split(".")[0], backbone_sd, meta)
