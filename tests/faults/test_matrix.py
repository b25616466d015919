"""The fault matrix, table-driven: each case is an input or a fault, the command it is
given to, the exit code, fragments the message must (and must not) hold, and the files that must (or
must not) exist afterwards. A fault is never a traceback and never a confident wrong answer: exit 2
with one line naming the value or sample, or exit 0 with what was skipped recorded.
"""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.faults import rows_data, rows_inputs, rows_runs
from tests.faults.table import PATIENT, Case, run_case
from tests.faults.table import folder as _folder, png as _png, train as _train

pytestmark = pytest.mark.slow  # end to end: a few seconds to a minute each


def _bomb_png(path: Path) -> None:
    """A small PNG whose header claims 16000 x 16000 pixels (the decompressed size is the attack)."""
    Image.new("L", (16000, 16000)).save(path, optimize=True)


def _nifti_bomb(path: Path) -> None:
    """A .nii.gz whose header claims 1200^3 voxels (about 1.7 G): refused from the header, never decoded."""
    import gzip

    import nibabel

    header = nibabel.Nifti1Header()
    header.set_data_shape((1200, 1200, 1200))
    header.set_data_dtype(np.uint8)
    raw = header.binaryblock + b"\x00" * 4 + bytes(1000)
    path.write_bytes(gzip.compress(raw))


def _truncated_png(path: Path) -> None:
    _png(path)
    path.write_bytes(path.read_bytes()[:60])


def _npz_object(path: Path) -> None:
    arrays = {f"{s}_images": np.empty(4, dtype=object) for s in ("train", "val", "test")}
    arrays.update({f"{s}_labels": np.zeros((4, 1)) for s in ("train", "val", "test")})
    np.savez(path, **arrays)


class Evil:
    """Unpickling this runs a shell command: medxfer must never unpickle it."""

    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('MEDXFER_EVIL_MARK', '/tmp/medxfer-evil')}",))


def _evil(path: Path, mark: Path) -> Path:
    os.environ["MEDXFER_EVIL_MARK"] = str(mark)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    return path


def _disk_full(env) -> list:
    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    env.monkeypatch.setattr(safetensors.torch, "save_file", full)
    env.extra["before"] = (env.run / "model.safetensors").read_bytes()
    return _train(env, env.data, "--overwrite", out=env.run)


def _locked(env) -> list:
    from filelock import FileLock

    lock = FileLock(str(env.run.parent / f".{env.run.name}.lock"))
    lock.acquire()
    env.extra["lock"] = lock
    return _train(env, env.data, "--overwrite", out=env.run)


def _same_run(env) -> None:
    assert (env.run / "model.safetensors").read_bytes() == env.extra["before"]


def _phi_outputs(env) -> None:
    out = env.tmp / "out"
    for name in ("predictions.csv", "split.csv", "config.yaml", "model.json", "metrics.json", "report.html"):
        if (out / name).exists():
            assert PATIENT not in (out / name).read_text(errors="ignore"), name
    assert PATIENT in (out / "paths.csv").read_text()  # only where the user asked for it


def _split_by_site(env) -> None:
    split = pd.read_csv(env.tmp / "out" / "split.csv")
    sites = pd.read_csv(env.tmp / "m.csv")["site"]
    assert split.assign(site=sites.to_numpy()).groupby("site")["split"].nunique().max() == 1


def _manifest(env, rows, **cols) -> Path:
    import zlib

    for r in rows:
        _png(env.tmp / r["path"], seed=zlib.crc32(r["path"].encode()))
    df = pd.DataFrame(rows)
    for k, v in cols.items():
        df[k] = v
    df.to_csv(env.tmp / "m.csv", index=False)
    return env.tmp / "m.csv"


def _rows(n=40, split=True):
    out = []
    for i in range(n):
        r = {"path": f"img/{i}.png", "label": i % 2}
        if split:
            r["split"] = "train" if i < n * 0.6 else "val" if i < n * 0.8 else "test"
        out.append(r)
    return out


