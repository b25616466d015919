"""Fault table rows: what predict and the Python API are given: dtypes, scaling, file types, shapes."""

from __future__ import annotations

from tests.faults.table import Case

CASES: list[Case] = []
