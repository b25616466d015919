"""What every command shares: consoles, logging, progress bars, and the options generated from the fields
of :mod:`medxfer.config` (each option declared once, with its help, real default and allowed values).

Usage (in a command module)::

    from medxfer.commands.base import command, option_fields, out

    def register(app):
        @command(app, "cv", option_fields(exclude=("out",)))
        def cv(given, folds: int = typer.Option(5)):
            from medxfer.crossval import cross_validate   # the job: imported when the command runs

            cross_validate(given.config(config_path), folds, out_dir)

A command module imports its job inside the command's body, so that ``medxfer COMMAND --help`` needs
typer and :mod:`medxfer.config` only (``medxfer.cli`` imports the module when the command is called).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Literal, Optional

import typer
from rich.console import Console
from rich.markup import escape

from medxfer import progress
from medxfer.commands.group import ARGV
from medxfer.config import Config, RuntimeOptions, TrainConfig, cli_name, flat_name
from medxfer.errors import MedxferError

console = Console(stderr=True)
out = Console(soft_wrap=True)
PANELS = {"data": "Data", "model": "Source model", "optim": "Training", "evaluation": "Evaluation", "runtime": "Run",
          "ssl": "Self-supervised", "auto": "Search"}


# ------------------------------------------------------------------------------------ logging, progress
class _Stderr(logging.Handler):
    """Log lines to the current sys.stderr (looked up at each line, so tests capture them)."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "warning: " if record.levelno == logging.WARNING else "error: " if record.levelno >= logging.ERROR else ""
        try:
            print(prefix + record.getMessage(), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging must never break a run
            self.handleError(record)


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    """medxfer's log on stderr: INFO by default, WARNING with --quiet, DEBUG with --verbose. --quiet quiets the
    screen only: a run's train.log keeps every INFO line (the logger stays at INFO, the screen's handler filters)."""
    logger = logging.getLogger("medxfer")
    for h in [h for h in logger.handlers if isinstance(h, _Stderr)]:
        logger.removeHandler(h)
    screen = _Stderr()
    screen.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    logger.addHandler(screen)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def screen_level() -> int:
    """The level of medxfer's lines on the screen (the logger's own when no screen handler is set)."""
    logger = logging.getLogger("medxfer")
    levels = [h.level for h in logger.handlers if isinstance(h, _Stderr)]
    return max(levels + [logger.level]) if levels else logger.level


class RichReporter(progress.Reporter):
    """Progress bars on a terminal; in logs and pipes, a line within 2 s of a long step (:class:`LogTask`)."""

    def __init__(self):
        self.bars = None
        self.open = 0

    def task(self, description: str, total: int | None = None, unit: str = "") -> progress.Task:
        if screen_level() > logging.INFO:
            return progress.Task()
        if not console.is_terminal:  # a log file or a pipe: lines, with the rate and the time left
            return progress.LogTask(description, total, unit)
        if self.bars is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bars = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                                 transient=True)
            self.bars.start()
        self.open += 1
        return _RichTask(self, self.bars.add_task(description, total=total, info=""))


class _RichTask(progress.Task):
    def __init__(self, reporter: RichReporter, task_id):
        self.reporter, self.id, self.closed = reporter, task_id, False

    def advance(self, n: int = 1) -> None:
        self.reporter.bars.advance(self.id, n)

    def update(self, **fields) -> None:
        self.reporter.bars.update(self.id, **fields)

    def close(self, failed: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.reporter.bars.remove_task(self.id)
        self.reporter.open -= 1
        if self.reporter.open == 0:
            self.reporter.bars.stop()
            self.reporter.bars = None


# ------------------------------------------------------------------------------------ generated options
def option_fields(groups=None, exclude=(), only=None, config: type[Config] = TrainConfig, panel: str | None = None
                  ) -> list[tuple[type, str, str, dataclasses.Field]]:
    """(options class, group, flat name, field) of the options a command takes, in declaration order;
    ``panel``: the group (of :data:`PANELS`) whose heading ``--help`` shows them all under (a command
    taking a few options of several groups, as predict)."""
    out = []
    for g in groups or tuple(config.GROUPS):
        cls = config.GROUPS[g]
        for f in dataclasses.fields(cls):
            name = flat_name(f)
            if f.metadata.get("hidden") or name in exclude or (only is not None and name not in only):
                continue
            out.append((cls, panel or g, name, f))
    return out


def _choices(cls, f: dataclasses.Field) -> tuple | None:
    hint = typing.get_type_hints(cls)[f.name]
    if f.metadata.get("choices"):
        return tuple(f.metadata["choices"])
    for arg in (hint, *typing.get_args(hint)):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return None


def _annotation(cls, f: dataclasses.Field):
    """The command-line type: choices stay text (the options check them and suggest the closest), tuples
    are comma-separated text."""
    hint = typing.get_type_hints(cls)[f.name]
    if _choices(cls, f):
        return str
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple or any(typing.get_origin(a) is tuple for a in args):
        return Optional[str]
    return Optional[args[0]] if args else hint


def _parameter(cls: type, group: str, name: str, f: dataclasses.Field) -> inspect.Parameter:
    flag = cli_name(f)
    default = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(default, tuple):
        default = ",".join(default)
    decls = [flag]
    if isinstance(default, bool):
        decls = [f"{flag}/--cache"] if flag == "--no-cache" else [f"{flag}/--no-{flag[2:]}"]
    show = f.metadata.get("show") if default is None else True
    choices = _choices(cls, f)
    opt = typer.Option(default, *decls, help=f.metadata.get("help"), rich_help_panel=PANELS[group],
                       show_default=show if show is not None else False,
                       metavar="|".join(map(str, choices)) if choices else None)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=_annotation(cls, f))


