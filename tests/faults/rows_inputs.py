"""Fault table rows: what predict and the Python API are given: dtypes, scaling, file types, shapes."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.lib import format as npformat
from PIL import Image

from tests.faults.table import Case, folder, train


def _no_decoding(env) -> None:
    """Any array data read from an npz fails the case: a refusal must come from the headers alone."""
    from medxfer.data.npzfile import NpzArchive

    def refuse(*a, **k):
        raise AssertionError("npz array data was read")

    env.monkeypatch.setattr(NpzArchive, "_fill", refuse)


def _bomb(env) -> Path:
    """A small npz (about 70 kB) whose train_images unpack to 8200 x 8200 zeros: above MEDXFER_MAX_PIXELS."""
    _no_decoding(env)
    path = env.tmp / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("train_images.npy", "w", force_zip64=True) as f:
            npformat.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (1, 8200, 8200)})
            row = bytes(8200)
            for _ in range(8200):
                f.write(row)
        for s, n in (("train", 1), ("val", 2), ("test", 2)):
            if s != "train":
                with zf.open(f"{s}_images.npy", "w") as f:
                    npformat.write_array(f, np.zeros((n, 8, 8), np.uint8))
            with zf.open(f"{s}_labels.npy", "w") as f:
                npformat.write_array(f, (np.arange(n) % 2).reshape(-1, 1))
    assert path.stat().st_size < 200_000
    return path


def _small_machine(env) -> Path:
    """A machine whose memory is 200 kB: the small BreastMNIST npz (157 kB of pixels, 94 kB of them in
    train_images) is above a quarter of it, as a whole (train) and array by array (predict)."""
    _no_decoding(env)
    env.monkeypatch.setattr("medxfer.data.npzfile.memory_bytes", lambda: 200_000)
    return env.data


def _npz(env, change) -> Path:
    arrays = dict(np.load(env.data))
    change(arrays)
    np.savez(env.tmp / "d.npz", **arrays)
    return env.tmp / "d.npz"


def _empty_npy(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.zeros((0, 5), np.uint8))
    return path


def _png16(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.arange(0, 57600, 225, dtype=np.uint16).reshape(16, 16)).save(path)
    return path


def _rgb(path: Path) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


def _float_npz(env, scale: float) -> Path:
    """The test images of the run's own data as floats: x / scale."""
    x = np.load(env.data)["test_images"]
    np.savez(env.tmp / "f.npz", test_images=x.astype(np.float32) / np.float32(scale))
    np.savez(env.tmp / "u8.npz", test_images=x)
    return env.tmp / "f.npz"


def _same_as_uint8(env) -> None:
    """Floats in [0, 1] give the probabilities of the uint8 images they came from."""
    from tests.faults.conftest import cli

    code, text = cli("predict", env.run, env.tmp / "u8.npz", "--out", env.tmp / "u8.csv")
    assert code == 0, text
    cols = lambda df: df[[c for c in df.columns if c.startswith("prob_")]].to_numpy()  # noqa: E731
    got, want = pd.read_csv(env.tmp / "p.csv"), pd.read_csv(env.tmp / "u8.csv")
    assert len(got) == len(want) > 0 and np.abs(cols(got) - cols(want)).max() < 1e-6


def _records(dtype: str):
    def check(env) -> None:
        assert json.loads((env.tmp / "out" / "model.json").read_text())["input_dtype"] == dtype
    return check


def _predict(env, *inputs) -> list:
    return ["predict", env.run, *inputs, "--out", env.tmp / "p.csv"]


