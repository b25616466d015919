"""Exact duplicate images across splits: found by pixels (and file bytes), refused unless allowed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import BREAST, PNEUMONIA
from PIL import Image

from medxfer.data.duplicates import check_duplicates, find_cross_split_duplicates
from medxfer.data.loading import load_images
from medxfer.data.manifest import Manifest
from medxfer.data.sources import load_manifest
from medxfer.errors import MedxferError
from tests.test_resume import log_lines


def _manifest(splits, labels=None, **cols):
    n = len(splits)
    t = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "label": labels or [i % 2 for i in range(n)],
                      "split": splits, **cols})
    return Manifest(t, ["neg", "pos"], "test")


def _images(n, copies=()):
    imgs = np.random.default_rng(0).integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)
    for dst, src in copies:
        imgs[dst] = imgs[src]
    return imgs


def test_copies_within_one_split_are_not_reported():
    m = _manifest(["train", "train", "val", "test"])
    assert find_cross_split_duplicates(m, _images(4, [(1, 0)])) == []
    assert check_duplicates(m, _images(4, [(1, 0)]), allow=False) == []


def test_cross_split_groups_ids_splits_count():
    m = _manifest(["test", "train", "val", "train", "train", "test"], labels=[1, 1, 0, 0, 1, 0])
    imgs = _images(6, [(1, 0), (2, 0), (5, 3)])      # {s0 test, s1 train, s2 val} and {s3 train, s5 test}
    groups = find_cross_split_duplicates(m, imgs)
    assert [g["count"] for g in groups] == [3, 2]
    g = groups[0]
    assert g["sample_ids"] == ["s1", "s2", "s0"] and g["splits"] == ["train", "val", "test"]
    assert g["labels"] == ["pos", "neg", "pos"] and g["match"] == "pixels"
    assert g["first"] == ("s1", "train") and g["second"] == ("s2", "val")
    assert groups[1]["sample_ids"] == ["s3", "s5"]


def test_refused_with_one_line_message_unless_allowed():
    m = _manifest(["train", "test", "val", "test"], labels=[0, 0, 1, 1])
    imgs = _images(4, [(1, 0)])
    with pytest.raises(MedxferError) as info:
        check_duplicates(m, imgs, allow=False)
    assert str(info.value) == ("2 images appear in more than one split (first: s0 (train) = s1 (test)). "
                               "Remove the copies, or pass --duplicates drop-from-train (keeps val and test, drops "
                               "the copies from train) or --duplicates allow.")
    with log_lines() as logged:
        groups = check_duplicates(m, imgs, allow=True)
    assert len(groups) == 1 and len(logged) == 1 and "2 images appear in more than one split" in logged[0]


def test_label_conflicts_are_named():
    m = _manifest(["train", "test"], labels=[0, 1])
    with pytest.raises(MedxferError, match="1 of the 1 groups carry different labels"):
        check_duplicates(m, _images(2, [(1, 0)]), allow=False)


def test_misaligned_images_are_a_bug():
    with pytest.raises(ValueError):
        find_cross_split_duplicates(_manifest(["train", "test"]), _images(3))


def test_files_same_bytes_vs_same_pixels(tmp_path):
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 256, (16, 16), dtype=np.uint8), rng.integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(a).save(tmp_path / "a_copy.png")                      # same bytes
    Image.fromarray(b).save(tmp_path / "b.png", compress_level=0)
    Image.fromarray(b).save(tmp_path / "b_resaved.png", compress_level=9)  # other bytes, same pixels
    Image.fromarray(255 - b).save(tmp_path / "c.png")
    names = ["a.png", "a_copy.png", "b.png", "b_resaved.png", "c.png"]
    assert (tmp_path / "b.png").read_bytes() != (tmp_path / "b_resaved.png").read_bytes()
    pd.DataFrame({"path": names, "label": [0, 1, 0, 1, 1], "split": ["train", "test", "val", "train", "test"]}
                 ).to_csv(tmp_path / "m.csv", index=False)
    m = load_manifest(tmp_path / "m.csv")
    imgs = load_images(m, 16).images
    from medxfer.privacy import sample_id

    groups = {g["sample_ids"][0]: g for g in find_cross_split_duplicates(m, imgs)}
    a, b = sample_id("a.png"), sample_id("b_resaved.png")
    assert set(groups) == {a, b}
    assert groups[a]["match"] == "file" and groups[a]["splits"] == ["train", "test"]
    assert groups[b]["match"] == "pixels"


@pytest.mark.parametrize("path, n_groups, n_images, pair", [
    (BREAST, 1, 2, ("train", "test")),        # train/000115 (malignant) = test/000076 (benign)
    (PNEUMONIA, 8, 18, ("train", "val")),
])
def test_bundled_medmnist_has_cross_split_copies(path, n_groups, n_images, pair):
    """The published MedMNIST splits themselves hold exact copies across splits (28 px files)."""
    m = load_manifest(path)
    imgs = load_images(m, 28).images
    groups = find_cross_split_duplicates(m, imgs)
    assert len(groups) == n_groups and sum(g["count"] for g in groups) == n_images
    assert {tuple(sorted(set(g["splits"]), key=["train", "val", "test"].index)) for g in groups} == {pair}


def test_rebuilding_a_runs_images_does_not_warn_of_copies_it_did_not_keep(caplog):
    """report and export rebuild a run's test images: for a run made with --duplicates drop-from-train (the
    default) they must not warn '... kept (--duplicates allow)'."""
    import logging

    from medxfer.config import DataOptions
    from medxfer.data.prepare import images_of

    opts = DataOptions(path=str(BREAST), duplicates="drop-from-train")
    ids = [f"test/{i:06d}" for i in range(4)]
    with caplog.at_level(logging.INFO):
        images = images_of(opts, 28, 0, ids)
    assert len(images) == 4
    assert "--duplicates allow" not in caplog.text and "may be optimistic" not in caplog.text
