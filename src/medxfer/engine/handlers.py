"""Handlers of the training loop: validation, best-epoch selection, early stopping, weight averaging,
checkpoints, progress, logging. Each owns its state (``state_dict``), so a checkpoint carries it and a
resume continues it.

Usage::

    handlers = [EMA(model, decay), Validate(model, evaluate), BestEpoch(model, "calibrated-loss"),
                EarlyStop(patience=10, monitor="calibrated-loss"), EpochLog(),
                ProgressBar("training", epochs, steps_per_epoch), Checkpoint(path, signature)]

Selecting and stopping are apart (as MONAI's ``CheckpointSaver`` and ``EarlyStopHandler``):
:class:`BestEpoch` keeps the best epoch's weights and puts them back at the end, or when training ends
in an error; :class:`EarlyStop` only ends training. SWA keeps the first without the second.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from medxfer import files, progress
from medxfer.engine.loop import Handler, Loop
from medxfer.errors import MedxferError
from medxfer.strategies import SELECT

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "medxfer-loop-checkpoint/2"


class EMA(Handler):
    """An exponential moving average of the weights (timm ``ModelEmaV3``), updated after every step;
    validation and best-epoch selection judge the average, and the average is what is saved."""

    name = "ema"

    def __init__(self, model: nn.Module, decay: float):
        from timm.utils import ModelEmaV3

        self.model = model
        self.ema = ModelEmaV3(model, decay=decay, use_warmup=True)

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def on_batch_end(self, loop: Loop, loss: float, n: int) -> None:
        self.ema.update(self.model, step=loop.state.step)

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)


def judged_module(loop: Loop, model: nn.Module) -> nn.Module:
    """The weights validation judges: the EMA average when one is kept, else the model."""
    ema = loop.handler(EMA)
    return ema.module if ema is not None else model


class SWA(Handler):
    """Stochastic weight averaging (``torch.optim.swa_utils``): the plain average of the weights at the end of
    every epoch from ``start`` on; at the end the model holds the average, its BatchNorm statistics
    recomputed on ``bn_batches()`` (an iterable of input batches) when the strategy trains them."""

    name = "swa"

    def __init__(self, model: nn.Module, start: int, bn_batches=None):
        from torch.optim.swa_utils import AveragedModel

        self.model, self.start, self.bn_batches = model, start, bn_batches
        self.avg = AveragedModel(model, use_buffers=False)

    def on_epoch_end(self, loop: Loop, record: dict) -> None:
        if record["epoch"] >= self.start:
            self.avg.update_parameters(self.model)
            record["swa_models"] = int(self.avg.n_averaged)

    def on_end(self, loop: Loop) -> None:
        from torch.optim.swa_utils import update_bn

        if int(self.avg.n_averaged) == 0:
            return
        with torch.no_grad():
            for p, q in zip(self.model.parameters(), self.avg.module.parameters()):
                p.copy_(q)
        if self.bn_batches is not None:
            update_bn(self.bn_batches(), self.model)
        log.info("SWA: the saved weights average %d epochs (from epoch %d)", int(self.avg.n_averaged), self.start)

    def state_dict(self) -> dict:
        return {"avg": self.avg.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.avg.load_state_dict(state["avg"])


class Validate(Handler):
    """Adds validation metrics to each epoch's record: ``evaluate(module) -> {"val_loss", "val_auc", ...}``."""

    def __init__(self, model: nn.Module, evaluate):
        self.model, self.evaluate = model, evaluate

    def on_epoch_end(self, loop: Loop, record: dict) -> None:
        t0 = time.perf_counter()
        record.update(self.evaluate(judged_module(loop, self.model)))
        record["seconds"] += time.perf_counter() - t0


def epoch_score(record: dict, monitor: str) -> float:
    """An epoch's validation score by ``monitor`` (one of :data:`~medxfer.strategies.SELECT`), higher is
    better: the AUC (the loss when the AUC is undefined), minus the loss, or minus the calibrated loss."""
    auc, loss = record.get("val_auc", math.nan), record.get("val_loss", math.nan)
    if monitor == "auc" and not math.isnan(auc):
        return auc
    if monitor == "calibrated-loss":
        return -record.get("val_loss_calibrated", loss)
    return -loss


def _check_monitor(monitor: str) -> str:
    if monitor not in SELECT:
        raise MedxferError(f"The 'select' parameter must be one of {', '.join(SELECT)}. Got '{monitor}' instead.")
    return monitor


class BestEpoch(Handler):
    """Selects the best epoch by ``monitor`` (validation score, :func:`epoch_score`) and keeps the weights
    validation judged then (the EMA average when one is kept); at the end, and when training ends in an
    error, the model holds them. ``restore=False`` selects without keeping or restoring weights (SWA saves
    its average instead). It never stops training: :class:`EarlyStop` does."""

    name = "best_epoch"
    formerly = ("early_stopping",)

    def __init__(self, model: nn.Module, monitor: str = "auc", restore: bool = True):
        self.model, self.monitor, self.restore = model, _check_monitor(monitor), restore
        self.best_score, self.best_epoch, self.best_state = -math.inf, 0, None

    def on_epoch_end(self, loop: Loop, record: dict) -> None:
        score = epoch_score(record, self.monitor)
        if score > self.best_score:
            self.best_score, self.best_epoch = score, record["epoch"]
            if self.restore:
                self.best_state = copy.deepcopy(judged_module(loop, self.model).state_dict())

    def on_end(self, loop: Loop) -> None:
        self.restore_best()

    def on_exception(self, loop: Loop, error: BaseException) -> None:
        self.restore_best()  # the model is left as the best epoch had it, not half-way through an epoch

    def restore_best(self) -> None:
        if self.best_state is not None and self.restore:
            self.model.load_state_dict(self.best_state)

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "best_state": self.best_state or {}}

    def load_state_dict(self, state: dict) -> None:
        self.best_score, self.best_epoch = float(state["best_score"]), int(state["best_epoch"])
        self.best_state = state["best_state"] or None


