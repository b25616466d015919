"""First contact: Ctrl-C says what happened and how to continue, locate finds what predict named, --keep-paths
keeps any file name, every file medxfer writes follows the umask, demo and --num-threads."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medxfer.cli import main
from medxfer.privacy import sample_id

TINY = ["--source", "test_resnet", "--weights", "none", "--strategy", "full", "--image-size", "32", "--bootstrap", "0",
        "--no-report", "--label-names", "malignant,benign"]


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_in_train_says_how_to_continue_and_resume_does(small_npz, tmp_path, monkeypatch, capsys):
    from medxfer.engine.handlers import Checkpoint

    original = Checkpoint.on_epoch_end

    def interrupt_after_the_first(self, loop, record):
        original(self, loop, record)
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    args = ["train", "--data", str(small_npz), *TINY, "--epochs", "2", "--out", str(tmp_path / "run")]
    monkeypatch.setattr(Checkpoint, "on_epoch_end", interrupt_after_the_first)
    assert main(args) == 130
    assert _last_line(capsys.readouterr().err) == ("medxfer: interrupted. To continue where it stopped, run the same "
                                                   "command again with --resume.")
    monkeypatch.setattr(Checkpoint, "on_epoch_end", original)
    assert main([*args, "--resume"]) == 0
    assert pd.read_csv(tmp_path / "run" / "history.csv")["epoch"].tolist() == [1, 2]


def test_ctrl_c_before_the_first_epoch_says_there_is_nothing_to_resume(small_npz, tmp_path, monkeypatch, capsys):
    from medxfer import pipeline

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline._Job, "run", interrupted)
    assert main(["train", "--data", str(small_npz), *TINY, "--out", str(tmp_path / "run")]) == 130
    line = _last_line(capsys.readouterr().err)
    assert line.startswith("medxfer: interrupted before the first epoch ended: nothing to resume") and "Run the same " \
        "command again" in line


def test_ctrl_c_elsewhere_says_interrupted(small_npz, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("medxfer.models.catalog.list_sources", interrupted)
    assert main(["sources"]) == 130
    assert _last_line(capsys.readouterr().err) == "medxfer: interrupted."
    monkeypatch.setattr("medxfer.comparison.compare", interrupted)  # compare resumes by itself, without --resume
    assert main(["compare", "--data", str(small_npz), *TINY[:4]]) == 130
    line = _last_line(capsys.readouterr().err)
    assert "run the same command again: finished runs are reused" in line and "--resume" not in line
    monkeypatch.setattr("medxfer.commands.group._Listed.load", interrupted)  # before any command runs
    assert main(["sources"]) == 130
    assert _last_line(capsys.readouterr().err) == "medxfer: interrupted."


# ------------------------------------------------------------------------------------------ ids and files
def _odd_name(folder: Path) -> Path | None:
    """A PNG whose name is not valid UTF-8 (b'caf\\xe9.png'), or None where the file system refuses one."""
    try:
        path = Path(os.fsdecode(os.path.join(os.fsencode(folder), b"caf\xe9.png")))
        Image.fromarray(np.full((28, 28), 90, np.uint8)).save(path, format="PNG")
        return path
    except (OSError, ValueError):
        return None


def _folder_of_scans(tmp_path: Path) -> Path:
    """A plain folder of images, no class folders (what predict reads)."""
    scans = tmp_path / "scans"
    (scans / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "sub/b.png"):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(scans / name)
    return scans


def test_locate_finds_the_files_predict_named_in_a_plain_folder(tmp_path, capsysbinary):
    from medxfer.data.inputs import iter_inputs
    from medxfer.data.readers import ReadOptions

    scans = _folder_of_scans(tmp_path)
    odd = _odd_name(scans)
    named: list = []
    for _ in iter_inputs([str(scans)], 16, 1, ReadOptions(), paths=named):  # predict's walk and naming
        pass
    assert len(named) == 2 + (odd is not None)
    assert main(["locate", "--data", str(scans), *(sid for sid, _ in named)]) == 0
    lines = capsysbinary.readouterr().out.splitlines()
    assert lines == [sid.encode() + b"\t" + os.fsencode(path) for sid, path in named]
    assert main(["locate", "--data", str(scans), "s-0000000000000000"]) == 2
    assert b"1 id(s) are not samples of" in capsysbinary.readouterr().err


def test_keep_paths_keeps_a_file_name_that_is_not_utf8(tiny_run, tmp_path):
    scans = _folder_of_scans(tmp_path)
    odd = _odd_name(scans)
    if odd is None:
        pytest.skip("this file system takes UTF-8 names only")
    out = tmp_path / "p.csv"
    assert main(["predict", str(tiny_run), str(scans), "--out", str(out), "--keep-paths"]) == 0
    mapping = (tmp_path / "p_paths.csv").read_bytes()
    assert mapping.startswith(b"sample_id,path\n") and os.fsencode(odd) in mapping
    assert sample_id(str(odd)).encode() in mapping
    assert len(pd.read_csv(out)) == 3


def test_every_file_medxfer_writes_follows_the_umask(tiny_run, tmp_path):
    from medxfer import files

    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.relative_to(tiny_run).as_posix(): p.stat().st_mode & 0o777 for p in tiny_run.rglob("*") if p.is_file()}
    assert any(name.startswith("plots/") for name in modes) and "metrics.json" in modes
    assert set(modes.values()) == {0o666 & ~umask}, modes  # run files, plots, report: one rule
    try:
        for mask in (0o077, 0o027):
            os.umask(mask)
            files.write_text(tmp_path / f"t{mask:o}.txt", "x")
            assert (tmp_path / f"t{mask:o}.txt").stat().st_mode & 0o777 == 0o666 & ~mask
    finally:
        os.umask(umask)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------ demo, --num-threads
def test_num_threads_holds_while_the_command_runs(tiny_run, small_npz, tmp_path, monkeypatch):
    import torch

    from medxfer.predict import Predictor

    seen = []
    original = Predictor.predict

    def predict(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict", predict)
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1
    assert main(["predict", str(tiny_run), str(small_npz), "--out", str(tmp_path / "p.csv"), "--num-threads",
                 str(wanted)]) == 0
    assert seen == [wanted] and torch.get_num_threads() == before
