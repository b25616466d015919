"""A DICOM folder is walked like a class folder: hidden, system and medxfer output folders are left out and
counted, links are followed, a broken link is counted (kept as a sample when named .dcm: the bad-file policy
decides), and files keep the order they always had (folder by folder), so made splits do not move."""

from __future__ import annotations

import logging
import os

import numpy as np

from medxfer.data.dicom import dicom_folder_manifest
from tests.test_dicom_e2e import write_dicom


def test_dicom_folder_counts_what_it_leaves_out_and_keeps_its_order(tmp_path, caplog):
    root = tmp_path / "scans"
    px = np.arange(64, dtype=np.uint16).reshape(8, 8)
    for rel in ("z.dcm", "a.dcm", "sub/x.dcm", ".trash/c.dcm", "__MACOSX/d.dcm"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_dicom(root / rel, px, 0)
    os.symlink(tmp_path / "gone", root / "IM9")                  # no suffix, target gone: counted
    os.symlink(tmp_path / "gone.dcm", root / "lost.dcm")         # named as DICOM: kept, the loader decides
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\nz.dcm,a\na.dcm,b\nsub/x.dcm,a\nlost.dcm,b\n")
    with caplog.at_level(logging.INFO, logger="medxfer"):
        df, skipped = dicom_folder_manifest(root, csv)
    rel = [os.path.relpath(p, root.resolve()) for p in df["path"]]
    assert rel == ["a.dcm", "lost.dcm", "z.dcm", "sub/x.dcm"] and skipped.empty   # os.walk's order, as before
    said = caplog.text
    assert "left out 2 folders" in said and "1 hidden" in said and "1 system" in said
    assert "2 broken links" in said and "IM9" not in said
