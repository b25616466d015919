"""``medxfer pretrain supervised|ssl``: make a source directory that ``--source DIR`` takes everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medxfer.commands.base import RESUME, Given, command, launch_torchrun, option_fields, out
from medxfer.commands.group import lazy_group
from medxfer.errors import MedxferError

SSL_DATA = ("data", "split_by", "split_seed", "on_bad_file", "window", "frame", "slice", "intensity", "cache_dir",
            "no_cache")
#: the two commands, each imported when called (ssl's options come from SSLConfig, which needs PyTorch)
COMMANDS = {"supervised": ("medxfer.commands.pretrain:register_supervised", "Train a source model on a labelled "
                           "source domain (full from --source, scratch with --weights none); keep its backbone as a "
                           "source."),
            "ssl": ("medxfer.commands.pretrain:register_ssl", "Self-supervised pretraining on unlabelled images "
                    "(--splits, never test); keep the backbone as a source.")}
HIDDEN = dict(hidden=True)


def _renamed(arch: Optional[str], init: Optional[str]) -> None:
    """--arch/--init of earlier versions: one name per concept now, as in 'medxfer train'."""
    if init is not None:
        raise MedxferError(f"--init was renamed: start from a source with --source {init} (as in 'medxfer train').")
    if arch is not None:
        raise MedxferError(f"--arch was renamed: use --source {arch} --weights none for random initial weights (as in "
                           "'medxfer train').")


def _done(meta: dict, out_dir: str) -> None:
    t = meta["trained_on"]
    out.print(f"source '{meta['name']}' ({meta['arch']}, {meta.get('method')}, {t['epochs']} epochs on "
              f"{Path(str(t['data'])).name}) -> {out_dir}; use it with --source {out_dir}", markup=False,
              highlight=False)


def register(app: typer.Typer) -> None:
    sub = typer.Typer(cls=lazy_group(COMMANDS), no_args_is_help=True,
                      help="Make your own source model (stage 1): supervised or self-supervised.")
    app.add_typer(sub, name="pretrain")


def register_supervised(app: typer.Typer) -> None:
    @command(app, "supervised", option_fields(exclude=("devices",)), interrupted=RESUME)
    def supervised(given: Given,
                   name: Optional[str] = typer.Option(None, help="Source name.", show_default="the directory's name",
                                                      rich_help_panel="Run"),
                   arch: Optional[str] = typer.Option(None, **HIDDEN), init: Optional[str] = typer.Option(None, **HIDDEN)):
        """Train a source model on a labelled source domain (full from --source, scratch with --weights none); keep
        its backbone as a source. --out is the source directory."""
        _renamed(arch, init)
        cfg = given.config()
        from medxfer.pretrain import pretrain_supervised

        _done(pretrain_supervised(cfg, name=name), cfg.runtime.out)


def register_ssl(app: typer.Typer) -> None:
    from medxfer.pretrain import SSLConfig, pretrain_ssl

    own = tuple(n for n, (group, _) in SSLConfig.flat_names().items() if group == "ssl")

    @command(app, "ssl", option_fields(config=SSLConfig, only=SSL_DATA + ("source", "weights", "image_size", "grey_mode",
                                                                          "out", "resume", "devices", "num_threads")
                                       + own), interrupted=RESUME)
    def ssl(given: Given, arch: Optional[str] = typer.Option(None, **HIDDEN),
            init: Optional[str] = typer.Option(None, **HIDDEN)):
        """Self-supervised pretraining on unlabelled images (--splits, never test); keep the backbone as a source."""
        _renamed(arch, init)
        cfg = given.config(cls=SSLConfig)
        code = launch_torchrun(cfg.runtime.devices)
        if code is not None:
            raise typer.Exit(code)
        meta = pretrain_ssl(cfg)
        if meta:
            _done(meta, cfg.runtime.out)
