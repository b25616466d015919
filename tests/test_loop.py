"""The training loop and its handlers: selecting the best epoch and stopping are apart, and the loop
cleans up when training ends in an error (progress closed, best weights back)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from medxfer import progress
from medxfer.engine.handlers import BestEpoch, EarlyStop, ProgressBar, Validate
from medxfer.engine.loop import Handler, Loop, Step


class _Step(Step):
    """Each batch writes a known weight (epoch * 10 + batch) into a one-weight model; raises at ``fail_at``."""

    def __init__(self, model: nn.Linear, batches: int = 3, fail_at: tuple[int, int] | None = None):
        self.model, self.n, self.fail_at = model, batches, fail_at

    def batches(self, epoch):
        return ((epoch, i) for i in range(self.n))

    def train_batch(self, batch):
        if batch == self.fail_at:
            raise RuntimeError("out of memory")
        with torch.no_grad():
            self.model.weight.fill_(batch[0] * 10 + batch[1])
        return 1.0, 4


def _validate(model: nn.Module, losses: list[float]) -> Validate:
    """Validation that scores epoch e with ``losses[e - 1]`` (lower is better)."""
    return Validate(model, lambda module: {"val_loss": losses[int(module.weight.item()) // 10 - 1]})


def _weight(model: nn.Linear) -> float:
    return float(model.weight.item())


class _Tasks(progress.Reporter):
    def __init__(self):
        self.opened, self.closed = 0, 0

    def task(self, description, total=None, unit=""):
        reporter = self
        reporter.opened += 1

        class _Task(progress.Task):
            def close(self, failed=False):
                reporter.closed += 1

        return _Task()


def test_best_epoch_restores_the_best_weights_and_never_stops():
    model = nn.Linear(1, 1, bias=False)
    best = BestEpoch(model, monitor="loss")
    state = Loop(_Step(model), [_validate(model, [0.5, 0.3, 0.4, 0.6, 0.7]), best], epochs=5).run()
    assert len(state.history) == 5 and not state.stop          # worse epochs after the best: it went on
    assert best.best_epoch == 2 and _weight(model) == 22       # the last batch of epoch 2


def test_early_stop_stops_after_patience_and_keeps_no_weights():
    model = nn.Linear(1, 1, bias=False)
    stop = EarlyStop(patience=2, monitor="loss")
    state = Loop(_Step(model), [_validate(model, [0.5, 0.3, 0.4, 0.6, 0.2]), stop], epochs=5).run()
    assert [r["epoch"] for r in state.history] == [1, 2, 3, 4] and state.stop
    assert _weight(model) == 42                                # the last epoch's weights: nothing restored
    assert "best_state" not in stop.state_dict()


def test_both_select_and_stop_as_early_stopping_did():
    model = nn.Linear(1, 1, bias=False)
    best, stop = BestEpoch(model, monitor="loss"), EarlyStop(patience=2, monitor="loss")
    state = Loop(_Step(model), [_validate(model, [0.5, 0.3, 0.4, 0.6, 0.2]), best, stop], epochs=5).run()
    assert len(state.history) == 4 and best.best_epoch == 2 and _weight(model) == 22


def test_an_error_mid_epoch_restores_the_best_weights_closes_progress_and_goes_on():
    model = nn.Linear(1, 1, bias=False)
    best = BestEpoch(model, monitor="loss")
    tasks = _Tasks()
    handlers = [_validate(model, [0.5, 0.3, 0.4, 0.6]), best, ProgressBar("training", 4, 3)]
    with progress.reporting(tasks), pytest.raises(RuntimeError, match="out of memory"):
        Loop(_Step(model, fail_at=(4, 1)), handlers, epochs=4).run()
    assert best.best_epoch == 2 and _weight(model) == 22       # not 40, where epoch 4 broke off
    assert tasks.opened == 1 and tasks.closed >= 1


def test_ctrl_c_cleans_up_too_and_stays_an_interrupt():
    class Interrupt(Handler):
        def on_batch_end(self, loop, loss, n):
            if loop.state.step == 5:
                raise KeyboardInterrupt

    model = nn.Linear(1, 1, bias=False)
    tasks = _Tasks()
    with progress.reporting(tasks), pytest.raises(KeyboardInterrupt):
        Loop(_Step(model), [_validate(model, [0.1, 0.2]), BestEpoch(model, "loss"), ProgressBar("t", 2, 3),
                            Interrupt()], epochs=2).run()
    assert _weight(model) == 12 and tasks.closed == 1


def test_a_handler_failing_to_clean_up_does_not_hide_the_error(caplog):
    class Broken(Handler):
        def on_exception(self, loop, error):
            raise ValueError("cleanup broke")

    seen = []

    class After(Handler):
        def on_exception(self, loop, error):
            seen.append(type(error).__name__)

    model = nn.Linear(1, 1, bias=False)
    with caplog.at_level(logging.WARNING, logger="medxfer.engine.loop"), pytest.raises(RuntimeError):
        Loop(_Step(model, fail_at=(1, 0)), [Broken(), After()], epochs=1).run()
    assert seen == ["RuntimeError"]                            # the handlers after it still clean up
    assert "Broken could not clean up after RuntimeError (ValueError)" in caplog.text


def test_no_restore_selects_without_keeping_weights():
    """SWA's case: the best epoch is reported, the averaged weights stay."""
    model = nn.Linear(1, 1, bias=False)
    best = BestEpoch(model, monitor="loss", restore=False)
    Loop(_Step(model), [_validate(model, [0.3, 0.5]), best], epochs=2).run()
    assert best.best_epoch == 1 and best.best_state is None and _weight(model) == 22


