"""The same loop under torchrun with PyTorch DDP: 2 CPU processes (gloo), launched by --devices 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd


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