@dataclasses.dataclass
class Given:
    """The generated options of one call: every value, and those the user gave on the command line."""

    values: dict
    explicit: dict

    def config(self, path: Path | None = None, cls: type[Config] = TrainConfig, **fixed):
        """The config: ``--config FILE`` (if any), then the options given here, then ``fixed``."""
        base = cls.load(path) if path else cls()
        return base.replace(**{**self.explicit, **fixed})


class Interrupted(MedxferError):
    """Ctrl-C in a command: exit code 130 and one line saying so (and how to continue, where a command can)."""

    exit_code = 130


#: what to do after an interruption, for the commands that continue where they stopped
RESUME = "interrupted. To continue where it stopped, run the same command again with --resume."
RERUN = "interrupted. To continue, run the same command again: finished runs are reused, the interrupted one resumes."


def command(app_: typer.Typer, name: str | None = None, fields=(), *, interrupted: str = "interrupted.", **settings):
    """Register ``fn(given: Given, **own_params)`` as a command taking the generated ``fields`` as options,
    plus ``--quiet/--verbose`` (every command has them).

    Every help text is shown as written (escaped here, the one place options become typer options: a
    ``[track]`` is text, not rich markup). A command given ``--num-threads`` runs with that many PyTorch
    threads; Ctrl-C ends it with code 130 and the line ``interrupted`` (what to do next: :data:`RESUME`)."""
    def decorate(fn):
        hints = typing.get_type_hints(fn)  # annotations are strings under 'from __future__ import annotations'
        own = [_escaped(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation)))
               for p in inspect.signature(fn).parameters.values() if p.name != "given"]
        generated = [_escaped(_parameter(c, g, n, f)) for c, g, n, f in fields]
        names = [n for _, _, n, _ in fields]
        common = [inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                    default=typer.Option(False, "--quiet", "-q", help="Warnings and errors only.")),
                  inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                    default=typer.Option(False, "--verbose", "-v", help="Debug messages too."))]
        ctx_param = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)

        def wrapper(**kw):
            ctx = kw.pop("ctx")
            setup_logging(kw.pop("quiet"), kw.pop("verbose"))
            values = {n: kw.pop(n) for n in names}
            explicit = {n: v for n, v in values.items() if ctx.get_parameter_source(n).name != "DEFAULT"}
            try:
                with progress.reporting(RichReporter()), torch_threads(values.get("num_threads")):
                    if "given" in inspect.signature(fn).parameters:
                        return fn(given=Given(values, explicit), **kw)
                    return fn(**kw)
            except KeyboardInterrupt:
                raise Interrupted(interrupted) from None

        wrapper.__signature__ = inspect.Signature([ctx_param, *generated, *own, *common])
        wrapper.__doc__, wrapper.__name__ = escape(inspect.cleandoc(fn.__doc__ or "")), fn.__name__
        app_.command(name or fn.__name__.replace("_", "-"), **settings)(wrapper)
        return fn

    return decorate


def _escaped(p: inspect.Parameter) -> inspect.Parameter:
    """The parameter with its help as text: typer reads help as rich markup, which ate '[track]'."""
    info = p.default
    if not isinstance(info, (typer.models.OptionInfo, typer.models.ArgumentInfo)) or not info.help:
        return p
    info = copy.copy(info)
    info.help = escape(info.help)
    return p.replace(default=info)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """PyTorch's CPU threads set to ``n`` for the command (checked as ``--num-threads`` is everywhere); None:
    PyTorch's own, and torch is not imported here."""
    if n is None:
        yield
        return
    RuntimeOptions(num_threads=n)  # the option's own check: one line naming it and its bound
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def print_wide(renderable, width: int) -> None:
    """Print to stdout at least ``width`` columns wide when it is not a terminal (logs and pipes default
    to 80 columns, which cuts table cells); on a terminal, its own width."""
    (out if out.is_terminal else Console(width=max(out.width, width), soft_wrap=True)).print(renderable)




def launch_torchrun(devices: int) -> int | None:
    """With ``devices`` > 1 outside torchrun: run this very command under ``torchrun --standalone
    --nproc_per_node devices`` (PyTorch's own launcher) and return its exit code; else None."""
    if devices <= 1 or "WORLD_SIZE" in os.environ:
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
           "-m", "medxfer", *ARGV]
    console.print(f"[dim]launching: {' '.join(cmd[2:])}[/dim]", highlight=False)
    return subprocess.call(cmd)
