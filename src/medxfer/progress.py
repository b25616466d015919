"""Progress of long steps (decoding images, extracting features, epochs and batches), reported to
whoever shows it. Library code never prints: it opens a task here; the command line shows it as a
rich progress bar, a notebook or a test sees nothing unless it asks.

Usage::

    from medxfer import progress

    with progress.task("decoding images", total=len(files)) as t:
        for f in files:
            ...
            t.advance()

    with progress.reporting(MyReporter()):        # e.g. the CLI's rich bars
        train(cfg)

Where no bar can be drawn (a log file, a pipe), the command line reports with :class:`LogTask`: a line
within 2 s of any step that takes longer, with its rate and the time left, then one every 15 s.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time


class Task:
    """One step in progress: does nothing unless a reporter shows it."""

    def advance(self, n: int = 1) -> None:
        pass

    def update(self, **fields) -> None:
        """Completed count, new total or a short text (``info``)."""

    def close(self, failed: bool = False) -> None:
        """The step ended (``failed``: by an error or an interruption)."""

    def __enter__(self) -> Task:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)


class LogTask(Task):
    """A task said in the log, for logs and pipes where no bar is drawn: a first line once it has run ``first``
    seconds (how far, how fast, about how long is left), then one every ``every`` seconds, and a last line
    when it ends. A task that ends sooner says nothing."""

    def __init__(self, description: str, total: int | None = None, unit: str = "", *, first: float = 2.0,
                 every: float = 15.0, clock=time.monotonic):
        self.description, self.total, self.unit = description, total, unit or "items"
        self.first, self.every, self.clock = first, every, clock
        self.t0 = self.last = clock()
        self.done, self.start, self.info, self.said, self.closed = 0, 0, "", False, False

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._maybe_say()

    def update(self, **fields) -> None:
        if "completed" in fields:
            self.done = self.start = int(fields["completed"])   # resumed work: the rate counts what is done now
        self.total = fields.get("total", self.total)
        self.info = fields.get("info", self.info)
        self._maybe_say()

    def _maybe_say(self) -> None:
        now = self.clock()
        if now - (self.last if self.said else self.t0) >= (self.every if self.said else self.first):
            self.said, self.last = True, now
            log.info("%s", self._line(now))

    def _line(self, now: float) -> str:
        elapsed = max(now - self.t0, 1e-9)
        rate = (self.done - self.start) / elapsed
        text = f"{self.description}: {self.done}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)"
            if rate > 0:
                text += f", {rate:.3g} {self.unit}/s, about {_duration((self.total - self.done) / rate)} left"
        else:
            text += f" {self.unit}" + (f", {rate:.3g} {self.unit}/s" if rate > 0 else "")
        return text + (f"; {self.info}" if self.info else "")

    def close(self, failed: bool = False) -> None:
        if not self.closed and self.said:
            log.info("%s: %s, %d %s in %s", self.description, "stopped" if failed else "done", self.done, self.unit,
                     _duration(self.clock() - self.t0))
        self.closed = True


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Reporter:
    """Shows tasks; the default shows nothing."""

    def task(self, description: str, total: int | None = None, unit: str = "") -> Task:
        return Task()


log = logging.getLogger("medxfer.progress")
_current: contextvars.ContextVar[Reporter] = contextvars.ContextVar("medxfer_progress", default=Reporter())


def task(description: str, total: int | None = None, unit: str = "") -> Task:
    """A task on the current reporter (see :func:`reporting`)."""
    return _current.get().task(description, total, unit)


@contextlib.contextmanager
def reporting(reporter: Reporter):
    """Show the tasks opened inside this block with ``reporter``."""
    token = _current.set(reporter)
    try:
        yield reporter
    finally:
        _current.reset(token)