CASES: list[Case] = [
    # ---------------------------------------------------------------------------- npz bombs, from the headers
    Case("r2-npz-pixel-bomb-train", lambda e: train(e, _bomb(e)),
         says=("train_images holds images of 8200x8200 pixels", "above the limit", "MEDXFER_MAX_PIXELS"),
         absent=("out",)),
    Case("r2-npz-pixel-bomb-predict", lambda e: _predict(e, _bomb(e)),
         says=("8200x8200 pixels", "MEDXFER_MAX_PIXELS"), absent=("p.csv",)),
    Case("r2-npz-above-memory-train", lambda e: train(e, _small_machine(e)),
         says=("unpacks to", "above the 50.0 kB", "MEDXFER_MAX_NPZ_BYTES"), absent=("out",)),
    Case("r2-npz-above-memory-predict", lambda e: _predict(e, _small_machine(e)),
         says=("above the 50.0 kB", "more memory"), absent=("p.csv",)),
    # ---------------------------------------------------------------------------- shapes and structure
    Case("r2-empty-npy-predict", lambda e: _predict(e, _empty_npy(e.tmp / "e.npy")),
         says=("0x5 pixels", "empty image"), absent=("p.csv",)),
    Case("r2-empty-npy-train", lambda e: train(e, folder(e.tmp / "d", odd={"train/a/e.npy": _empty_npy})),
         says=("0x5 pixels", "empty image"), absent=("out",)),
    Case("r2-npz-zero-wide-train",
         lambda e: train(e, _npz(e, lambda a: a.update({k: v[:, :, :0] for k, v in a.items() if "images" in k}))),
         says=("side of 0 pixels",), absent=("out",)),
    Case("r2-npz-zero-wide-predict",
         lambda e: _predict(e, _npz(e, lambda a: a.update({k: v[:, :, :0] for k, v in a.items() if "images" in k}))),
         says=("side of 0 pixels",), absent=("p.csv",)),
    Case("r2-npz-empty-val-split",
         lambda e: train(e, _npz(e, lambda a: a.update(val_images=a["val_images"][:0],
                                                        val_labels=a["val_labels"][:0]))),
         says=("val_images holds no images", "leave out the val_ and test_ arrays"), absent=("out",)),
    Case("r2-npz-split-sizes-differ",
         lambda e: train(e, _npz(e, lambda a: a.update(val_images=np.zeros((len(a["val_labels"]), 32, 32), np.uint8)))),
         says=("train_images are 28x28 but val_images are 32x32",), absent=("out",)),
    Case("r2-npz-2d-with-spatial-dims-3", lambda e: train(e, e.data, "--spatial-dims", "3", "--tta", "1"),
         says=("are 2-D", "--spatial-dims 3"), absent=("out",)),
    # ---------------------------------------------------------------------------- the run's input contract
    Case("r2-png16-to-an-8bit-run", lambda e: _predict(e, _png16(e.tmp / "deep.png")),
         says=("uint16", "trained on 8-bit images", "(x / 255)"), absent=("p.csv",)),
    Case("r2-floats-0-1-to-an-8bit-run", lambda e: _predict(e, _float_npz(e, 255)), code=0, check=_same_as_uint8),
    Case("r2-floats-0-255-to-an-8bit-run", lambda e: _predict(e, _float_npz(e, 1)),
         says=("floats from", "trained on 8-bit images", "(x / 255)"), absent=("p.csv",)),
    Case("r2-mixed-types-said-and-recorded", lambda e: train(e, folder(e.tmp / "d", odd={"train/a/deep.png": _png16})),
         code=0, says=("mix pixel types", "uint16 (1)", "per image"), check=_records("uint16")),
    Case("r2-one-rgb-among-grey-said", lambda e: train(e, folder(e.tmp / "d", odd={"train/b/c.png": _rgb})),
         code=0, says=("1 of 33 images are RGB", "3-channel", "greyscale")),
]


def _volumes_too_big(env):
    """The first-contact blow-up: 28^3 volumes resized to 224^3 (11 MB each) were decoded until the kernel killed
    the run. The plan refuses before decoding (here with 2 GB said to be available)."""
    from tests.conftest import ADRENAL, subset_npz

    env.monkeypatch.setenv("MEDXFER_MEMORY", "2e9")
    data = subset_npz(ADRENAL, env.tmp / "adrenal.npz", n=(96, 40, 40))
    return ["train", "--data", data, "--spatial-dims", "3", "--image-size", "224", "--source", "test_resnet",
            "--weights", "none", "--epochs", "1", "--no-report", "--out", env.tmp / "out"]


CASES.append(Case("r2-volumes-above-memory-refused-before-decoding", _volumes_too_big,
                  says=("not enough memory", "176 volumes of 224^3", "--image-size"), absent=("out",)))
