"""Files written atomically and read back with clear errors: the one place for writes, hashes and
checkpoints.

Usage::

    write_json(path, obj); write_csv(path, df); digest = write_weights(path, state_dict)
    sha256_file(path)                              # one digest for weights, exports, data files
    write_hashes(folder, names); read_hashes(folder)   # files.sha256, in the format of sha256sum
    write_checkpoint(path, payload, fmt); read_checkpoint(path, fmt, "training")
    read_json(path, "model.json")                  # a damaged file is one MedxferError, not a traceback

Every write goes to a temporary file in the same folder, is flushed to disk and renamed into place:
a reader never sees half a file, and a full disk is one clear message naming the file.

Modes: every file medxfer writes is created as any tool creates one, mode 0666 less the umask (0644
under the usual 022; ``umask 077`` keeps runs, predictions and exports to their owner). The temporary
file is made that way (:func:`temp_beside`), never 0600 as ``tempfile.mkstemp`` makes it, so that run
files, plots and exports follow one rule.

Text is written as UTF-8 with file names kept as their bytes: a name that is not valid UTF-8 reaches
Python as lone surrogates (PEP 383) and is written back as the bytes it was (``--keep-paths``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import typing
from pathlib import Path

import yaml

from medxfer.errors import MedxferError

if typing.TYPE_CHECKING:
    import pandas as pd


HASHES = "files.sha256"
_HASH_LINE = re.compile(r"([0-9a-f]{64}) [ *]([^/\\]+)")


def write_text(path: Path, text: str) -> None:
    """Write then rename: a reader never sees half a file. A full disk or a folder that cannot be
    written is one clear MedxferError naming the file, not a traceback. File names in ``text`` that are
    not valid UTF-8 (lone surrogates) are written as the bytes they were."""
    write_bytes(path, text.encode("utf-8", "surrogateescape"))


def temp_beside(path: Path) -> Path:
    """A new, empty temporary file in ``path``'s folder (named ``.NAME.XXXX.tmp``), created with mode 0666
    less the umask, as the file it becomes would be (``tempfile.mkstemp`` makes 0600). Raises OSError."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, flags, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path.parent))


def write_bytes(path: Path, data: bytes) -> None:
    """:func:`write_text` for bytes."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_beside(path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_error(path: Path, e: OSError) -> MedxferError:
    """A user-facing error for a failed write (disk full, read-only, a file where a folder should be)."""
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
           errno.EACCES: "permission denied", errno.EROFS: "the file system is read-only",
           errno.ENOTDIR: "a file stands where a folder is needed", errno.EISDIR: "it is a folder"}
    reason = why.get(e.errno, e.strerror or type(e).__name__)
    return MedxferError(f"cannot write '{path}' ({reason}). Free space or choose another location; nothing "
                        "finished was changed.")


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes, streamed (weights, exports, data files: one definition)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_hashes(folder: Path, names, record: str = HASHES) -> dict[str, str]:
    """Write ``folder/record``: the SHA-256 of each of ``names`` present in ``folder``, one ``<hex>  <name>``
    line each (the format of ``sha256sum``, so ``sha256sum -c files.sha256`` checks them too). -> {name: hex}"""
    folder = Path(folder)
    digests = {n: sha256_file(folder / n) for n in names if (folder / n).is_file()}
    write_text(folder / record, "".join(f"{h}  {n}\n" for n, h in digests.items()))
    return digests


def read_hashes(folder: Path, record: str = HASHES) -> dict[str, str] | None:
    """The digests recorded by :func:`write_hashes` ({name: hex}); None when there is no record."""
    path = Path(folder) / record
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise MedxferError(f"'{path}' is damaged ({type(e).__name__}): not a readable hash record. Train the run "
                           "again, or restore the file from a copy.") from None
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = _HASH_LINE.fullmatch(line)
        if m is None or m.group(2) in out or m.group(2) in (".", ".."):
            raise MedxferError(f"'{path}' is damaged: a line is not '<SHA-256>  <file name>' (or names a file twice). "
                               "Train the run again, or restore the file from a copy.")
        out[m.group(2)] = m.group(1)
    return out


def first_line(path: Path, limit: int = 1 << 16) -> str | None:
    """The first line of a text file (without its end), or None when it cannot be read as text (a mark: the
    header of a CSV medxfer wrote)."""
    try:
        with open(path, "rb") as f:
            head = f.read(limit)
        return head.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def write_yaml(path: Path, obj) -> None:
    plain = json.loads(json.dumps(obj, default=_jsonable))  # numpy / torch scalars -> plain values
    write_text(path, yaml.safe_dump(plain, sort_keys=False))


def write_csv(path: Path, df: pd.DataFrame) -> None:
    """A DataFrame as CSV (no index); paths in object columns keep their bytes (see :func:`write_text`)."""
    write_text(path, df.to_csv(index=False))


def write_weights(path: Path, state_dict: dict) -> str:
    """Write a safetensors file atomically; returns its sha256 (recorded in model.json). Its mode follows the
    umask like every other file (safetensors' ``save_file`` makes 0600: the mode of a new file is put back)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_beside(path)
        mode = tmp.stat().st_mode & 0o777
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()
    return sha256_file(path)


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
    except OSError as e:
        raise write_error(path, e) from None
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


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts as one level with dotted keys ({"optim": {"lr": 1}} -> {"optim.lr": 1})."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_settings(saved: dict, now: dict) -> list[str]:
    """Keys whose values differ between a checkpoint's recorded settings and the current ones (sorted)."""
    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def read_json(path: Path, what: str = "file"):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MedxferError(f"'{path}' does not exist.") from None
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise MedxferError(f"'{path}' is damaged ({type(e).__name__}): not a readable {what}. Train the run again, or "
                           "restore the file from a copy.") from None


def read_yaml(path: Path, what: str = "file"):
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise MedxferError(f"'{path}' does not exist.") from None
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        raise MedxferError(f"'{path}' is damaged ({type(e).__name__}): not a readable {what}. Train the run again, or "
                           "restore the file from a copy.") from None


def verify_file(path: Path, expected: str | None, what: str) -> None:
    """Refuse a file whose sha256 differs from the one recorded when it was written."""
    if expected is None:
        return
    if not Path(path).is_file():
        raise MedxferError(f"'{path}' is missing from the run; train it again.")
    if sha256_file(path) != expected:
        raise MedxferError(f"'{path}' is damaged or was replaced: its SHA-256 differs from the one recorded in "
                           f"model.json when the {what} was written. Train the run again (or restore the file).")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
