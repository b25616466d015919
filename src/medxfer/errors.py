"""User-facing errors.

A :class:`MedxferError` is a mistake the user can fix (a bad path, an unknown source, a file that
cannot be read). The CLI prints its message as one line prefixed with ``medxfer:`` and exits with
code 2; it never shows a traceback for one.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from medxfer.privacy import sample_id


class MedxferError(Exception):
    """A user-facing error: one clear line that names the thing, what is allowed and what to do."""

    exit_code = 2


class BadFileError(MedxferError):
    """An input sample that cannot be read (corrupt, truncated, empty, unsupported, no pixel data,
    non-finite pixels, too many pixels).

    ``path`` (the file, or the npz it came from) and ``reason`` are kept apart so that
    ``--on-bad-file skip`` can list the sample in ``skipped.csv``. The message never shows the path:
    file names can hold patient names. It names the sample by ``sample`` (a pseudonymous id such as
    ``s-3f1c9a0b2e7d4c11``, or ``train/000012`` for an npz row) and says how to find the file.
    """

    def __init__(self, path, reason: str, sample: str | None = None, where: str | None = None):
        self.path = str(path)
        self.reason = _without(reason, self.path)
        self.sample = sample or sample_id(self.path)
        self.where = where
        find = f" ({where})" if where else ""
        super().__init__(
            f"cannot read sample {self.sample}{find}: {self.reason}. Fix or remove it, or pass --on-bad-file "
            "skip to list it in skipped.csv and go on."
            + ("" if where or sample and "/" in sample else
               " 'medxfer locate --data DATA SAMPLE_ID' prints which file it is.")
        )

    def for_sample(self, sample: str, where: str | None = None) -> "BadFileError":
        """The same error, naming the sample as the data set knows it."""
        return BadFileError(self.path, self.reason, sample, where)


def _without(text: str, path: str) -> str:
    """``text`` with the file's path and name taken out (library messages often quote them)."""
    from pathlib import Path

    for part in (path, Path(path).name):
        if part:
            text = text.replace(part, "<file>")
    return text


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""
