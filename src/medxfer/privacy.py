"""Pseudonymous identifiers: patient IDs never leave medxfer in clear.

Usage::

    from medxfer.privacy import hash_id

    hash_id("PAT-0042", salt="my-project")   # 'p-3f1c9a0b2e7d'
    hash_id("PAT-0042")                      # salt from $MEDXFER_SALT, else DEFAULT_SALT

Every identifier that reaches a manifest, a log, an error or an output file (``patient_id`` in
``predictions.csv``, the leakage report) goes through :func:`hash_id` first: a salted SHA-256,
first 12 hex characters, prefixed ``p-``. The same value and salt always give the same ID, so
patient grouping and leakage checks keep working on the hashed values.

The salt is per project, not a secret key. :data:`DEFAULT_SALT` is a public constant written in
this source file: with it, anyone holding a list of candidate patient IDs can recompute the
hashes and match them. The hashes keep IDs out of casual sight (screens, logs, shared reports);
they are not an anonymisation guarantee. For outputs shared outside the institution, set
``$MEDXFER_SALT`` (or pass ``salt=``) to a random value kept with the data, and treat the hashed
IDs as pseudonymous personal data.
"""

from __future__ import annotations

import hashlib
import os

__all__ = ["DEFAULT_SALT", "default_salt", "hash_id", "raw_bytes", "sample_id"]

#: Public, NOT secret: the salt used when neither ``salt=`` nor ``$MEDXFER_SALT`` is given.
DEFAULT_SALT = "medxfer-public-salt-v1"


def default_salt() -> str:
    """``$MEDXFER_SALT`` when set and not empty, else :data:`DEFAULT_SALT` (not secret)."""
    return os.environ.get("MEDXFER_SALT") or DEFAULT_SALT


def hash_id(value: str, salt: str | None = None) -> str:
    """Salted SHA-256 of ``value``: ``'p-'`` + the first 12 hex characters.

    ``salt=None`` takes :func:`default_salt`. Leading/trailing spaces of ``value`` are ignored
    (DICOM pads strings to an even length), so ``'123 '`` and ``'123'`` are one patient.
    """
    if salt is None:
        salt = default_salt()
    text = str(value).strip()
    digest = hashlib.sha256(f"{salt}\x00".encode("utf-8") + raw_bytes(text)).hexdigest()
    return "p-" + digest[:12]


def sample_id(text: str | bytes | os.PathLike, salt: str | None = None) -> str:
    """Pseudonymous, stable id of a sample known by a file path: ``'s-'`` + 16 hex characters.

    File names can carry patient names (``Doe_Jane_19700101.dcm``): outputs, reports and messages
    name samples by this id (plus an index) and never by the path. ``text`` is the path relative
    to the data root (or as the user gave it), so the id survives moving the data folder. The raw
    bytes of the name are hashed, so a name that is not valid UTF-8 (``b"img_\\xff.png"``, common on
    old NAS copies) has an id too; a valid UTF-8 name keeps the id it always had.
    """
    if salt is None:
        salt = default_salt()
    digest = hashlib.sha256(f"{salt}\x00sample\x00".encode("utf-8") + raw_bytes(text)).hexdigest()
    return "s-" + digest[:16]


def raw_bytes(text: str | bytes | os.PathLike) -> bytes:
    """The bytes of a name as the disk holds them: UTF-8, with the bytes Python could not decode (held
    as lone surrogates, PEP 383) given back as they were, as ``os.fsencode`` does on Linux and macOS.
    The same on every machine: the locale does not change an id."""
    text = os.fspath(text)
    if isinstance(text, bytes):
        return text
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file name decodes to (text made in memory): kept, never a crash
        return text.encode("utf-8", "surrogatepass")
