"""Files a command writes outside the run folder keep what the user's system gave them: the umask's mode, and
file names as their bytes."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from PIL import Image

from tests.faults.conftest import TINY, cli


def test_features_files_follow_the_umask(tiny_run, small_npz, tmp_path):
    umask = os.umask(0o022)
    try:
        code, text = cli("features", tiny_run, "--data", small_npz, "--out", tmp_path / "f.npz")
    finally:
        os.umask(umask)
    assert code == 0, text
    assert (tmp_path / "f.npz").stat().st_mode & 0o777 == 0o644       # mkstemp made it 0600


def test_train_keep_paths_keeps_a_name_that_is_not_utf8(tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        for c in "ab":
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    odd = os.fsencode(root / "train" / "a") + b"/img_\xff.png"
    Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(os.fsdecode(odd), format="PNG")
    code, text = cli("train", "--data", root, *TINY, "--keep-paths", "--out", tmp_path / "run")
    assert code == 0, text
    raw = (tmp_path / "run" / "paths.csv").read_bytes()
    assert b"img_\xff.png" in raw and len(pd.read_csv(tmp_path / "run" / "paths.csv", encoding="latin-1")) == 25
