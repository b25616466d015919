"""What training minimises and how validation scores it, per kind of task.

Usage::

    obj = objective("multilabel", n_labels=14, pos_weight=w)   # or "single" (binary/multiclass), "ordinal"
    obj.outputs                     # the head's width: K (single, multilabel) or K-1 (ordinal, CORN)
    loss = obj.loss(logits, y)      # y: class indices, or the (N, K) 0/1 matrix of a multi-label task
    obj.validate(logits, y)         # {"val_loss", "val_loss_calibrated", "val_auc"}: early stopping, history

* ``single``: cross-entropy (optionally class-weighted); AUC (one-vs-rest macro for K > 2).
* ``multilabel``: binary cross-entropy per finding (optional per-finding positive weights); the
  validation AUC is the mean over the findings with both classes in validation.
* ``ordinal``: the CORN loss (:mod:`medxfer.models.ordinal`); the validation loss is the negative
  log-likelihood of the grade probabilities (comparable across heads), the AUC the mean over the
  "grade >= k" cuts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from sklearn.metrics import roc_auc_score

from medxfer.models.ordinal import corn_loss, corn_probabilities

KINDS = ("single", "multilabel", "ordinal")


def kind_of(task: str) -> str:
    """binary/multiclass -> single; multilabel and ordinal as they are."""
    return task if task in ("multilabel", "ordinal") else "single"


@dataclass
class Objective:
    kind: str
    n_labels: int
    class_weights: torch.Tensor | None = None   # single: per class; multilabel: positive weight per finding

    @property
    def outputs(self) -> int:
        return self.n_labels - 1 if self.kind == "ordinal" else self.n_labels

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = None if self.class_weights is None else self.class_weights.to(logits.device)
        if self.kind == "multilabel":
            return F.binary_cross_entropy_with_logits(logits, y.float(), pos_weight=w)
        if self.kind == "ordinal":
            return corn_loss(logits, y, self.n_labels)
        return F.cross_entropy(logits, y, weight=w)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Uncalibrated: softmax, sigmoid per finding, or the CORN grade probabilities."""
        if self.kind == "multilabel":
            return torch.sigmoid(logits)
        if self.kind == "ordinal":
            return corn_probabilities(logits)
        return logits.softmax(1)

    def nll(self, logits: torch.Tensor, y: torch.Tensor) -> float:
        """The validation loss: cross-entropy, BCE per finding, or the NLL of the CORN grade probabilities."""
        if self.kind == "single":
            loss = F.cross_entropy(logits, y)
        elif self.kind == "multilabel":
            loss = F.binary_cross_entropy_with_logits(logits, y.float())
        else:
            loss = -torch.log(self.probabilities(logits)[torch.arange(len(y)), y].clamp_min(1e-12)).mean()
        return float(loss.item())

    def calibrated_nll(self, logits: torch.Tensor, y: torch.Tensor) -> float:
        """The loss after the best single temperature (logits / T, T in [1/20, 20]): what the epoch's ranking is
        worth once the run's temperature scaling removes its over- or under-confidence. Bounded Brent search on
        log T (softmax and sigmoid NLL are convex in 1/T), as the run's own temperature fit does."""
        res = minimize_scalar(lambda log_t: self.nll(logits / math.exp(log_t), y),
                              bounds=(-math.log(20.0), math.log(20.0)), method="bounded", options={"xatol": 1e-5})
        return min(float(res.fun), self.nll(logits, y))

    def validate(self, logits: torch.Tensor, y: torch.Tensor) -> dict:
        logits = logits.float()
        return {"val_loss": self.nll(logits, y), "val_loss_calibrated": self.calibrated_nll(logits, y),
                "val_auc": auc_score(self.kind, y.numpy(), self.probabilities(logits).numpy())}


def objective(kind: str, n_labels: int, class_weights: torch.Tensor | None = None) -> Objective:
    return Objective(kind_of(kind), n_labels, class_weights)


def auc_score(kind: str, y: np.ndarray, probs: np.ndarray) -> float:
    """The validation AUC of :class:`Objective` (NaN when undefined)."""
    if kind == "multilabel":
        aucs = [roc_auc_score(y[:, k], probs[:, k]) for k in range(y.shape[1]) if 0 < y[:, k].sum() < len(y)]
        return float(np.mean(aucs)) if aucs else float("nan")
    if len(np.unique(y)) < 2:
        return float("nan")
    if kind == "ordinal":
        above = np.cumsum(probs[:, ::-1], axis=1)[:, ::-1]   # P(grade >= k)
        aucs = [roc_auc_score(y >= k, above[:, k]) for k in range(1, probs.shape[1]) if 0 < (y >= k).sum() < len(y)]
        return float(np.mean(aucs)) if aucs else float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(probs.shape[1]))))
