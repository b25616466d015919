"""CORN ordinal head and loss (Shi, Cao, Raschka 2021, "Deep neural networks for rank-consistent
ordinal regression based on conditional probabilities").

Usage::

    model, info = build_model(spec, num_classes=K - 1, data_chans=1)   # K grades -> K-1 logits
    loss = corn_loss(model(x), y, num_classes=K)                       # y: grades 0..K-1
    probs = corn_probabilities(model(x))                               # (N, K), rows sum to 1
    report = evaluate_ordinal(y, probs, grade_names)                   # medxfer.evaluation.ordinal

The head is an ordinary linear layer with K-1 outputs; logit k (k = 0..K-2) models the conditional
probability P(grade > k | grade > k-1) = sigmoid(z_k), trained by binary cross-entropy on the images
with grade >= k only (target: grade > k). The loss is the mean over all such (image, k) pairs.
Then P(grade > k) = prod_{j <= k} sigmoid(z_j): a product of numbers in (0, 1), so it can only fall
as k rises, and the class probabilities P(grade = k) = P(grade > k-1) - P(grade > k) are never
negative and sum to 1.

Why CORN and not CORAL: CORAL gets rank-consistent cumulative probabilities by giving the K-1
binary tasks one shared weight vector and K-1 biases, which restricts the head; CORN keeps K-1
independent outputs and still guarantees rank consistency through the chain of conditional
probabilities, and in the paper it is as good or better.

Why written here rather than taken from ``coral-pytorch``: that package (1.4.0, last released 2022)
installs cleanly but provides only the loss, as a Python loop with boolean indexing per task; the
probabilities, the part evaluation needs, would be written here anyway, and the masked form below
is a few lines, has no per-task loop and is shape-static. On random data its loss equals
``coral_pytorch.losses.corn_loss`` to float precision.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medxfer.errors import MedxferError


def _as_logits(logits, who: str) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        logits = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    z = logits
    if z.ndim != 2 or z.shape[1] < 1:
        raise MedxferError(f"The 'logits' parameter of {who} must be an (N, K-1) array with "
                           f"K >= 2 grades. Got shape {tuple(z.shape)} instead.")
    return z


def corn_loss(logits, y, num_classes: int) -> torch.Tensor:
    """The CORN loss of (N, K-1) logits for grades ``y`` in 0..K-1 (K = ``num_classes``).

    Mean binary cross-entropy over the (image, k) pairs with grade >= k, target grade > k.
    Differentiable in ``logits``; 0 for an empty batch.
    """
    z = _as_logits(logits, "corn_loss")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes != z.shape[1] + 1:
        raise MedxferError(f"The 'num_classes' parameter of corn_loss must be {z.shape[1] + 1} "
                           f"(one more than the {z.shape[1]} logits per image). Got {num_classes!r} "
                           "instead.")
    y = y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
    y = y.to(z.device).long()
    if y.shape != (z.shape[0],):
        raise MedxferError(f"The 'y' parameter of corn_loss must have shape ({z.shape[0]},) like the "
                           f"rows of logits. Got shape {tuple(y.shape)} instead.")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise MedxferError(f"The 'y' parameter of corn_loss must hold grades in "
                           f"0..{num_classes - 1}. Got {int(y.min())}..{int(y.max())} instead.")
    k = torch.arange(num_classes - 1, device=z.device)
    mask = (y[:, None] >= k).to(z.dtype)              # task k sees the images with grade >= k
    target = (y[:, None] > k).to(z.dtype)
    bce = F.binary_cross_entropy_with_logits(z, target, reduction="none")
    return (bce * mask).sum() / mask.sum().clamp_min(1)


def corn_probabilities(logits):
    """(N, K-1) CORN logits -> (N, K) grade probabilities; a tensor stays a tensor (and keeps its
    gradient), anything else comes back as a float64 numpy array."""
    is_tensor = isinstance(logits, torch.Tensor)
    z = _as_logits(logits, "corn_probabilities")
    above = torch.exp(torch.cumsum(F.logsigmoid(z), dim=1))  # P(grade > k), k = 0..K-2 (a product of sigmoids:
    # summed in log space, which ONNX can export (it has CumSum, no CumProd): an ensemble's graph holds this)
    ones = torch.ones_like(above[:, :1])
    zeros = torch.zeros_like(above[:, :1])
    probs = torch.cat([ones, above], dim=1) - torch.cat([above, zeros], dim=1)
    return probs if is_tensor else probs.numpy()


def corn_logits_from_probabilities(probs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The inverse of :func:`corn_probabilities`: (N, K) grade probabilities -> (N, K-1) CORN logits, so
    that an average of several models' grade probabilities is again the output of an ordinal head.
    P(grade > k) = 1 - P(grade <= k); the conditional P(grade > k | grade > k-1) is its ratio to the
    previous one (tensors in, tensors out; pure torch ops, so it exports to ONNX)."""
    above = (1 - torch.cumsum(probs, dim=1)[:, :-1]).clamp(eps, 1.0)      # P(grade > k), k = 0..K-2
    before = torch.cat([torch.ones_like(above[:, :1]), above[:, :-1]], dim=1)
    cond = (above / before).clamp(eps, 1 - eps)
    return torch.log(cond) - torch.log1p(-cond)


def corn_predict(logits):
    """The median grade from CORN logits: the number of k with P(grade > k) > 0.5, the same as
    :func:`medxfer.evaluation.ordinal.predict_grade` on :func:`corn_probabilities` (up to rounding
    at exactly 0.5)."""
    z = _as_logits(logits, "corn_predict")
    grades = (torch.cumprod(torch.sigmoid(z), dim=1) > 0.5).sum(1)
    return grades if isinstance(logits, torch.Tensor) else grades.numpy()
