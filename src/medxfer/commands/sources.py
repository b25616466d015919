"""``medxfer sources``: the source models you can transfer from, with their input contracts."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from medxfer.commands.base import command, out


def register(app: typer.Typer) -> None:
    @command(app, "sources")
    def sources(source_dir: list[Path] = typer.Option([], "--dir", help="Also list sources made by 'medxfer pretrain' "
                                                      "here.")):
        """List source models: architecture, where the weights come from, availability, input contract."""
        from medxfer.models.catalog import list_sources

        for s in list_sources(source_dir):
            ok, why = s.available()
            out.print(f"[bold]{escape(s.name)}[/bold]  ({'available' if ok else 'NOT available'}: {escape(why)})",
                      highlight=False)  # names and paths are text, not markup
            out.print(f"  architecture {s.arch}; weights {s.weights}; learned on {s.domain}", markup=False,
                      highlight=False)
            out.print(f"  input contract: {s.input_size} px, {s.in_chans} channels, mean {_vec(s.mean)}, std "
                      f"{_vec(s.std)} (grey images: stem summed to 1 channel, or --grey-mode replicate)", markup=False,
                      highlight=False)
        out.print("Any timm architecture also works: --source NAME --weights FILE|hub|none.", markup=False)


def _vec(v) -> str:
    return f"{v[0]:.3g}" if len(set(v)) == 1 else "/".join(f"{x:.3g}" for x in v)
