"""A command group that lists its commands from a table and imports a command's module only when that
command runs or shows its help, so that ``medxfer --help`` (and each ``COMMAND --help``) does not pay
for PyTorch and the libraries of the other commands.

Usage::

    app = typer.Typer(cls=lazy_group({"train": ("medxfer.commands.train:register", "Train a target model.")}))

Each entry is ``name -> ("module:function", one-line help)``; ``function(app)`` registers the command
(one ``@command(app, name)``) on the app it is given. The one-line help is what ``--help`` lists (a
test holds it equal to the command's own docstring). This module imports nothing but typer.
"""

from __future__ import annotations

import importlib

import typer
from typer.core import TyperGroup

ARGV: list[str] = []     # the arguments main() was given (also when called in-process; launch_torchrun uses them)


class _Listed(typer.core.TyperCommand):
    """A command as the group's help lists it, before its module is imported."""

    def __init__(self, name: str, where: str, help: str):
        from rich.markup import escape

        super().__init__(name=name, help=escape(help))  # text, as every help (medxfer.commands.base.command)
        self.where = where

    def load(self) -> typer.core.TyperCommand | TyperGroup:
        module, function = self.where.split(":")
        holder = typer.Typer()
        holder.callback()(lambda: None)  # a group, so that the command keeps its name
        getattr(importlib.import_module(module), function)(holder)
        return typer.main.get_command(holder).commands[self.name]


class LazyGroup(TyperGroup):
    """A typer group whose commands come from ``TABLE`` (see the module docstring); commands registered on the
    app itself (tests do) come first."""

    TABLE: dict[str, tuple[str, str]] = {}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name, (where, help) in self.TABLE.items():
            self.commands.setdefault(name, _Listed(name, where, help))

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        if isinstance(cmd, _Listed):
            cmd = self.commands[name] = cmd.load()
        return name, cmd, rest


def lazy_group(table: dict[str, tuple[str, str]]) -> type[LazyGroup]:
    """A :class:`LazyGroup` class listing ``table`` (typer takes a class, not an instance)."""
    return type("LazyGroup", (LazyGroup,), {"TABLE": dict(table)})