class EarlyStop(Handler):
    """Stops training after ``patience`` epochs without a better validation score by ``monitor``. It keeps
    no weights: :class:`BestEpoch` selects and restores."""

    name = "early_stop"
    formerly = ("early_stopping",)

    def __init__(self, patience: int, monitor: str = "auc"):
        self.patience, self.monitor = patience, _check_monitor(monitor)
        self.best_score, self.waited = -math.inf, 0

    def on_start(self, loop: Loop) -> None:
        if self.waited >= self.patience:  # a resumed run that had already stopped
            loop.state.stop = True

    def on_epoch_end(self, loop: Loop, record: dict) -> None:
        score = epoch_score(record, self.monitor)
        if score > self.best_score:
            self.best_score, self.waited = score, 0
        else:
            self.waited += 1
        if self.waited >= self.patience:
            loop.state.stop = True

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "waited": self.waited}

    def load_state_dict(self, state: dict) -> None:
        self.best_score, self.waited = float(state["best_score"]), int(state["waited"])


class Checkpoint(Handler):
    """After every epoch, the loop's whole state goes to ``path`` (written then renamed; tensors,
    numbers and strings only, so ``torch.load(weights_only=True)`` reads it back)."""

    def __init__(self, path: Path, signature: dict, enabled: bool = True):
        self.path, self.signature, self.enabled = Path(path), signature, enabled

    def on_epoch_end(self, loop: Loop, record: dict) -> None:
        if self.enabled:
            files.write_checkpoint(self.path, {"signature": self.signature, "loop": loop.state_dict()},
                                   CHECKPOINT_FORMAT)


def read_loop_checkpoint(path: Path, signature: dict) -> dict:
    """The loop state saved at ``path``; refused with one line when damaged or written for other settings
    or other data (the signature names the first difference)."""
    ck = files.read_checkpoint(path, CHECKPOINT_FORMAT, "training")
    saved = ck.get("signature", {})
    saved_flat, now_flat = files.flatten(saved), files.flatten(signature)
    changed = files.changed_settings(saved_flat, now_flat)
    if "data_fingerprint" in changed:
        raise MedxferError(f"cannot resume from '{path}': the data changed since the checkpoint was written (sample "
                           "ids, labels, splits or pixels differ). Resume on the same data, or start again without "
                           "--resume (with --overwrite if OUT holds a finished run).")
    if changed:
        key = changed[0]
        raise MedxferError(f"cannot resume from '{path}': '{key.split('.')[-1]}' was {saved_flat.get(key)!r} and is "
                           f"{now_flat.get(key)!r} now. Resume with the run's own settings, or start again "
                           "without --resume in a new --out.")
    return ck["loop"]


class EpochLog(Handler):
    """One log line per epoch: loss, validation metrics, time."""

    def on_epoch_end(self, loop: Loop, record: dict) -> None:
        extra = "".join(f", {k.replace('_', ' ')} {v:.4f}" for k, v in record.items()
                        if k.startswith("val_") and isinstance(v, float) and not math.isnan(v))
        log.info("epoch %d/%d: train loss %.4f%s (%.1f s)", record["epoch"], loop.epochs, record["train_loss"], extra,
                 record["seconds"])


class ProgressBar(Handler):
    """A progress task over all optimiser steps, with the last epoch's loss and validation AUC."""

    def __init__(self, description: str, epochs: int, steps_per_epoch: int, enabled: bool = True):
        self.description, self.total, self.enabled = description, epochs * steps_per_epoch, enabled
        self.task = progress.Task()

    def on_start(self, loop: Loop) -> None:
        if self.enabled:
            self.task = progress.task(self.description, total=self.total, unit="steps")
            self.task.update(completed=loop.state.step)

    def on_batch_end(self, loop: Loop, loss: float, n: int) -> None:
        self.task.advance()

    def on_epoch_end(self, loop: Loop, record: dict) -> None:
        auc = record.get("val_auc")
        info = f"epoch {record['epoch']}/{loop.epochs} loss {record['train_loss']:.3f}"
        self.task.update(info=info + (f" val AUC {auc:.3f}" if isinstance(auc, float) and not math.isnan(auc) else ""))

    def on_end(self, loop: Loop) -> None:
        self.task.close()

    def on_exception(self, loop: Loop, error: BaseException) -> None:
        self.task.close(failed=True)  # a bar left open would keep drawing over the error and whatever comes next


class Deadline(Handler):
    """Ends training at ``deadline`` (a ``time.monotonic()`` value), within the batch it passes; the best
    epoch so far is kept as usual (a time budget, e.g. ``medxfer auto``'s)."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def on_batch_end(self, loop: Loop, loss: float, n: int) -> None:
        if time.monotonic() > self.deadline:
            loop.state.stop = True
            log.info("time budget reached: training ends after this batch")
