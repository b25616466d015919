"""The HTML report: sections, self-contained figures, no patient ids, multi-class, headless Chromium."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from medxfer.runs import seal

pytestmark = pytest.mark.slow  # end to end: a few seconds to a minute each

SECTIONS = ("data", "source", "training", "roc", "confusion", "calibration", "metrics", "gradcam")
BINARY_PLOTS = {"training_curves", "roc", "pr", "confusion_matrix", "reliability", "gradcam_malignant",
                "gradcam_benign"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def cli_main(argv: list[str]) -> int:
    """medxfer.cli.main with the report and explain commands registered (idempotent)."""
    from medxfer import cli
    from medxfer.commands import explain, report

    have = {c.name or c.callback.__name__ for c in cli.app.registered_commands}
    for name, module in (("report", report), ("explain", explain)):
        if name not in have:
            module.register(cli.app)
    return cli.main(argv)


def squares_npz_file(path: Path, n=(240, 60, 60), size: int = 32, seed: int = 0) -> Path:
    """Three classes decided by where a bright 8x8 square is: none, top-left quadrant, bottom-right."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, k in zip(("train", "val", "test"), n):
        y = np.arange(k) % 3
        x = np.clip(rng.normal(70, 20, (k, size, size)), 0, 255)
        for i, c in enumerate(y):
            if c:
                r0, c0 = rng.integers(1, size // 2 - 9, 2) + (size // 2 if c == 2 else 0)
                x[i, r0:r0 + 8, c0:c0 + 8] = 230
        out[f"{split}_images"], out[f"{split}_labels"] = x.astype(np.uint8), y[:, None]
    np.savez(path, **out)
    return path


_BUILT: dict[str, Path] = {}  # test_explain imports these fixtures: build once per session, not per module


@pytest.fixture(scope="session")
def squares_npz(tmp_path_factory) -> Path:
    if "npz" not in _BUILT:
        _BUILT["npz"] = squares_npz_file(tmp_path_factory.mktemp("squares") / "squares.npz")
    return _BUILT["npz"]


@pytest.fixture(scope="session")
def squares_run(tmp_path_factory, squares_npz) -> Path:
    """A 3-class run of test_resnet that learns the square task (test accuracy 1.0 at seed 0)."""
    if "run" not in _BUILT:
        _BUILT["run"] = _train_squares(tmp_path_factory.mktemp("runs") / "squares", squares_npz)
    return _BUILT["run"]


def _train_squares(out: Path, squares_npz: Path) -> Path:
    code = cli_main(["train", "--data", str(squares_npz), "--source", "test_resnet", "--weights", "none",
                     "--strategy", "full", "--epochs", "4", "--batch-size", "16", "--lr", "0.005",
                     "--augment", "none", "--image-size", "32", "--bootstrap", "50",
                     "--label-names", "none,top_left,bottom_right", "--out", str(out)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def binary_report(tiny_run, tmp_path_factory) -> tuple[Path, str]:
    from medxfer.evaluation.report import write_report

    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "plots", ignore_errors=True)
    for name in ("predictions.csv", "split.csv"):  # a (hashed) patient id that must not leak
        df = pd.read_csv(run / name)
        df["patient_id"] = [f"p-secret{i:06d}" for i in range(len(df))]
        df.to_csv(run / name, index=False)
    seal(run)  # a run written with patient ids
    path = write_report(run)
    assert path == run / "report.html"
    return run, path.read_text()


def _img_sources(text: str) -> list[str]:
    return re.findall(r"<img[^>]*\ssrc=\"([^\"]*)\"", text)


def test_report_has_every_section(binary_report):
    _, text = binary_report
    for sid in SECTIONS:
        assert f"<section id='{sid}'>" in text
    for words in ("malignant", "benign", "PPV", "NPV", "F1", "balanced accuracy", "test argmax",
                  "before temperature", "youden", "test_resnet", "95% CI"):
        assert words in text, words
    assert re.search(r"\d\.\d{3} <span class='muted'>\(\d\.\d{3}–\d\.\d{3}\)</span>", text)  # value (CI)
    assert "4×4 map" in text  # the coarse-map note (test_resnet at 32 px: layer2)


def test_report_is_self_contained(binary_report):
    run, text = binary_report
    sources = _img_sources(text)
    assert len(sources) == len(BINARY_PLOTS)
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        img.verify()
        assert img.format == "PNG"
    # outside the embedded images (whose base64 may spell anything, 'http' included): no address at all
    bare = re.sub(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+", "", text)
    assert "http" not in bare.lower() and "data:image/png;base64," not in bare
    assert "<link" not in text and "<script src" not in text and "@import" not in text
    assert {p.stem for p in (run / "plots").glob("*.png")} == BINARY_PLOTS
    for p in (run / "plots").glob("*.png"):
        assert Image.open(p).size[0] > 100


def test_report_never_shows_patient_ids(binary_report):
    _, text = binary_report
    assert "p-secret" not in text
    assert "test/000" in text  # images are named by sample_id


def test_report_multiclass(squares_run, squares_npz):
    from medxfer.data.loading import arrays_to_uint8
    from medxfer.evaluation.report import write_report

    test_images = arrays_to_uint8(np.load(squares_npz)["test_images"], 32)  # as train hands them over
    text = write_report(squares_run, test_images=test_images).read_text()
    assert "Per class (one-vs-rest)" in text and "macro AUC" in text
    for name in ("none", "top_left", "bottom_right"):
        assert f"<td>{name}</td>" in text
        assert (squares_run / "plots" / f"gradcam_{name}.png").exists()
    assert "one-vs-rest" in text
    assert len(_img_sources(text)) == 8  # curves, roc, pr, confusion, reliability + 3 galleries


def test_report_cli_and_missing_data(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    data = cfg["data"]["path"]
    cfg["data"]["path"] = str(tmp_path / "moved.npz")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    seal(run)  # a run whose data has moved since
    assert cli_main(["report", str(run)]) == 0  # the gallery from the test images kept with the run
    assert "No Grad-CAM gallery" not in (run / "report.html").read_text()
    (run / "check_images.safetensors").unlink()
    seal(run)  # as a run of an earlier release (no kept images) whose data has moved
    assert cli_main(["report", str(run)]) == 0  # the report is written; the gallery says why it is missing
    text = (run / "report.html").read_text()
    assert "No Grad-CAM gallery" in text and "--data" in text
    assert "no Grad-CAM gallery" in capsys.readouterr().err
    assert cli_main(["report", str(run), "--data", data]) == 0
    assert "No Grad-CAM gallery" not in (run / "report.html").read_text()
    assert cli_main(["report", str(run), "--no-gradcam"]) == 0
    assert "not requested" in (run / "report.html").read_text()
    assert cli_main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a finished run directory" in capsys.readouterr().err


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(binary_report, tmp_path):
    run, text = binary_report
    url = (run / "report.html").resolve().as_uri()
    n = len(_img_sources(text))
    dom = _chromium(["--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", url], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f'data-figures="ok {n}"' in dom.stdout, re.findall(r'data-figures="[^"]*"', dom.stdout)
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    shot = tmp_path / "report.png"
    res = _chromium(["--hide-scrollbars", f"--screenshot={shot}", "--window-size=1280,4000", url], tmp_path)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (4000, 1280, 3)
    not_white = (pixels < 240).any(axis=2).mean()
    assert not_white > 0.05, not_white  # text, tables and figures, not a blank page
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 200  # colour plots rendered
