"""An interrupted training run continues from its last epoch (``--resume``) and ends where an
uninterrupted one ends; the same for supervised pretraining."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from medxfer import runs
from medxfer.cli import main
from medxfer.config import TrainConfig
from medxfer.engine.handlers import Checkpoint
from medxfer.pipeline import train

pytestmark = pytest.mark.slow  # end to end: a few seconds to a minute each

ARGS = ["--source", "test_resnet", "--weights", "none", "--strategy", "full", "--epochs", "3", "--image-size", "32",
        "--bootstrap", "20", "--no-report", "--label-names", "malignant,benign", "--seed", "1"]


class Stop(Exception):
    pass


@contextlib.contextmanager
def stop_after(n):
    """Inside this block, a training loop dies once epoch ``n`` is checkpointed (like a killed process):
    the Checkpoint handler raises Stop right after writing that epoch."""
    original = Checkpoint.on_epoch_end

    def on_epoch_end(self, loop, record):
        original(self, loop, record)
        if record["epoch"] == n:
            raise Stop

    Checkpoint.on_epoch_end = on_epoch_end
    try:
        with pytest.raises(Stop):
            yield
    finally:
        Checkpoint.on_epoch_end = original


@contextlib.contextmanager
def log_lines():
    """The messages medxfer logs inside the block."""
    import logging

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger, handler = logging.getLogger("medxfer"), Keep()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_train_resumes_where_it_stopped(small_npz, tmp_path, capsys):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert main(["train", "--data", str(small_npz), *ARGS, "--out", str(straight)]) == 0
    assert not runs.checkpoint_path(straight).exists()  # a finished run keeps no checkpoint
    cfg = TrainConfig.create(data=str(small_npz), out=str(cut), source="test_resnet", weights="none", strategy="full",
                             epochs=3, image_size=32, bootstrap=20, report=False, label_names=("malignant", "benign"),
                             seed=1)
    with stop_after(2):
        train(cfg)
    ckpt = torch.load(runs.checkpoint_path(cut), map_location="cpu", weights_only=True)  # plain data only
    assert ckpt["loop"]["epoch"] == 2 and len(ckpt["loop"]["history"]) == 2 and not (cut / "metrics.json").exists()
    capsys.readouterr()

    assert main(["train", "--data", str(small_npz), *ARGS, "--out", str(cut)]) == 2  # would erase the checkpoint
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--data", str(small_npz), *ARGS, "--lr", "0.01", "--out", str(cut), "--resume"]) == 2
    assert "'lr' was" in capsys.readouterr().err

    assert main(["train", "--data", str(small_npz), *ARGS, "--out", str(cut), "--resume"]) == 0
    a, b = (pd.read_csv(d / "predictions.csv") for d in (straight, cut))
    probs = [c for c in a.columns if c.startswith("prob_")]
    assert (a[probs] - b[probs]).abs().to_numpy().max() < 1e-5  # same end point as the uninterrupted run
    hist = pd.read_csv(cut / "history.csv")
    assert hist["epoch"].tolist() == [1, 2, 3]
    assert hist["train_loss"].round(5).tolist() == pd.read_csv(straight / "history.csv")["train_loss"].round(5).tolist()
    assert not runs.checkpoint_path(cut).exists() and not runs.staging_dir(cut).exists()
    capsys.readouterr()
    assert main(["train", "--data", str(small_npz), *ARGS, "--out", str(cut), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_damaged_checkpoint_is_refused_by_name(small_npz, tmp_path, capsys):
    out = tmp_path / "run"
    runs.staging_dir(out).mkdir()
    runs.checkpoint_path(out).write_bytes(b"not a checkpoint")
    assert main(["train", "--data", str(small_npz), *ARGS, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot read checkpoint" in err and str(runs.checkpoint_path(out)) in err


def test_pretrain_supervised_resumes(small_npz, tmp_path, capsys):
    from medxfer.pretrain.supervised import pretrain_supervised

    out = tmp_path / "src"
    cfg = TrainConfig.create(data=str(small_npz), out=str(out), source="test_resnet", weights="none", image_size=32,
                             epochs=2, label_names=("malignant", "benign"), bootstrap=20, report=False)
    with stop_after(1):
        pretrain_supervised(cfg)
    assert runs.checkpoint_path(out / "run").exists() and not (out / "source.json").exists()
    argv = ["pretrain", "supervised", "--data", str(small_npz), "--source", "test_resnet", "--weights", "none",
            "--image-size", "32", "--epochs", "2", "--label-names", "malignant,benign", "--bootstrap", "20",
            "--no-report", "--out", str(out)]
    capsys.readouterr()
    assert main(argv) == 2 and "--resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    meta = json.loads((out / "source.json").read_text())
    assert meta["trained_on"]["epochs"] == 2 and (out / "model.safetensors").exists()
    assert pd.read_csv(out / "run" / "history.csv")["epoch"].tolist() == [1, 2]


def test_compare_resumes_an_interrupted_run(small_npz, tmp_path):
    from medxfer.comparison import compare

    base = TrainConfig.create(data=str(small_npz), source="test_resnet", weights="none", epochs=2, image_size=32,
                              bootstrap=20, report=False, label_names=("malignant", "benign"))
    with stop_after(1):
        compare(base, ["scratch"], [0], tmp_path)
    with log_lines() as logged:
        res = compare(base, ["scratch"], [0], tmp_path)
    assert any("resuming an interrupted run" in m for m in logged)
    run = tmp_path / "scratch" / "seed0"
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == [1, 2] and not runs.checkpoint_path(run).exists()
    assert res["strategies"]["scratch"]["test_auc"]["values"][0] is not None

    # an interrupted run of another configuration, or --retrain: its checkpoint is discarded, not resumed
    for changed, retrain in ((base.replace(lr=0.05), False), (base, True)):
        with stop_after(1):
            compare(changed, ["scratch"], [0], tmp_path / "other", resume=not retrain)
        with log_lines() as logged:
            compare(changed if retrain else base, ["scratch"], [0], tmp_path / "other", resume=not retrain)
        assert any("discarding an interrupted run's checkpoint" in m for m in logged)
        assert pd.read_csv(tmp_path / "other" / "scratch" / "seed0" / "history.csv")["epoch"].tolist() == [1, 2]
        (tmp_path / "other" / "scratch" / "seed0" / "metrics.json").unlink()  # the next round starts unfinished


def test_source_from_a_run_with_default_epochs(tiny_run, tmp_path):
    """A run trained with the default epochs has epochs: null in config.yaml; the source records the epochs run."""
    import shutil

    import yaml

    from medxfer.pretrain.supervised import source_from_run
    from medxfer.runs import seal

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["epochs"] = None
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    seal(run)  # a run written with the default epochs
    meta = source_from_run(run, tmp_path / "src")
    ran = json.loads((run / "metrics.json").read_text())["epochs_run"]
    assert meta["trained_on"]["epochs"] == ran == len(pd.read_csv(run / "history.csv"))


def test_cv_resume_continues_the_interrupted_fold(small_npz, tmp_path):
    from medxfer.crossval import cross_validate

    base = TrainConfig.create(data=str(small_npz), source="test_resnet", weights="none", epochs=2, image_size=32,
                              bootstrap=20, report=False, label_names=("malignant", "benign"), strategy="full")
    with stop_after(1):
        cross_validate(base, 3, tmp_path)
    assert runs.checkpoint_path(tmp_path / "fold_0").exists()
    with pytest.raises(Exception, match="--resume"):  # without --resume the checkpoint is not overwritten
        cross_validate(base, 3, tmp_path)
    seen = []

    def record(cfg, splits):
        seen.append((Path(cfg.runtime.out).name, cfg.runtime.resume))
        return train(cfg, splits=splits)

    report = cross_validate(base.replace(resume=True), 3, tmp_path, train_fn=record)
    assert seen == [("fold_0", True), ("fold_1", False), ("fold_2", False)]  # only the interrupted fold resumes
    assert pd.read_csv(tmp_path / "fold_0" / "history.csv")["epoch"].tolist() == [1, 2]
    assert len(report["per_fold"]) == 3


def test_compare_refuses_resume_it_does_by_itself(small_npz, tmp_path, capsys):
    argv = ["compare", "--data", str(small_npz), "--source", "test_resnet", "--weights", "none", "--strategies",
            "scratch", "--seeds", "0", "--resume", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "by itself" in capsys.readouterr().err
