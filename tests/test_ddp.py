"""The same loop under torchrun with PyTorch DDP: 2 CPU processes (gloo), launched by --devices 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from medxfer import runs

pytestmark = pytest.mark.slow  # end to end: a few seconds to a minute each


def test_two_process_ddp_run_end_to_end(small_npz, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "medxfer", "train", "--devices", "2", "--data", str(small_npz), "--source",
           "test_resnet", "--weights", "none", "--strategy", "full", "--epochs", "2", "--image-size", "32",
           "--bootstrap", "0", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch.distributed.run" in proc.stderr  # launched by PyTorch's own launcher
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2
    history = pd.read_csv(out / "history.csv")
    assert len(history) == 2  # written once (rank 0), one row per epoch
    assert metrics["test"]["n"] == 40 and len(pd.read_csv(out / "predictions.csv")) == 80
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_shard_gives_disjoint_equal_shares():
    import torch

    from medxfer.engine.dist import DistContext, shard

    idx = torch.randperm(11)
    parts = [shard(idx, DistContext(rank=r, world=2)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 6  # padded so both ranks take the same number of steps
    assert set(parts[0].tolist()) | set(parts[1].tolist()) == set(range(11))
    assert len(set(parts[0].tolist()) & set(parts[1].tolist())) <= 1


def _kill_all(marker: str) -> None:
    """SIGKILL every process whose command line contains ``marker`` (Linux /proc), like a crashed node."""
    import signal

    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().decode(errors="replace"):
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass  # gone already


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the processes to kill in Linux /proc")
def test_ddp_run_killed_mid_training_resumes(small_npz, tmp_path):
    """Kill every process of a torchrun run once a checkpoint exists; --resume under DDP finishes the run."""
    import time

    out = tmp_path / "ddp_resume"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "medxfer", "train", "--devices", "2", "--data", str(small_npz), "--source",
           "test_resnet", "--weights", "none", "--strategy", "full", "--epochs", "30", "--image-size", "32",
           "--bootstrap", "0", "--no-report", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    deadline = time.time() + 240
    checkpoint = runs.checkpoint_path(out)  # the unfinished run lives in OUT.partial/
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    _kill_all(str(out))  # launcher, torchrun and both workers (elastic starts workers in their own groups)
    proc.wait()
    assert checkpoint.exists() and not (out / "metrics.json").exists()
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == list(range(1, 31))  # every epoch once: none lost, none repeated
    assert json.loads((out / "metrics.json").read_text())["processes"] == 2
    assert not checkpoint.exists() and not (out / "checkpoint.pt").exists() and not checkpoint.parent.exists()
