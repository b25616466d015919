"""The ``medxfer`` command line: this module only assembles the app. Each command lives in its own module
under :mod:`medxfer.commands` and is imported when it is called (or its help is asked for), so that
``medxfer --help``, ``-h`` and ``--version`` start without PyTorch; the options of train, cv, compare,
pretrain and features are generated from the fields of :mod:`medxfer.config`.

``main(argv)`` runs in-process (tests call it); user mistakes print one ``medxfer: ...`` line and
return exit code 2, never a traceback; an interrupted command says so and returns 130.
"""

from __future__ import annotations

import sys

import typer

from medxfer.commands.group import ARGV, lazy_group

#: every command, in the order --help lists them: name -> ("module:function" registering it, its one-line help)
COMMANDS = {
    "train": "Train a target model from a source model with a strategy; writes a run directory.",
    "demo": "Does transfer help when labels are few? Linear probe, full fine-tuning and scratch on bundled BreastMNIST, "
            "three seeds: test AUC with CIs, the paired test, and one sentence of what the numbers say.",
    "sources": "List source models: architecture, where the weights come from, availability, input contract.",
    "predict": "Predict calibrated class probabilities with a trained run, from the run directory alone.",
    "export": "Export a trained run for fast inference; checks it against PyTorch on real images first.",
    "features": "Export pooled backbone features (embeddings) of every sample, optionally with a logistic head.",
    "audit": "Rank the training samples most likely mislabelled (confident learning on out-of-fold probabilities) and list identical images with different labels.",
    "cv": "Cross-validate: every 'medxfer train' option applies to each fold.",
    "compare": "Compare strategies over seeds on one split: mean ± sd, a paired test vs scratch (of the strategy best "
               "on validation), a learning curve. Every 'medxfer train' option below applies to every run.",
    "report": "Write RUN_DIR/report.html (one file, opens offline), RUN_DIR/plots/*.png and RUN_DIR/model_card.md.",
    "explain": "Grad-CAM overlays: the image, the jet heat map, the predicted class and its probability (files are "
               "named by sample id: file names can hold patient names).",
    "pretrain": "Make your own source model (stage 1): supervised or self-supervised.",
    "locate": "Print the file behind each sample id (the salt must be the run's: $MEDXFER_SALT).",
    "serve": "Serve a run over HTTP: POST /v1/predict, GET /v1/model, GET /healthz, and a page at /.",
    "ensemble": "Average runs' calibrated probabilities into one run that predict, report, explain, export and serve "
                "use like any run; its temperature and threshold are fitted on validation.",
    "auto": "Search strategy x source x image size x learning rate x augmentation (Optuna: TPE, Hyperband pruning on "
            "validation) within --time-budget, then ensemble the best trials into DIR/model (a normal run "
            "directory).",
    "track": "Log a finished run to MLflow: options as params, epoch curves, test and validation results with their "
             "intervals, the model card and report. Sample and patient ids are never sent.",
}

app = typer.Typer(cls=lazy_group({name: (f"medxfer.commands.{name}:register", text) for name, text in COMMANDS.items()}),
                  add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Transfer learning for medical image classification.")


def _version(value: bool) -> None:
    if value:
        import medxfer

        print(f"medxfer {medxfer.__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="Print medxfer's version and exit.", is_eager=True,
                                       callback=_version)):
    """Transfer learning for medical image classification."""


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    from medxfer.errors import MedxferError

    argv = list(argv if argv is not None else sys.argv[1:])
    ARGV[:] = argv
    try:
        result = app(args=argv, prog_name="medxfer", standalone_mode=False)
    except MedxferError as e:
        _say(str(e))
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        result = 130
    except typer.TyperException as e:  # usage errors: unknown option, missing argument, bad value
        msg = e.format_message()
        if msg:
            _say(msg)
        return 2
    if result == 130:  # Ctrl-C before a command ran (typer turns it into exit code 130) or in torchrun's children
        _say("interrupted.")
    return result if isinstance(result, int) else 0


def _say(message: str) -> None:
    """One ``medxfer: ...`` line on stderr (plain text: a message is never rich markup)."""
    print(f"medxfer: {message}", file=sys.stderr, flush=True)
