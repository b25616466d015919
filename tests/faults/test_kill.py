"""Runs killed at random moments never leave a mixed run directory; a decompression bomb costs no memory.

SIGKILL a retrain into an existing run directory (``--overwrite``) at random moments; after
each kill the directory is the complete old run or the complete new one, and ``predict`` works.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from medxfer import runs
from tests.faults.conftest import cli

pytestmark = pytest.mark.slow  # end to end: a few seconds to a minute each

TRIALS = 20
ARGS = ["--source", "test_resnet", "--weights", "none", "--image-size", "32", "--epochs", "3", "--bootstrap", "50",
        "--label-names", "malignant,benign"]


def _cmd(data, out, seed):
    return [sys.executable, "-m", "medxfer", "train", "--data", str(data), *ARGS, "--seed", str(seed), "--overwrite",
            "--out", str(out)]


def _state(run: Path) -> str:
    """The sha256 of the run's weights, after checking the directory is one complete, consistent run."""
    assert runs.is_finished(run), sorted(p.name for p in run.iterdir())
    meta = json.loads((run / "model.json").read_text())
    assert runs.sha256_file(run / "model.safetensors") == meta["weights_sha256"]  # weights and model.json agree
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["seed"] == yaml.safe_load((run / "config.yaml").read_text())["optim"]["seed"]  # one run's files
    return meta["weights_sha256"]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_at_random_moments_leaves_old_or_new_run(small_npz, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDXFER_CACHE_DIR": str(tmp_path / "cache")}
    t0 = time.perf_counter()
    subprocess.run(_cmd(small_npz, run, 0), check=True, env=env, capture_output=True)
    full = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    seen = {"old": 0, "new": 0}
    for trial in range(TRIALS):
        before = _state(run)
        proc = subprocess.Popen(_cmd(small_npz, run, trial + 1), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(float(rng.uniform(0.3, full * 1.1)))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        after = _state(run)
        seen["old" if after == before else "new"] += 1
        code, text = cli("predict", run, small_npz, "--out", tmp_path / "p.csv")
        assert code == 0, text
        shutil.rmtree(runs.staging_dir(run), ignore_errors=True)  # a killed run's checkpoint: start afresh next time
    assert seen["old"] + seen["new"] == TRIALS
    print(f"after {TRIALS} kills: {seen['old']} times the old run, {seen['new']} times the new run")


def test_bomb_png_costs_little_memory(tmp_path):
    """Training on a folder holding one 16000 x 16000 PNG, with --on-bad-file skip: peak RSS under 2 GB."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for s, n in (("train", 8), ("val", 4), ("test", 4)):
        for c in "ab":
            (tmp_path / "d" / s / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / "d" / s / c / f"{i}.png")
    Image.new("L", (16000, 16000)).save(tmp_path / "d" / "train" / "a" / "big.png", optimize=True)
    assert (tmp_path / "d" / "train" / "a" / "big.png").stat().st_size < 2**20
    code = ("import resource, sys; from medxfer.cli import main; rc = main(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, "train", "--data", str(tmp_path / "d"), *ARGS[:6], "--epochs",
                           "1", "--no-report", "--bootstrap", "0", "--on-bad-file", "skip", "--no-cache",
                           "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    peak_kb = int(done.stdout.split("PEAK")[-1].split()[0])
    assert peak_kb < 2 * 2**20, f"peak RSS {peak_kb / 2**20:.2f} GB"
    assert "above the limit" in (tmp_path / "r" / "skipped.csv").read_text()
