"""``medxfer pretrain supervised|ssl``: make a source directory that ``--source DIR`` takes everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medxfer.commands.base import Given, command, launch_torchrun, option_fields, out
from medxfer.errors import MedxferError
from medxfer.pretrain import SSLConfig, pretrain_ssl, pretrain_supervised

SSL_DATA = ("data", "split_by", "split_seed", "on_bad_file", "window", "frame", "slice", "intensity", "cache_dir",
            "no_cache")


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
              f"{Path(str(t['data'])).name}) -> {out_dir}; use it with --source {out_dir}", highlight=False)


def register(app: typer.Typer) -> None:
    sub = typer.Typer(no_args_is_help=True, help="Make your own source model (stage 1): supervised or self-supervised.")
    hidden = dict(hidden=True)

    @command(sub, "supervised", option_fields(exclude=("devices",)))
    def supervised(given: Given,
                   name: Optional[str] = typer.Option(None, help="Source name.", show_default="the directory's name",
                                                      rich_help_panel="Run"),
                   arch: Optional[str] = typer.Option(None, **hidden), init: Optional[str] = typer.Option(None, **hidden)):
        """Train a source model on a labelled source domain (full from --source, scratch with --weights none); keep
        its backbone as a source. --out is the source directory."""
        _renamed(arch, init)
        cfg = given.config()
        _done(pretrain_supervised(cfg, name=name), cfg.runtime.out)

    @command(sub, "ssl", option_fields(config=SSLConfig, only=SSL_DATA + ("source", "weights", "image_size", "grey_mode",
                                                                          "out", "resume", "devices", "num_threads")
                                       + tuple(n for n in SSLConfig.flat_names() if SSLConfig.flat_names()[n][0] == "ssl")))
    def ssl(given: Given, arch: Optional[str] = typer.Option(None, **hidden),
            init: Optional[str] = typer.Option(None, **hidden)):
        """Self-supervised pretraining on unlabelled images (--splits, never test); keep the backbone as a source."""
        _renamed(arch, init)
        cfg = given.config(cls=SSLConfig)
        code = launch_torchrun(cfg.runtime.devices)
        if code is not None:
            raise typer.Exit(code)
        meta = pretrain_ssl(cfg)
        if meta:
            _done(meta, cfg.runtime.out)

    app.add_typer(sub, name="pretrain")
