"""Start-up: `medxfer --help`, `-h`, `--version` and each command's help without PyTorch; the listed help is
each command's own; help text is shown as written (brackets survive rich markup)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest
import typer
from rich.markup import escape
from typer.testing import CliRunner

from medxfer.cli import main

#: commands whose options need no PyTorch (auto's and pretrain ssl's come from modules that import it; serve's too)
LIGHT = ["train", "demo", "sources", "predict", "export", "features", "cv", "compare", "report", "explain", "pretrain",
         "pretrain supervised", "locate", "ensemble", "track"]


def _in_fresh_python(code: str) -> dict:
    """Run ``code`` in a new interpreter; it prints one JSON line last."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_version_and_command_help_import_no_torch():
    got = _in_fresh_python(
        "import contextlib, io, json, sys\n"
        "from medxfer.cli import main\n"
        f"calls = [['--help'], ['-h'], ['--version'], *[[*c.split(), '--help'] for c in {LIGHT!r}], ['predict', '-h']]\n"
        "codes, text = [], io.StringIO()\n"
        "with contextlib.redirect_stdout(text):\n"
        "    for argv in calls:\n"
        "        codes.append(main(argv))\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'pandas', 'sklearn', 'scipy', 'matplotlib') if m in sys.modules)\n"
        "print(json.dumps({'codes': codes, 'heavy': heavy, 'text': text.getvalue()}))\n")
    assert set(got["codes"]) == {0}, got["codes"]
    assert got["heavy"] == [], got["heavy"]
    assert "--num-threads" in got["text"] and "--label-names" in got["text"]


def test_version_and_module_entry_point():
    import medxfer

    for argv in (["-m", "medxfer", "--version"], ["-m", "medxfer", "-h"]):
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    assert done.stdout.count("Usage: medxfer") == 1
    version = subprocess.run([sys.executable, "-m", "medxfer", "--version"], capture_output=True, text=True,
                             timeout=300).stdout
    assert version.strip() == f"medxfer {medxfer.__version__}"


def test_import_medxfer_is_light_and_its_names_load_when_used():
    got = _in_fresh_python(
        "import json, sys\n"
        "import medxfer, medxfer.config\n"
        "light = 'torch' not in sys.modules\n"
        "cfg = medxfer.TrainConfig.create(strategy='full')\n"
        "still = 'torch' not in sys.modules\n"
        "print(json.dumps({'light': light, 'still': still, 'all': sorted(medxfer.__all__),\n"
        "                  'dir': all(n in dir(medxfer) for n in medxfer.__all__), 'train': callable(medxfer.train)}))\n")
    assert got["light"] and got["still"] and got["dir"] and got["train"]
    assert {"train", "Predictor", "cv", "compare", "load_run", "__version__"} <= set(got["all"])


def test_listed_help_is_each_commands_own():
    """--help lists each command from cli.COMMANDS before importing it: the line must be the command's own."""
    from medxfer.cli import COMMANDS, app

    group = typer.main.get_command(app)
    for name, text in COMMANDS.items():
        real = group.commands[name].load()
        own = inspect.cleandoc(real.help).split("\n\n")[0].replace("\n", " ")
        assert own == group.commands[name].help == escape(text), name


def test_generated_and_written_help_keep_their_brackets(capsys):
    assert main(["train", "--help"]) == 0
    assert "pip install 'medxfer[track]'" in capsys.readouterr().out

    from medxfer.commands.base import command

    mini = typer.Typer()
    mini.callback()(lambda: None)

    @command(mini, "hello")
    def hello(name: str = typer.Option("x", help="A name like [bold]this[/bold] or medxfer[track].")):
        """Say hello to [red]you[/red]."""

    text = CliRunner().invoke(mini, ["hello", "--help"], terminal_width=200).output
    assert "[bold]this[/bold]" in text and "medxfer[track]" in text and "[red]you[/red]" in text


@pytest.mark.parametrize("command", ["demo", "predict", "explain", "export", "features"])
def test_commands_that_compute_take_num_threads(command, capsys):
    assert main([command, "--help"]) == 0
    assert "--num-threads" in capsys.readouterr().out


def test_num_threads_is_checked_like_every_option(capsys):
    assert main(["predict", "run", "x.png", "--num-threads", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "medxfer: The 'num-threads' parameter must be at least 1. Got 0 instead."
