"""Supervised training on the loop: AdamW (timm), warm-up + cosine, AMP, DDP, early stopping on validation.

The model code does not own the loop. ``fit`` trains any module on indexable tensors:

    result = fit(model, groups, x_train, y_train, x_val, y_val, settings, ctx)
    result.history  # one dict per epoch; result.best_epoch; the model holds the best weights after fit

With ``settings.checkpoint`` set, the loop's whole state (weights, optimiser, schedule, step, random
generators, best weights so far, history) is written there after every epoch; with
``settings.resume`` the loop continues from it, so an interrupted run loses at most one epoch and, on
one process, ends exactly where the uninterrupted run ends.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medxfer.engine.dist import DistContext, shard
from medxfer.engine.handlers import (
    EMA,
    SWA,
    BestEpoch,
    Checkpoint,
    EarlyStop,
    EpochLog,
    ProgressBar,
    Validate,
    read_loop_checkpoint,
)
from medxfer.engine.loop import Loop, Step
from medxfer.engine.objectives import Objective
from medxfer.engine.optim import build_optimizer, warmup_cosine


@dataclass(kw_only=True)
class FitSettings:
    """How :func:`fit` trains. The training options (``batch_size`` to ``select``) have no defaults here:
    :class:`medxfer.config.OptimOptions` declares them once, and ``OptimOptions().fit_settings(epochs)``
    fills them from it; the fields after them are the engine's own."""

    epochs: int
    batch_size: int
    weight_decay: float
    warmup_epochs: float
    patience: int                          # epochs without a better score before training stops
    precision: str                         # fp32 | bf16 | fp16 | auto (resolved for the device by fit)
    seed: int
    average: str                           # none | ema (validated and saved) | swa (the last quarter's average)
    ema_epochs: float                      # the EMA's horizon, in epochs
    select: str                            # the best epoch by: auc | loss | calibrated-loss (strategies.SELECT)
    class_weights: torch.Tensor | None = None
    augment: Callable | None = None        # float batch -> float batch (train only); with .gen for resume
    channels_last: bool = True
    eval_batch_size: int = 64
    checkpoint: Path | None = None         # write the loop state here after every epoch (main rank)
    resume: bool = False                   # continue from ``checkpoint``
    signature: dict = field(default_factory=dict)  # settings a resumed run must share with its checkpoint
    progress: str | None = None            # a progress bar with this title (main rank)
    handlers: list = field(default_factory=list)   # the caller's handlers (they see each epoch's validation)
    objective: Objective | None = None     # loss and validation scores (default: cross-entropy, class_weights)


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = float("-inf")
    seconds: float = 0.0
    images_per_second: float = 0.0
    epochs: int = 0                        # the most epochs the run could take
    patience: int = 0


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and PyTorch's global generators, from one seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def as_input(xb: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 images -> float [0, 1] on the device; float features pass through."""
    xb = xb.to(device, non_blocking=True)
    if xb.dtype == torch.uint8:
        xb = xb.float().div_(255)
        if channels_last and xb.ndim == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
    return xb


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 64, precision: str = "fp32",
                   device: torch.device = torch.device("cpu"), channels_last: bool = True) -> torch.Tensor:
    """Logits for all of ``x`` (uint8 images or float features), in eval mode, in batches."""
    was_training = model.training
    model.eval()
    if channels_last and x.dtype == torch.uint8 and x.ndim == 4:
        model.to(memory_format=torch.channels_last)  # same layout as the inputs, or every conv converts
    out = []
    for i in range(0, len(x), batch_size):
        with autocast(precision, device):
            out.append(model(as_input(x[i:i + batch_size], device, channels_last)).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def freeze_bn_of_frozen(model: nn.Module) -> None:
    """BatchNorm layers whose parameters are frozen keep their running statistics (eval mode)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


class SupervisedStep(Step):
    """Cross-entropy on shuffled, sharded batches of (images or features, labels)."""

    def __init__(self, model: nn.Module, groups: list[dict], x: torch.Tensor, y: torch.Tensor, s: FitSettings,
                 ctx: DistContext):
        self.model, self.x, self.y, self.s, self.ctx = model, x, y, s, ctx
        self.train_module = model
        if ctx.enabled:
            self.train_module = nn.parallel.DistributedDataParallel(
                model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        self.optimizer = build_optimizer(model, groups, s.weight_decay)
        self.steps_per_epoch = math.ceil(math.ceil(len(x) / ctx.world) / s.batch_size)
        self.scheduler = warmup_cosine(self.optimizer, s.epochs * self.steps_per_epoch,
                                       max(1, int(s.warmup_epochs * self.steps_per_epoch)))
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=s.precision == "fp16" and ctx.device.type == "cuda")
        self.loss_fn = (s.objective or Objective("single", 0, s.class_weights)).loss
        self.gen = torch.Generator().manual_seed(s.seed)

    def batches(self, epoch: int):
        self.train_module.train()
        freeze_bn_of_frozen(self.model)
        order = shard(torch.randperm(len(self.x), generator=self.gen), self.ctx)
        for i in range(0, len(order), self.s.batch_size):
            yield order[i:i + self.s.batch_size]

    def train_batch(self, idx) -> tuple[float, int]:
        s, device = self.s, self.ctx.device
        xb = as_input(self.x[idx], device, s.channels_last)
        if s.augment is not None:
            xb = s.augment(xb)
        yb = self.y[idx].to(device)
        with autocast(s.precision, device):
            loss = self.loss_fn(self.train_module(xb).float(), yb)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.item(), len(idx)

    def state_dict(self) -> dict:
        aug_gen = getattr(self.s.augment, "gen", None)
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                **({"augment_gen": aug_gen.get_state()} if aug_gen is not None else {})}

    def load_state_dict(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.scaler.load_state_dict(st["scaler"])
        self.gen.set_state(st["gen"])
        torch.set_rng_state(st["torch_rng"])
        aug_gen = getattr(self.s.augment, "gen", None)
        if aug_gen is not None and self.ctx.rank == 0 and "augment_gen" in st:
            aug_gen.set_state(st["augment_gen"])
        elif aug_gen is not None:  # other ranks: a fresh stream per resume point (their states are not saved)
            aug_gen.manual_seed(self.s.seed * 1000 + self.ctx.rank + 7919 * int(self.scheduler.last_epoch))


def _bn_batches(model: nn.Module, x: torch.Tensor, s: FitSettings, device: torch.device):
    """For SWA: the training images as input batches, to recompute BatchNorm statistics (None when the
    model has no trained BatchNorm: frozen layers keep their statistics)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or not all(any(p.requires_grad for p in m.parameters()) for m in bns):
        return None  # (update_bn resets every BatchNorm: frozen statistics must stay as they were)
    return lambda: (as_input(x[i:i + s.batch_size], device, s.channels_last) for i in range(0, len(x), s.batch_size))


def fit(model: nn.Module, groups: list[dict], x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
        y_val: torch.Tensor, s: FitSettings, ctx: DistContext = DistContext()) -> FitResult:
    """Train ``model`` in place; on return it holds the weights of the best validation epoch."""
    device = ctx.device
    s = replace(s, precision=resolve_precision(s.precision, device))  # the caller's settings stay as given
    model.to(device)
    if s.channels_last and x_train.dtype == torch.uint8 and x_train.ndim == 4:
        model.to(memory_format=torch.channels_last)
    step = SupervisedStep(model, groups, x_train, y_train, s, ctx)
    obj = s.objective or Objective("single", 0, s.class_weights)

    def evaluate(module: nn.Module) -> dict:
        logits = predict_logits(module, x_val, s.eval_batch_size, s.precision, device, s.channels_last)
        return {**obj.validate(logits, y_val), "lr": step.optimizer.param_groups[-1]["lr"]}

    swa = s.average == "swa"  # SWA keeps the average of the last epochs: no early stop, no best-epoch restore
    best = BestEpoch(model, s.select, restore=not swa)
    handlers = [EMA(model, 1 - 1 / max(1.0, s.ema_epochs * step.steps_per_epoch))] if s.average == "ema" else []
    handlers += [Validate(model, evaluate), best, *([] if swa else [EarlyStop(s.patience, s.select)]), EpochLog(),
                 ProgressBar(s.progress or "training", s.epochs, step.steps_per_epoch,
                             enabled=ctx.is_main and bool(s.progress))]
    handlers += list(s.handlers)
    if swa:
        handlers.append(SWA(model, start=max(1, s.epochs - max(1, s.epochs // 4) + 1),
                            bn_batches=_bn_batches(model, x_train, s, device)))
    if s.checkpoint is not None:
        handlers.append(Checkpoint(s.checkpoint, s.signature, enabled=ctx.is_main))
    loop = Loop(step, handlers, s.epochs, ctx.world)
    resume = read_loop_checkpoint(s.checkpoint, s.signature) if s.resume else None
    state = loop.run(resume)
    model.to(memory_format=torch.contiguous_format)
    return FitResult(history=state.history, best_epoch=best.best_epoch, best_score=best.best_score,
                     seconds=state.train_seconds, images_per_second=state.seen / max(state.train_seconds, 1e-9),
                     epochs=s.epochs, patience=s.patience)
