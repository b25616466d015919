"""User-facing errors.

A :class:`MedxferError` is a mistake the user can fix (a bad path, an unknown source, a file that
cannot be read). The CLI prints its message as one line prefixed with ``medxfer:`` and exits with
code 2; it never shows a traceback for one.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MedxferError(Exception):
    """A user-facing error: one clear line that names the thing, what is allowed and what to do."""

    exit_code = 2


class BadFileError(MedxferError):
    """An input file that cannot be read (corrupt, truncated, empty, unsupported, no pixel data).

    ``path`` and ``reason`` are kept apart so that ``--on-bad-file skip`` can list them in
    ``skipped.csv``.
    """

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(
            f"cannot read '{self.path}' ({reason}). Fix or remove it, or pass --on-bad-file skip "
            "to list it in skipped.csv and go on."
        )


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""
