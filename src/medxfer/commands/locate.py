"""``medxfer locate --data D SAMPLE_ID...``: which file a pseudonymous sample id stands for.

Outputs, reports and messages name samples by a salted hash of their path (file names can hold
patient names). This command, run by the user on the machine that holds the data, prints the path
of each id asked for, and nothing else. It knows both namings: training's (the path relative to the
data folder or manifest) and predict's (each file's path as predict reached it: the folder as given,
then the path under it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from medxfer.commands.base import command
from medxfer.errors import MedxferError

TABLES = (".npz", ".csv", ".parquet", ".pq")


def register(app: typer.Typer) -> None:
    @command(app, "locate")
    def locate(
        sample_ids: list[str] = typer.Argument(..., help="Sample ids from a message, skipped.csv or predictions.csv."),
        data: str = typer.Option(..., help="The data the ids came from: what training read (npz, folder of class "
                                 "folders, CSV/Parquet, DICOM folder), or a folder or file given to predict or explain, "
                                 "spelled as it was given there."),
        labels: Optional[str] = typer.Option(None, "--labels", help="Labels CSV for a DICOM folder."),
    ):
        """Print the file behind each sample id (the salt must be the run's: $MEDXFER_SALT)."""
        where = files_by_id(data, labels)
        missing = [s for s in sample_ids if s not in where]
        for s in sample_ids:
            if s in where:
                _print_line(s, where[s])
        if missing:
            raise MedxferError(f"{len(missing)} id(s) are not samples of '{data}' (first: {missing[0]}); check --data "
                               "(spelled as training or predict was given it) and that MEDXFER_SALT is the one the "
                               "run used.")


def files_by_id(data: str, labels: str | None = None) -> dict[str, str]:
    """sample id -> file (or npz row) under both namings; a folder predict reads needs no class folders."""
    from medxfer.data.folders import walk
    from medxfer.data.sources import load_manifest
    from medxfer.privacy import sample_id

    path = Path(data)
    where: dict[str, str] = {}
    if path.is_dir():  # predict: the files it reads, and the folders (a DICOM series is one 3-D sample)
        found = walk(path)
        reached = [*found.files, *found.broken]
        for f in [path, *sorted({f.parent for f in reached}), *reached]:
            where.setdefault(sample_id(str(f)), str(f))
    elif path.is_file() and path.suffix.lower() not in TABLES:
        where[sample_id(str(path))] = str(path)
    try:
        t = load_manifest(data, labels_csv=labels, on_unlabelled="skip").table
    except MedxferError:
        if not where:  # not data training reads, nor anything predict reads: say why
            raise
    else:
        where.update(zip(t["sample_id"].astype(str), t["path"] if "path" in t else t["sample_id"]))
    return where


def _print_line(sid: str, path: str) -> None:
    """``ID<TAB>PATH`` on stdout, the path's bytes as the disk holds them (a name need not be UTF-8)."""
    line = f"{sid}\t".encode() + os.fsencode(path) + b"\n"
    sys.stdout.flush()
    if hasattr(sys.stdout, "buffer"):
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
    else:
        print(line.decode("utf-8", "backslashreplace"), end="")
