"""Long steps say how far they are, in logs and pipes too: a line within 2 s, with the rate and the time left."""

from __future__ import annotations

import logging

from medxfer import progress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_long_step_is_said_within_two_seconds_with_the_time_left(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="medxfer"):
        with progress.LogTask("decoding images", total=1000, unit="images", clock=clock) as task:
            for _ in range(10):            # 100 images a second
                clock.t += 0.5
                task.advance(50)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "decoding images: 200/1000 images (20%), 100 images/s, about 8 s left"
    assert lines[-1] == "decoding images: done, 500 images in 5 s"
    assert len(lines) == 2                 # the next line comes 15 s later


def test_a_short_step_says_nothing(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="medxfer"):
        with progress.LogTask("extracting features", total=10, clock=clock) as task:
            clock.t += 1.0
            task.advance(10)
    assert caplog.records == []


def test_training_steps_give_the_expected_time_after_the_first_batches(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="medxfer"):
        task = progress.LogTask("training", total=600, unit="steps", clock=clock)
        for _ in range(3):
            clock.t += 1.0
            task.advance()
    assert "training: 2/600 steps (0%), 1 steps/s, about 10 min left" in caplog.text   # said at 2 s


def test_the_cli_reports_with_lines_where_no_bar_can_be_drawn():
    from medxfer.commands.base import RichReporter, console

    assert not console.is_terminal          # pytest captures the output: a pipe
    assert isinstance(RichReporter().task("decoding images", total=5), progress.LogTask)


def test_a_step_ended_by_an_error_says_stopped_not_done(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="medxfer"):
        try:
            with progress.LogTask("training", total=100, unit="steps", clock=clock) as task:
                clock.t += 3.0
                task.advance(30)
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1] == "training: stopped, 30 steps in 3 s" and not any("done" in ln for ln in lines)