CASES = [
    # ---------------------------------------------------------------------------- bad input files
    Case("npz-not-an-archive", lambda e: _train(e, _write(e.tmp / "x.npz", b"garbage")), says=("cannot read npz",)),
    Case("npz-object-array", lambda e: _train(e, _call(_npz_object, e.tmp / "o.npz")), says=("object (pickled) array",)),
    Case("png-bomb-refused", lambda e: _train(e, _folder(e.tmp / "d", odd={"train/a/bomb.png": _bomb_png})),
         says=("above the limit", "decompression bomb"), absent=("out",)),
    Case("png-bomb-skipped", lambda e: _train(e, _folder(e.tmp / "d", odd={"train/a/bomb.png": _bomb_png}),
                                              "--on-bad-file", "skip"),
         code=0, files=("out/skipped.csv",)),
    Case("nifti-bomb-refused", lambda e: _train(e, _folder(e.tmp / "d", odd={"train/a/big.nii.gz": _nifti_bomb})),
         says=("above the limit",)),
    Case("png-truncated", lambda e: _train(e, _folder(e.tmp / "d", odd={"train/a/t.png": _truncated_png})),
         says=("corrupt or truncated",)),
    Case("text-as-png", lambda e: _train(e, _folder(e.tmp / "d", odd={"train/b/x.png": lambda p: p.write_text("hi")})),
         says=("not a readable image",)),
    Case("empty-file", lambda e: _train(e, _folder(e.tmp / "d", odd={"train/b/e.png": lambda p: p.write_bytes(b"")})),
         says=("empty file",)),
    Case("patient-name-in-bad-file-name",
         lambda e: _train(e, _folder(e.tmp / "d", odd={f"train/a/{PATIENT}_000.png": _truncated_png})),
         says=("cannot read sample s-", "medxfer locate"), never=(PATIENT,)),
    Case("patient-name-in-file-names", lambda e: _train(
        e, _folder(e.tmp / "d", odd={f"{s}/{c}/{PATIENT}_{s}{c}.png": (lambda p: _png(p, seed=7)) for s in
                                     ("train", "val", "test") for c in "ab"}), "--keep-paths", "--report"),
         code=0, never=(PATIENT,), files=("out/paths.csv", "out/report.html"), check=_phi_outputs),
    Case("dicom-without-suffix-is-read", lambda e: _train(e, _folder(e.tmp / "d", odd={"train/a/IM0001": _dicom})),
         code=0, check=lambda e: _n_samples(e, 8 * 2 + 1 + 16)),
    Case("dicom-corrupt-jpeg2000", lambda e: _train(e, _folder(e.tmp / "d", odd={"train/a/j.dcm": _corrupt_j2k})),
         says=("corrupt or truncated compressed DICOM pixel data", "JPEG 2000"), never=("pip install",)),
    Case("dicom-mpeg2-video", lambda e: _train(e, _folder(e.tmp / "d", odd={"train/a/v.dcm": _mpeg2})),
         says=("unsupported DICOM transfer syntax", "MPEG2"), never=("corrupt",)),
    Case("dicom-without-pixels", lambda e: _train(e, _folder(e.tmp / "d", odd={"train/a/n.dcm": _no_pixels})),
         says=("DICOM without pixel data",), never=("Doe^Jane",)),
    Case("empty-class-folder-warned", lambda e: _train(e, _folder(e.tmp / "d", odd={"train/c/.keep": _touch})),
         code=0, says=("hold no images",), check=lambda e: _in_config(e, "hold no images")),
    # ---------------------------------------------------------------------------- labels and splits
    Case("label-names-repeated", lambda e: _train(e, e.data, "--label-names", "a,a"), says=("'label-names'", "'a' twice")),
    Case("fraction-labels", lambda e: _train(e, _manifest(e, [{**r, "label": r["label"] + 0.5} for r in _rows()])),
         says=("fraction",)),
    Case("split-name-mistyped", lambda e: _train(e, _manifest(e, [{**r, "split": "Test" if r["split"] == "test"
                                                                    else r["split"]} for r in _rows()])),
         says=("'Test'", "Did you mean 'test'")),
    Case("split-column-partly-empty", lambda e: _train(e, _manifest(e, [{**r, "split": r["split"] if i % 5 else None}
                                                                         for i, r in enumerate(_rows())])),
         says=("no split value",)),
    Case("split-by-a-column", lambda e: _train(e, _manifest(e, _rows(60, split=False), site=[i // 6 for i in range(60)]),
                                               "--split-by", "site"), code=0, check=_split_by_site),
    Case("split-by-unknown-column", lambda e: _train(e, _manifest(e, _rows(60, split=False)), "--split-by", "ward"),
         says=("'ward'", "not a column")),
    # ---------------------------------------------------------------------------- bad option values
    Case("bootstrap-negative", lambda e: _train(e, e.data, "--bootstrap", "-5"), says=("'bootstrap'", "-5")),
    Case("feature-augment-negative", lambda e: _train(e, e.data, "--feature-augment", "-1"), says=("'feature-augment'",)),
    Case("num-threads-negative", lambda e: _train(e, e.data, "--num-threads", "-5"), says=("'num-threads'",)),
    Case("threshold-nonsense", lambda e: _train(e, e.data, "--threshold", "sensitivity=2"), says=("threshold",)),
    Case("duplicates-unknown-policy", lambda e: _train(e, e.data, "--duplicates", "keep"), says=("'duplicates'",)),
    Case("predict-batch-size-0", lambda e: ["predict", e.run, e.data, "--batch-size", "0", "--out", e.tmp / "p.csv"],
         says=("'batch-size'",), absent=("p.csv",)),
    # ---------------------------------------------------------------------------- the run directory
    Case("finished-run-not-overwritten", lambda e: _keep(e, _train(e, e.data, out=e.run)),
         says=("already holds a run", "--overwrite"), check=_same_run),
    Case("overwrite-replaces-whole-run", lambda e: _stale_files(e, _train(e, e.data, "--overwrite", out=e.run)),
         code=0, check=lambda e: _not_there(e.run / "report.html", e.run / "skipped.csv")),
    Case("out-is-a-file", lambda e: _train(e, e.data, out=_write(e.tmp / "f", b"x")), says=("is a file",)),
    Case("out-under-a-file", lambda e: _train(e, e.data, out=_write(e.tmp / "f", b"x") / "run"), says=("is a file",)),
    Case("out-holds-other-files", lambda e: _train(e, e.data, out=_write(e.tmp / "mine" / "notes.txt", b"x").parent),
         says=("not a medxfer run",), files=("mine/notes.txt",)),
    Case("out-unwritable", lambda e: _train(e, e.data, out="/sys/medxfer-fault-test/run"),
         says=("cannot write", "/sys/medxfer-fault-test")),
    Case("disk-full-keeps-previous-run", _disk_full, says=("disk is full",), check=_same_run),
    Case("second-writer-refused", _locked, says=("another medxfer process",)),
    Case("cache-dir-is-a-file", lambda e: _train(e, _folder(e.tmp / "d"), "--cache-dir", _write(e.tmp / "c", b"x")),
         says=("cache",)),
    Case("predict-out-is-a-folder", lambda e: ["predict", e.run, e.data, "--out", e.tmp], says=("is a folder",)),
    Case("predict-out-unwritable", lambda e: ["predict", e.run, e.data, "--out", "/sys/medxfer-fault/p.csv"],
         says=("cannot write",)),
    # ---------------------------------------------------------------------------- damaged run files
    Case("weights-truncated", lambda e: _damage(e, "model.safetensors", cut=100), says=("model.safetensors", "damaged")),
    Case("weights-foreign", lambda e: _damage(e, "model.safetensors", data=b"\x00" * 64, unhash=True),
         says=("model.safetensors",)),
    Case("model-json-corrupt", lambda e: _damage(e, "model.json", data=b"{not json"), says=("model.json", "damaged")),
    Case("config-yaml-corrupt", lambda e: _damage(e, "config.yaml", data=b"a: [b", cmd="report"),
         says=("config.yaml", "damaged")),
    Case("metrics-json-corrupt", lambda e: _damage(e, "metrics.json", data=b"[", cmd="report"), says=("metrics.json",)),
    Case("onnx-missing", lambda e: ["predict", e.run, e.data, "--engine", "onnx", "--out", e.tmp / "p.csv"],
         says=("medxfer export",)),
    Case("not-a-run-directory", lambda e: ["predict", e.tmp, e.data], says=("not a finished run",)),
    # ---------------------------------------------------------------------------- hostile files
    Case("pickle-weights-never-run", lambda e: _train(e, e.data, "--source", "test_resnet", "--weights",
                                                      _evil(e.tmp / "w.pth", e.tmp / "pwned"), "--strategy", "full"),
         says=("weights",), absent=("pwned",)),
    Case("pickle-checkpoint-never-run", lambda e: _evil_checkpoint(e), says=("cannot read checkpoint",),
         absent=("pwned",)),
]


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _call(fn, path: Path) -> Path:
    fn(path)
    return path


def _touch(path: Path) -> None:
    path.write_bytes(b"")


def _dicom(path: Path) -> None:
    from tests.test_dicom_e2e import write_dicom

    write_dicom(path, np.random.default_rng(0).integers(0, 4000, (16, 16)).astype(np.uint16), 0)


def _corrupt_j2k(path: Path) -> None:
    from pydicom.data import get_testdata_file

    raw = bytearray(Path(get_testdata_file("JPEG2000.dcm")).read_bytes())
    raw[-200:-20] = bytes(180)  # inside the JPEG 2000 code stream (the last 266 bytes of the file)
    path.write_bytes(bytes(raw))


def _mpeg2(path: Path) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.77.1.1.1", generate_uid()
    meta.TransferSyntaxUID = MPEG2MPML
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([bytes(200)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def _no_pixels(path: Path) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = "Doe^Jane", "MRN-123"
    ds.save_as(path, enforce_file_format=True)


def _n_samples(env, n: int) -> None:
    assert len(pd.read_csv(env.tmp / "out" / "split.csv")) == n


def _in_config(env, text: str) -> None:
    assert text in (env.tmp / "out" / "config.yaml").read_text()


def _keep(env, argv):
    env.extra["before"] = (env.run / "model.safetensors").read_bytes()
    return argv


def _stale_files(env, argv):
    (env.run / "report.html").write_text("old")
    (env.run / "skipped.csv").write_text("sample_id,reason\n")
    return argv


def _not_there(*paths: Path) -> None:
    for p in paths:
        assert not p.exists(), p


def _damage(env, name, cut=None, data=None, unhash=False, cmd="predict"):
    f = env.run / name
    f.write_bytes(f.read_bytes()[:cut] if cut else data)
    if unhash:  # a run from before hashes were recorded: the load itself must fail cleanly
        import json

        meta = json.loads((env.run / "model.json").read_text())
        meta.pop("weights_sha256", None)
        (env.run / "model.json").write_text(json.dumps(meta))
    return ["predict", env.run, env.data, "--out", env.tmp / "p.csv"] if cmd == "predict" else [cmd, env.run]


def _evil_checkpoint(env):
    from medxfer import runs

    out = env.tmp / "r"
    _evil(runs.checkpoint_path(out), env.tmp / "pwned")
    return _train(env, env.data, "--epochs", "2", "--resume", out=out)


ROWS = CASES + rows_data.CASES + rows_runs.CASES + rows_inputs.CASES


@pytest.mark.parametrize("case", ROWS, ids=[c.id for c in ROWS])
def test_fault(case, tmp_path, tiny_run, small_npz, monkeypatch):
    run_case(case, tmp_path, tiny_run, small_npz, monkeypatch)


def test_cases_cover_the_issue():
    """The table keeps its size: every fault kind stays covered."""
    assert len(CASES) >= 40 and len({c.id for c in ROWS}) == len(ROWS)
