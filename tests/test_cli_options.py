"""Options declared once everywhere: a command taking an option train takes gets train's, not a copy."""

from __future__ import annotations

import pytest
import typer

from medxfer.cli import app, main

SHARED = {"predict": ("batch_size", "on_bad_file", "keep_paths", "num_threads"),
          "explain": ("keep_paths", "num_threads"),
          "compare": ("split_seed", "num_threads")}


def _type(param):
    return param.type_descriptor.annotation


def _params(name: str) -> dict:
    command = typer.main.get_command(app).commands[name].load()
    return {p.name: p for p in command.params}


@pytest.mark.parametrize("command", sorted(SHARED))
def test_shared_options_are_trains_own(command):
    train, own = _params("train"), _params(command)
    for name in SHARED[command]:
        a, b = train[name], own[name]
        assert (b.opts, b.secondary_opts, b.help, b.default, _type(b)) == \
            (a.opts, a.secondary_opts, a.help, a.default, _type(a)), (command, name)


def test_predict_checks_its_options_as_train_does(capsys):
    assert main(["predict", "no-run", "no-image", "--on-bad-file", "skp"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("medxfer: The 'on-bad-file' parameter must be one of ['error', 'skip']. Got 'skp' instead. "
                           "Did you mean 'skip'?")
    assert main(["predict", "no-run", "no-image", "--batch-size", "0"]) == 2
    assert "The 'batch-size' parameter must be at least 1. Got 0 instead." in capsys.readouterr().err


def test_no_command_declares_a_train_flag_with_another_type():
    """compare's learning curve is --label-fractions (a list): --label-fraction is train's one fraction."""
    train = _params("train")
    flags = {opt: p for p in train.values() for opt in p.opts}
    for command in typer.main.get_command(app).commands:
        for p in _params(command).values():
            for opt in p.opts:
                # --out is each command's own output (a path); demo (not ours here) takes --seed as its seeds' list
                if opt in flags and opt != "--out" and command != "demo":
                    assert _type(p) == _type(flags[opt]), (command, opt)
