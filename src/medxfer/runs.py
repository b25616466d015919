"""The run directory: written atomically, read back alone.

Layout::

    config.yaml        resolved configuration (data, split, seed, source, weights hash, strategy, preprocessing)
    model.json         what rebuilds the model: architecture, labels, channels, mean/std, size, temperature, threshold
    model.safetensors  trained weights
    metrics.json       {"val": {...}, "test": {...}, "train_seconds": ...}
    history.csv        one row per epoch
    predictions.csv    split, sample_id, label, prob_<class>... (val and test, calibrated)
    split.csv          sample_id, split, label (the split used)
    skipped.csv        file, reason (only with --on-bad-file skip and skipped files)
    checkpoint.pt      the epoch loop's state while the run is unfinished (for --resume); removed at the end
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from medxfer.errors import MedxferError

CHECKPOINT = "checkpoint.pt"


def write_text(path: Path, text: str) -> None:
    """Write then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def write_yaml(path: Path, obj) -> None:
    plain = json.loads(json.dumps(obj, default=_jsonable))  # numpy / torch scalars -> plain values
    write_text(path, yaml.safe_dump(plain, sort_keys=False))


def write_csv(path: Path, df: pd.DataFrame) -> None:
    write_text(path, df.to_csv(index=False))


def write_weights(path: Path, state_dict: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp))
    os.replace(tmp, path)


def write_checkpoint(path: Path, payload: dict, fmt: str) -> None:
    """torch.save of tensors, numbers and strings only (so ``weights_only=True`` reads it), tagged with
    ``fmt``; written then renamed, so an interrupted write leaves the previous checkpoint as it was."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": fmt, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_checkpoint(path: Path | None, fmt: str, kind: str) -> dict:
    """A checkpoint written by :func:`write_checkpoint` with format ``fmt``; never runs code from the file."""
    import torch

    if path is None or not Path(path).is_file():
        raise MedxferError(f"nothing to resume: '{path}' does not exist (it is written after the first epoch). "
                           "Run without --resume to start.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file is a user-facing problem
        raise MedxferError(f"cannot read checkpoint '{path}' ({type(e).__name__}); delete it and start again "
                           "without --resume.") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise MedxferError(f"'{path}' is not a medxfer {kind} checkpoint.")
    return ckpt


def changed_settings(saved: dict, now: dict) -> list[str]:
    """Keys whose values differ between a checkpoint's recorded settings and the current ones (sorted)."""
    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def read_run(run_dir: str | Path) -> dict:
    """Everything a command needs from a finished run: config, model meta, metrics, tables."""
    run_dir = Path(run_dir)
    needed = ["config.yaml", "model.json", "model.safetensors", "metrics.json"]
    missing = [n for n in needed if not (run_dir / n).exists()]
    if missing:
        raise MedxferError(f"'{run_dir}' is not a finished run directory (missing {', '.join(missing)}). "
                           "Train one with 'medxfer train ... --out DIR'.")
    out = {
        "dir": run_dir,
        "config": yaml.safe_load((run_dir / "config.yaml").read_text()),
        "model": json.loads((run_dir / "model.json").read_text()),
        "metrics": json.loads((run_dir / "metrics.json").read_text()),
    }
    for name in ("history", "predictions", "split", "skipped"):
        f = run_dir / f"{name}.csv"
        out[name] = pd.read_csv(f) if f.exists() else None
    return out