def test_a_checkpoint_of_the_former_early_stopping_resumes_both():
    """Checkpoints written before the split hold one 'early_stopping' state: each handler takes its part."""
    model = nn.Linear(1, 1, bias=False)
    kept = {"weight": torch.full((1, 1), 12.0)}
    old = {"best_score": -0.3, "best_epoch": 1, "waited": 2, "best_state": kept}
    loop_state = {"epoch": 3, "step": 9, "history": [], "seen": 36, "train_seconds": 1.0, "stop": False,
                  "step_state": {}, "handlers": {"early_stopping": old}}
    best, stop = BestEpoch(model, "loss"), EarlyStop(patience=2, monitor="loss")
    state = Loop(_Step(model), [_validate(model, [0.3] * 5), best, stop], epochs=5).run(resume=loop_state)
    assert stop.waited == 2 and state.history == []            # it had already stopped: no epoch runs
    assert best.best_epoch == 1 and _weight(model) == 12


def test_fit_settings_take_the_training_defaults_from_the_options_alone():
    """FitSettings had patience 5 and select auc while the options said 10 and calibrated-loss: now the
    engine declares no default for what the options declare, and fit_settings fills it from them."""
    import dataclasses

    from medxfer.config import OptimOptions, TrainConfig
    from medxfer.engine.trainer import FitSettings

    fields = {f.name: f for f in dataclasses.fields(FitSettings)}
    for name in OptimOptions.FIT:
        assert fields[name].default is dataclasses.MISSING and fields[name].default_factory is dataclasses.MISSING
    options = set(TrainConfig.flat_names())
    # the other shared names hold another kind of value (resolved epochs, a weight tensor, an augmentation
    # callable) or are a switch that is off unless asked (resume, as --resume)
    assert options & set(fields) - set(OptimOptions.FIT) == {"epochs", "class_weights", "augment", "resume"}
    s = OptimOptions().fit_settings(7, batch_size=8)
    assert s.epochs == 7 and s.batch_size == 8
    assert all(getattr(s, n) == getattr(OptimOptions(), n) for n in OptimOptions.FIT if n != "batch_size")
    with pytest.raises(TypeError):
        FitSettings(epochs=3)  # no silent second set of defaults
