"""Plots say what the run did: the training curves mark the epoch the run kept, by the measure it used."""

from __future__ import annotations

import numpy as np
import pandas as pd

from medxfer.evaluation.plots import training_figure


def _markers(fig):
    """(x, label) of every single-point line on every axis."""
    return [(float(ln.get_xdata()[0]), ln.get_label()) for ax in fig.axes for ln in ax.lines if len(ln.get_xdata()) == 1]


def test_training_curves_mark_the_kept_epoch_not_the_best_auc():
    n = 20
    auc = np.linspace(0.80, 0.85, n)
    auc[5] = 0.95                                           # epoch 6 has the best validation AUC...
    history = pd.DataFrame({"epoch": np.arange(1, n + 1), "train_loss": np.linspace(1, 0.2, n),
                            "val_loss": np.linspace(0.9, 0.3, n), "val_auc": auc})
    fig = training_figure(history, best_epoch=15, select="calibrated-loss")   # ...the run kept epoch 15
    marks = _markers(fig)
    assert marks and all(x == 15.0 and "kept: epoch 15 (by calibrated-loss)" == lab for x, lab in marks)
    assert len(marks) == 2                                  # on the loss panel and the AUC panel
    assert _markers(training_figure(history)) == []         # an unknown kept epoch is not guessed
