"""``medxfer locate --data D SAMPLE_ID...``: which file a pseudonymous sample id stands for.

Outputs, reports and messages name samples by a salted hash of their path (file names can hold
patient names). This command, run by the user on the machine that holds the data, prints the path
of each id asked for, and nothing else.
"""

from __future__ import annotations

from typing import Optional

import typer

from medxfer.commands.base import command, out
from medxfer.data.sources import load_manifest
from medxfer.errors import MedxferError


def register(app: typer.Typer) -> None:
    @command(app, "locate")
    def locate(
        sample_ids: list[str] = typer.Argument(..., help="Sample ids from a message, skipped.csv or predictions.csv."),
        data: str = typer.Option(..., help="The data the ids came from (npz, folder, CSV/Parquet, DICOM folder)."),
        labels: Optional[str] = typer.Option(None, "--labels", help="Labels CSV for a DICOM folder."),
    ):
        """Print the file behind each sample id (the salt must be the run's: $MEDXFER_SALT)."""
        t = load_manifest(data, labels_csv=labels, on_unlabelled="skip").table
        where = dict(zip(t["sample_id"].astype(str), t["path"] if "path" in t else t["sample_id"]))
        missing = [s for s in sample_ids if s not in where]
        for s in sample_ids:
            if s in where:
                out.print(f"{s}\t{where[s]}", markup=False, highlight=False, soft_wrap=True)
        if missing:
            raise MedxferError(f"{len(missing)} id(s) are not samples of '{data}' (first: {missing[0]}); check --data "
                               "and that MEDXFER_SALT is the one the run used.")
