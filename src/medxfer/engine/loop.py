"""One epoch loop for every kind of training: a step function says what a batch does, handlers do the
rest (validation, best-epoch selection, early stopping, weight averaging, checkpoints, progress, logging).

Usage::

    loop = Loop(step, handlers=[Validate(...), BestEpoch(...), EarlyStop(...), Checkpoint(...)], epochs=10)
    state = loop.run(resume=checkpoint_dict_or_None)
    state.history                       # one dict per epoch

A *step* (:class:`Step`) owns the model, optimiser and data: ``batches(epoch)`` yields what one
optimiser step takes, ``train_batch(batch)`` runs it and returns ``(loss, n)``. A *handler*
(:class:`Handler`) hooks into the loop; every hook does nothing by default, and a handler that keeps
state across epochs (best weights, EMA, patience) hands it out through ``state_dict`` so that a
checkpoint carries it and a resumed run continues exactly. Supervised training and self-supervised
pretraining are two steps on this loop, so both get DDP, checkpoints and resume from the same code.

When training ends in an error (an exception, Ctrl-C), every handler's ``on_exception`` runs before the
error goes on: progress bars close, the best weights are put back. A handler that fails there is
logged and the original error is the one raised.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class Handler:
    """A hook on the loop (the model code does not own the loop). Every method does nothing by default."""

    name: str = ""
    #: names this handler's state had in checkpoints of earlier versions (read when ``name`` is not there)
    formerly: tuple[str, ...] = ()

    def on_start(self, loop: Loop) -> None:
        pass

    def on_epoch_start(self, loop: Loop) -> None:
        pass

    def on_batch_end(self, loop: Loop, loss: float, n: int) -> None:
        pass

    def on_epoch_end(self, loop: Loop, record: dict) -> None:
        """Add to ``record`` (validation metrics...) or act on it; set ``loop.state.stop`` to end training."""

    def on_end(self, loop: Loop) -> None:
        pass

    def on_exception(self, loop: Loop, error: BaseException) -> None:
        """Training ended in ``error`` (raised again afterwards): clean up, leave the model usable."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Step:
    """What one optimiser step does; subclasses hold the model, optimiser and data."""

    def batches(self, epoch: int):
        """The batches of one epoch (this process's share under DDP)."""
        raise NotImplementedError

    def train_batch(self, batch) -> tuple[float, int]:
        """Train on one batch; returns (mean loss, number of samples)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Model, optimiser, schedule and random generators: everything a resumed run needs."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class LoopState:
    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    seen: int = 0                     # samples trained on, all processes
    train_seconds: float = 0.0
    stop: bool = False


class Loop:
    """Runs ``step`` for ``epochs`` epochs with ``handlers`` (called in the order given)."""

    def __init__(self, step: Step, handlers: list[Handler], epochs: int, world: int = 1):
        self.step, self.handlers, self.epochs, self.world = step, handlers, epochs, world
        self.state = LoopState()

    def handler(self, kind: type) -> Handler | None:
        return next((h for h in self.handlers if isinstance(h, kind)), None)

    def run(self, resume: dict | None = None) -> LoopState:
        if resume is not None:
            self.load_state_dict(resume)
        try:
            for h in self.handlers:
                h.on_start(self)
            for epoch in range(self.state.epoch + 1, self.epochs + 1):
                if self.state.stop:
                    break
                self._epoch(epoch)
            for h in self.handlers:
                h.on_end(self)
        except BaseException as error:  # Ctrl-C too: the handlers clean up, the error goes on
            self._on_exception(error)
            raise
        return self.state

    def _epoch(self, epoch: int) -> None:
        self.state.epoch = epoch
        for h in self.handlers:
            h.on_epoch_start(self)
        t0 = time.perf_counter()
        total, count = 0.0, 0
        for batch in self.step.batches(epoch):
            loss, n = self.step.train_batch(batch)
            self.state.step += 1
            total, count = total + loss * n, count + n
            for h in self.handlers:
                h.on_batch_end(self, loss, n)
            if self.state.stop:  # a handler ends training now (a deadline): this epoch ends here
                break
        seconds = time.perf_counter() - t0
        self.state.train_seconds += seconds
        self.state.seen += count * self.world
        record = {"epoch": epoch, "train_loss": total / max(count, 1), "seconds": seconds,
                  "train_images_per_s": count * self.world / max(seconds, 1e-9)}
        self.state.history.append(record)  # handlers complete it in place (validation adds its metrics)
        for h in self.handlers:
            h.on_epoch_end(self, record)

    def _on_exception(self, error: BaseException) -> None:
        for h in self.handlers:
            try:
                h.on_exception(self, error)
            except Exception as e:  # noqa: BLE001 - cleaning up must never hide the error that ended training
                log.warning("%s could not clean up after %s (%s)", type(h).__name__, type(error).__name__,
                            type(e).__name__)

    def state_dict(self) -> dict:
        s = self.state
        return {"epoch": s.epoch, "step": s.step, "history": s.history, "seen": s.seen,
                "train_seconds": s.train_seconds, "stop": s.stop, "step_state": self.step.state_dict(),
                "handlers": {h.name: h.state_dict() for h in self.handlers if h.name}}

    def load_state_dict(self, d: dict) -> None:
        self.state = LoopState(epoch=int(d["epoch"]), step=int(d["step"]), history=[dict(r) for r in d["history"]],
                               seen=int(d["seen"]), train_seconds=float(d["train_seconds"]), stop=bool(d["stop"]))
        self.step.load_state_dict(d["step_state"])
        for h in self.handlers:
            key = next((k for k in (h.name, *h.formerly) if k and k in d["handlers"]), None)
            if key is not None:
                h.load_state_dict(d["handlers"][key])
