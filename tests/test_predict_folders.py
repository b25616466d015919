"""predict walks a folder as training does: junk and run folders are not inputs, a broken link is a bad file."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from medxfer.data.inputs import iter_inputs
from medxfer.data.readers import ReadOptions


def _png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16), dtype=np.uint8)).save(path)


def test_a_folder_is_walked_as_training_walks_it(tmp_path):
    for i, rel in enumerate(("a/0.png", "b/1.png", "2.png", ".ipynb_checkpoints/0-checkpoint.png",
                             "__MACOSX/a/0.png", "runs/r/plots/roc.png")):
        _png(tmp_path / rel, i)
    for name in ("model.json", "model.safetensors"):
        (tmp_path / "runs/r" / name).write_text("{}")
    os.symlink(tmp_path / "gone.png", tmp_path / "a" / "broken.png")
    skipped = []
    got = [sid for ids, _ in iter_inputs([tmp_path], 16, 1, ReadOptions(), on_bad_file="skip", skipped=skipped)
           for sid in ids]
    assert len(got) == 3                                     # the three images; no copies, no plots
    assert len(skipped) == 1 and "broken link" in skipped[0].reason
