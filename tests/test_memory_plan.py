"""The memory plan: decoded bytes and the training working set estimated from the manifest, before decoding,
and a one-line refusal saying what to pass when they cannot fit."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medxfer.data import memory
from medxfer.data.loading import load_images
from medxfer.data.manifest import Manifest
from medxfer.data.memory import MemoryPlan, available_bytes, check_memory, plan_memory
from medxfer.data.readers import ReadOptions
from medxfer.data.sources import load_manifest
from medxfer.errors import MedxferError


def volumes(n: int, side: int = 28) -> Manifest:
    """n volumes of side^3 as an npz-style manifest (a broadcast view: no memory behind it)."""
    arrays = np.broadcast_to(np.zeros((1, side, side, side), np.uint8), (n, side, side, side))
    table = pd.DataFrame({"sample_id": [f"{i:06d}" for i in range(n)], "label": np.arange(n) % 2,
                          "split": "train", "row": np.arange(n)})
    return Manifest(table, ["a", "b"], "volumes.npz", arrays=arrays)


def test_the_plan_counts_the_uint8_store_and_what_training_adds():
    plan = plan_memory(volumes(1908), 28, volumes=True, batch_size=64, arch="test_resnet")
    assert plan.decoded == 1908 * 28 ** 3 and plan.channels == 1 and plan.spatial_dims == 3
    assert plan.training == int(64 * 28 ** 3 * 4 * (1 + memory.ACTIVATIONS[("test_resnet", 3)]))
    assert plan.peak == 2 * plan.decoded + max(plan.decoding, plan.training)
    # an unknown network gets the largest factor measured; 2-D images count size^2
    assert plan_memory(volumes(10), 28, volumes=True, arch="convnext_tiny").activations == memory.DEFAULT_ACTIVATIONS[3]
    assert plan_memory(volumes(10), 64, volumes=False).decoded == 10 * 64 * 64


def test_decoded_bytes_are_what_decoding_makes(small_adrenal):
    manifest = load_manifest(str(small_adrenal))
    plan = plan_memory(manifest, 16, volumes=True)
    images = load_images(manifest, 16, ReadOptions(slice="volume")).images
    assert plan.decoded == images.numel() * images.element_size() and plan.samples == len(images)


def test_the_first_contact_case_is_refused_in_one_line_with_a_size_that_fits(monkeypatch):
    """1,908 volumes of 28^3 resized to 224^3 on a machine with 16.8 GB: refused before decoding, saying what to pass."""
    monkeypatch.setenv("MEDXFER_MEMORY", "16.8e9")
    with pytest.raises(MedxferError) as e:
        check_memory(volumes(1908), 224, volumes=True, arch="tf_efficientnet_lite0")
    text = str(e.value)
    assert "\n" not in text and "1908 volumes of 224^3" in text and "21.4 GB decoded" in text
    assert "16.8 GB is available (MEDXFER_MEMORY)" in text and "--image-size" in text
    size = int(text.split("--image-size ")[1].split()[0])
    plan = plan_memory(volumes(1908), size, volumes=True, arch="tf_efficientnet_lite0")
    assert plan.fits and not plan_memory(volumes(1908), size + 1, volumes=True, arch="tf_efficientnet_lite0").fits


def test_a_run_that_fits_is_logged_and_passes(monkeypatch, caplog):
    monkeypatch.setenv("MEDXFER_MEMORY", "3e9")
    with caplog.at_level(logging.INFO, logger="medxfer.data.memory"):
        plan = check_memory(volumes(1908), 28, volumes=True, arch="test_resnet")
    assert plan.fits and plan.peak < 1e9
    assert "memory plan: 1908 volumes of 28^3 x 1 channel need about 41.9 MB decoded" in caplog.text


def test_fewer_samples_or_a_smaller_batch_are_offered_when_they_fit(monkeypatch):
    plan = plan_memory(volumes(1000), 64, volumes=True, batch_size=64, arch="test_resnet")
    monkeypatch.setenv("MEDXFER_MEMORY", str(plan.peak - 1))
    with pytest.raises(MedxferError, match=r"--image-size 63 or less.*use at most 900 samples.*--batch-size"):
        check_memory(volumes(1000), 64, volumes=True, batch_size=64, arch="test_resnet")


def test_unknown_memory_is_logged_and_never_refused(monkeypatch, caplog):
    monkeypatch.delenv("MEDXFER_MEMORY", raising=False)
    monkeypatch.setattr(memory, "available_bytes", lambda: (None, ""))
    with caplog.at_level(logging.INFO, logger="medxfer.data.memory"):
        plan = check_memory(volumes(1908), 224, volumes=True)
    assert plan.available is None and plan.fits and "memory available is unknown" in caplog.text


def test_rgb_files_count_three_channels(tmp_path):
    for i, mode in enumerate(("L", "RGB")):
        Image.new(mode, (40, 40)).save(tmp_path / f"{i}.png")
    table = pd.DataFrame({"sample_id": ["a", "b"], "label": [0, 1], "split": "train",
                          "path": [str(tmp_path / "0.png"), str(tmp_path / "1.png")]})
    plan = plan_memory(Manifest(table, ["x", "y"], str(tmp_path)), 32, volumes=False)
    assert plan.channels == 3 and plan.decoded == 2 * 3 * 32 * 32
    grey = Manifest(table.iloc[:1], ["x", "y"], str(tmp_path))
    assert plan_memory(grey, 32, volumes=False).channels == 1


def test_available_memory_from_meminfo_cgroup_and_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDXFER_MEMORY", raising=False)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\n")
    assert memory._meminfo_available(str(meminfo)) == 8_000_000 * 1024
    limit, usage, stat = tmp_path / "memory.max", tmp_path / "memory.current", tmp_path / "memory.stat"
    limit.write_text("4000000000\n"), usage.write_text("3000000000\n"), stat.write_text("inactive_file 500000000\n")
    monkeypatch.setattr(memory, "CGROUP_FILES", ((str(limit), str(usage)),))
    assert available_bytes() == (1_500_000_000, "this cgroup's limit less its usage")
    limit.write_text("max\n")  # no limit: the machine's MemAvailable
    assert available_bytes()[1] in ("MemAvailable in /proc/meminfo", "free memory (sysconf)")
    monkeypatch.setenv("MEDXFER_MEMORY", "2e9")
    assert available_bytes() == (2_000_000_000, "MEDXFER_MEMORY")
    monkeypatch.setenv("MEDXFER_MEMORY", "lots")
    with pytest.raises(MedxferError, match="MEDXFER_MEMORY must be a number of bytes"):
        available_bytes()


def test_plan_is_plain_arithmetic():
    plan = MemoryPlan(samples=100, size=10, channels=1, spatial_dims=2, batch_size=10, activations=9.0)
    assert plan.values == 100 and plan.decoded == 10_000 and plan.training == 10 * 100 * 4 * 10
    assert plan.decoding == 4 * 3 * 100 and plan.peak == 20_000 + 40_000 and plan.fits


def files(tmp_path, n: int) -> Manifest:
    """n grey PNG files (one written, the rest its name: the plan reads a few headers only)."""
    Image.new("L", (40, 40)).save(tmp_path / "0.png")
    table = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "label": np.arange(n) % 2, "split": "train",
                          "path": [str(tmp_path / "0.png")] * n})
    return Manifest(table, ["x", "y"], str(tmp_path))


def test_image_files_are_counted_on_disk_and_once_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "free_disk", lambda folder: 10 ** 12)
    plan = plan_memory(files(tmp_path, 1000), 64, volumes=False, workers=2, store_dir=tmp_path / "cache")
    assert plan.on_disk and plan.decoded == 1000 * 64 * 64 and plan.disk_free == 10 ** 12
    assert plan.disk == plan.decoded + 1000 * 8192          # the store, and the per-file cache's entries
    assert plan.peak == plan.decoded + max(plan.decoding, plan.training)
    assert plan.decoding == 2 * (4 * 3 * 64 * 64 + memory.WORKER_BYTES)
    assert not plan_memory(files(tmp_path, 10), 64, volumes=False, store_dir=None).disk_free


def test_a_store_that_cannot_fit_on_disk_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "free_disk", lambda folder: 30 * 2 ** 20)
    monkeypatch.setenv("MEDXFER_MEMORY", "1e12")
    with pytest.raises(MedxferError) as e:
        check_memory(files(tmp_path, 2000), 224, volumes=False, workers=2, store_dir=tmp_path / "cache")
    text = str(e.value)
    assert "\n" not in text and "not enough disk" in text and str(tmp_path / "cache") in text
    assert "--image-size" in text and "--cache-dir" in text
    size = int(text.split("--image-size ")[1].split()[0])
    assert plan_memory(files(tmp_path, 2000), size, volumes=False, store_dir=tmp_path / "c").disk <= 30 * 2 ** 20


def test_too_many_workers_are_told_to_be_fewer(monkeypatch, tmp_path):
    plan = plan_memory(files(tmp_path, 10), 8, volumes=False, workers=16, batch_size=2, arch="test_resnet")
    monkeypatch.setenv("MEDXFER_MEMORY", str(plan.peak - 1))
    with pytest.raises(MedxferError, match=r"--workers 15 or less"):
        check_memory(files(tmp_path, 10), 8, volumes=False, workers=16, batch_size=2, arch="test_resnet")
