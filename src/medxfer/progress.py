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
"""

from __future__ import annotations

import contextlib
import contextvars


class Task:
    """One step in progress: does nothing unless a reporter shows it."""

    def advance(self, n: int = 1) -> None:
        pass

    def update(self, **fields) -> None:
        """Completed count, new total or a short text (``info``)."""

    def close(self) -> None:
        pass

    def __enter__(self) -> Task:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Reporter:
    """Shows tasks; the default shows nothing."""

    def task(self, description: str, total: int | None = None, unit: str = "") -> Task:
        return Task()


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
