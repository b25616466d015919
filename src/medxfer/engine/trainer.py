"""The training loop: AdamW, warm-up + cosine, AMP, DDP, early stopping on validation AUC.

The model code does not own the loop. ``fit`` trains any module on indexable tensors:

    result = fit(model, groups, x_train, y_train, x_val, y_val, settings, ctx)
    result.history  # one dict per epoch; result.best_epoch; model holds the best weights after fit

With ``settings.checkpoint`` set, the whole loop state (weights, optimiser, schedule, step, random
generators, best weights so far, history) is written there after every epoch, atomically; with
``settings.resume`` the loop continues from it, so an interrupted run loses at most one epoch and,
on one process, ends exactly where the uninterrupted run ends.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medxfer import runs
from medxfer.engine.dist import DistContext, shard
from medxfer.errors import MedxferError

CHECKPOINT_FORMAT = "medxfer-train-checkpoint/1"


@dataclass
class FitSettings:
    epochs: int
    batch_size: int = 64
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    patience: int = 5
    class_weights: torch.Tensor | None = None
    precision: str = "fp32"
    seed: int = 0
    augment: Callable | None = None        # float batch -> float batch (train only)
    channels_last: bool = True
    on_epoch: Callable | None = None       # hook(epoch_record) on the main rank; does nothing by default
    eval_batch_size: int = 64
    ema_epochs: float = 0.0                # > 0: validate and keep an exponential moving average of the weights
    checkpoint: Path | None = None         # write the loop state here after every epoch (main rank)
    resume: bool = False                   # continue from ``checkpoint``
    signature: dict = field(default_factory=dict)  # settings a resumed run must share with its checkpoint


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_auc: float = float("-inf")
    seconds: float = 0.0
    images_per_second: float = 0.0


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
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
    return xb


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 64, precision: str = "fp32",
                   device: torch.device = torch.device("cpu"), channels_last: bool = True) -> torch.Tensor:
    """Logits for all of ``x`` (uint8 images or float features), in eval mode, in batches."""
    was_training = model.training
    model.eval()
    if channels_last and x.dtype == torch.uint8:
        model.to(memory_format=torch.channels_last)  # same layout as the inputs, or every conv converts
    out = []
    for i in range(0, len(x), batch_size):
        with autocast(precision, device):
            out.append(model(as_input(x[i:i + batch_size], device, channels_last)).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def auc_of(y: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(probs.shape[1]))))


def _freeze_bn_of_frozen(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def _schedule(optimizer, total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(model: nn.Module, groups: list[dict], x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
        y_val: torch.Tensor, s: FitSettings, ctx: DistContext = DistContext()) -> FitResult:
    """Train ``model`` in place; on return it holds the weights of the best validation-AUC epoch."""
    device = ctx.device
    model.to(device)
    if s.channels_last and x_train.dtype == torch.uint8:
        model.to(memory_format=torch.channels_last)
    train_module = model
    if ctx.enabled:
        train_module = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(groups, weight_decay=s.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(x_train) / ctx.world) / s.batch_size)
    scheduler = _schedule(optimizer, s.epochs * steps_per_epoch, max(1, int(s.warmup_epochs * steps_per_epoch)))
    scaler = torch.amp.GradScaler(device.type, enabled=s.precision == "fp16" and device.type == "cuda")
    loss_fn = nn.CrossEntropyLoss(weight=None if s.class_weights is None else s.class_weights.to(device))
    gen = torch.Generator().manual_seed(s.seed)
    ema = None
    if s.ema_epochs > 0:  # averaging horizon in epochs, so the same setting fits any data size
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=1 - 1 / max(1.0, s.ema_epochs * steps_per_epoch), use_warmup=True)
    step, start = 0, 1
    result, best_state, waited, seen, train_time = FitResult(), None, 0, 0, 0.0
    if s.resume:
        ck = load_train_checkpoint(s.checkpoint, s.signature)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        gen.set_state(ck["gen"])
        torch.set_rng_state(ck["torch_rng"])
        aug_gen = getattr(s.augment, "gen", None)
        if aug_gen is not None and ctx.rank == 0 and "augment_gen" in ck:
            aug_gen.set_state(ck["augment_gen"])
        elif aug_gen is not None:  # other ranks: a fresh stream per resumed epoch (their states are not saved)
            aug_gen.manual_seed(s.seed * 1000 + ctx.rank + 7919 * int(ck["epoch"]))
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        best_state = ck["best_state"] or None
        step, start, waited, seen = int(ck["step"]), int(ck["epoch"]) + 1, int(ck["waited"]), int(ck["seen"])
        train_time = float(ck["train_time"])
        result.history = [dict(r) for r in ck["history"]]
        result.best_auc, result.best_epoch = float(ck["best_auc"]), int(ck["best_epoch"])
        if waited >= s.patience:
            start = s.epochs + 1                       # it had stopped early: nothing left to train
    y_val_np = y_val.numpy()
    for epoch in range(start, s.epochs + 1):
        t0 = time.perf_counter()
        train_module.train()
        _freeze_bn_of_frozen(model)
        order = shard(torch.randperm(len(x_train), generator=gen), ctx)
        total, count = 0.0, 0
        for i in range(0, len(order), s.batch_size):
            idx = order[i:i + s.batch_size]
            xb = as_input(x_train[idx], device, s.channels_last)
            if s.augment is not None:
                xb = s.augment(xb)
            yb = y_train[idx].to(device)
            with autocast(s.precision, device):
                loss = loss_fn(train_module(xb).float(), yb)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            if ema is not None:
                ema.update(model, step=step)
            total += loss.item() * len(idx)
            count += len(idx)
        epoch_train = time.perf_counter() - t0
        train_time += epoch_train
        seen += count * ctx.world
        judged = ema.module if ema is not None else model
        logits = predict_logits(judged, x_val, s.eval_batch_size, s.precision, device, s.channels_last)
        val_loss = float(nn.functional.cross_entropy(logits, y_val).item())
        val_auc = auc_of(y_val_np, logits.softmax(1).numpy())
        record = {"epoch": epoch, "train_loss": total / max(count, 1), "val_loss": val_loss, "val_auc": val_auc,
                  "lr": optimizer.param_groups[-1]["lr"], "seconds": time.perf_counter() - t0,
                  "train_images_per_s": count * ctx.world / max(epoch_train, 1e-9)}
        result.history.append(record)
        score = val_auc if not np.isnan(val_auc) else -val_loss
        if score > result.best_auc:
            result.best_auc, result.best_epoch, waited = score, epoch, 0
            best_state = copy.deepcopy(judged.state_dict())
        else:
            waited += 1
        if s.checkpoint is not None and ctx.is_main:
            aug_gen = getattr(s.augment, "gen", None)
            save_train_checkpoint(s.checkpoint, {
                "epoch": epoch, "step": step, "waited": waited, "seen": seen, "train_time": train_time,
                "best_auc": result.best_auc, "best_epoch": result.best_epoch, "history": result.history,
                "model": model.state_dict(), "best_state": best_state or {}, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "gen": gen.get_state(),
                "torch_rng": torch.get_rng_state(), "signature": s.signature,
                **({"augment_gen": aug_gen.get_state()} if aug_gen is not None else {}),
                **({"ema": ema.state_dict()} if ema is not None else {})})
        if ctx.is_main and s.on_epoch is not None:
            s.on_epoch(record)
        if waited >= s.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    result.seconds = train_time
    result.images_per_second = seen / max(train_time, 1e-9)
    model.to(memory_format=torch.contiguous_format)
    return result


def save_train_checkpoint(path: Path, payload: dict) -> None:
    runs.write_checkpoint(path, payload, CHECKPOINT_FORMAT)


def load_train_checkpoint(path: Path | None, signature: dict) -> dict:
    """The checkpoint at ``path``, refused with a clear message when missing, damaged or from other settings."""
    ck = runs.read_checkpoint(path, CHECKPOINT_FORMAT, "training")
    saved = ck.get("signature", {})
    changed = runs.changed_settings(saved, signature)
    if "data_fingerprint" in changed:
        raise MedxferError(f"cannot resume from '{path}': the data changed since the checkpoint was written (sample "
                           "ids, labels, splits or pixels differ). Resume on the same data, or start again without "
                           "--resume (with --overwrite if OUT holds a finished run).")
    if changed:
        key = changed[0]
        raise MedxferError(f"cannot resume from '{path}': '{key}' was {saved.get(key)!r} and is "
                           f"{signature.get(key)!r} now. Resume with the run's own settings, or start again "
                           "without --resume in a new --out.")
    return ck
