"""Fault table rows: a run's files: hashes, values read back, locks, --out."""

from __future__ import annotations

from tests.faults.table import Case

CASES: list[Case] = []
