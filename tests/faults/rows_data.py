"""Fault table rows: data discovery and reading: folder layouts, labels, names, npz shapes and bombs."""

from __future__ import annotations

from tests.faults.table import Case

CASES: list[Case] = []
