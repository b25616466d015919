"""Transfer strategies: what trains, from which weights, with which defaults. One registry, read by the
options (choices and help), the training job, ``compare`` and the optimiser's parameter groups.

Usage::

    from medxfer.strategies import STRATEGIES, get_strategy

    s = get_strategy("full")
    s.pretrained, s.trains, s.default_lr, s.epochs_for(n_train=546, batch_size=64)
    register(Strategy("my-strategy", ...))   # a new strategy is this one entry: options, training, compare

What a strategy does is on it, read by the optimiser's parameter groups (:mod:`medxfer.engine.optim`), the
training job, ``compare`` and ``pretrain``: which parameters train (``trains``), at which learning rates
(``scaled_backbone``), whether the head is fitted on frozen features first (``head_first``) and whether it
starts from the source's weights (``pretrained``; a strategy that does not is a baseline for ``compare``).

- ``linear-probe``: every source weight frozen (BatchNorm in eval mode); features are extracted once
  and cached; only the new head trains.
- ``partial``: the head and the last ``--unfreeze`` stages train (timm ``group_matcher``).
- ``full``: everything trains; the backbone at ``lr * backbone_lr_mult``, or with layer-wise decay.
- ``lp-ft``: the head fitted on the frozen features first, then everything as ``full``.
- ``scratch``: the same architecture from random initialisation: the baseline that shows what
  transfer buys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from medxfer.errors import MedxferError, did_you_mean

#: a run gets at most this many epochs from the data-aware default (early stopping ends it sooner)
MAX_AUTO_EPOCHS = 60
#: early stopping waits at least this many optimiser steps: on a tiny train set (one step per epoch)
#: 10 epochs of patience would stop a run before it has learned anything
MIN_PATIENCE_STEPS = 60
#: what --select ranks epochs by (early stopping in medxfer.engine.handlers, the option in medxfer.config)
SELECT = ("auc", "loss", "calibrated-loss")
#: what trains: the head only, the head and the last --unfreeze stages, or everything
TRAINS = ("head", "last stages", "all")
#: the transfer strategy a source is trained with when the strategy asked for starts from random weights
#: (``pretrain``); the options' default
DEFAULT = "full"


@dataclass(frozen=True)
class Strategy:
    """One way to adapt a source model to the target task."""

    name: str
    pretrained: bool          # starts from the source's weights (False: random init)
    trains: str               # "head" | "last stages" | "all"
    feature_cache: bool       # the frozen backbone runs once per image; the head trains on cached features
    default_lr: float         # head learning rate when --lr is not given
    default_epochs: int       # epochs when --epochs is not given, before the data-aware raise
    min_steps: int            # the data-aware default gives at least this many optimiser steps
    description: str
    head_first: bool = False  # the head is fitted on the frozen source's cached features before the epoch loop
    scaled_backbone: bool = True  # the backbone at lr x --backbone-lr-mult (or --layer-decay); False: all at lr

    def __post_init__(self) -> None:
        if self.trains not in TRAINS:
            raise ValueError(f"Strategy '{self.name}': trains must be one of {TRAINS}, not {self.trains!r}")
        if self.feature_cache and self.trains != "head":
            raise ValueError(f"Strategy '{self.name}': only a strategy that trains the head alone can train it on "
                             "cached features")

    def epochs_for(self, n_train: int, batch_size: int, world: int = 1) -> int:
        """``default_epochs``, raised so that small data sets still get ``min_steps`` optimiser steps
        (at most :data:`MAX_AUTO_EPOCHS`; early stopping on validation ends runs that stop improving)."""
        steps = max(1, -(-n_train // (batch_size * world)))
        wanted = -(-self.min_steps // steps)
        return max(self.default_epochs, min(MAX_AUTO_EPOCHS, wanted))


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("linear-probe", True, "head", True, 1e-3, 100, 0,
             "the new head only, on features of the frozen source cached once (logistic regression, C chosen on "
             "validation; --head linear for an AdamW head)"),
    Strategy("partial", True, "last stages", False, 1e-3, 10, 600,
             "the head and the last --unfreeze stages (at lr x --backbone-lr-mult)"),
    # full: head 1e-2, backbone 1e-3 (x backbone_lr_mult 0.1), chosen on validation AUC over head 1e-3
    # (backbone 1e-4): BreastMNIST 3 seeds 0.917 vs 0.895, PneumoniaMNIST 0.996 vs 0.988 (64 px)
    Strategy("full", True, "all", False, 1e-2, 10, 600,
             "everything: the head at --lr, the backbone at lr x --backbone-lr-mult or with --layer-decay"),
    # LP-FT (Kumar et al., ICLR 2022): the head is fitted on the frozen features first, then everything is
    # fine-tuned from it, so the pretrained features are not distorted by a random head's first gradients
    Strategy("lp-ft", True, "all", False, 1e-2, 10, 600,
             "linear probe first (logistic head on cached features), then everything fine-tuned from that head",
             head_first=True),
    Strategy("scratch", False, "all", False, 2e-3, 20, 1200,
             "everything from random initialisation: the baseline that shows what transfer buys",
             scaled_backbone=False),
)}


class _Names(Sequence):
    """The registered names, read live: a strategy registered later is a valid choice of the options."""

    def __getitem__(self, i):
        return tuple(STRATEGIES)[i]

    def __len__(self) -> int:
        return len(STRATEGIES)

    def __contains__(self, name) -> bool:
        return name in STRATEGIES

    def __repr__(self) -> str:
        return repr(tuple(STRATEGIES))


NAMES: Sequence[str] = _Names()


def register(strategy: Strategy) -> Strategy:
    """Add ``strategy`` to the registry (the options, the training job, ``compare`` and ``auto`` read it from
    there); a name that is taken is refused."""
    if strategy.name in STRATEGIES:
        raise MedxferError(f"a strategy named '{strategy.name}' is already registered; choose another name.")
    STRATEGIES[strategy.name] = strategy
    return strategy


def unregister(name: str) -> None:
    """Remove a strategy added by :func:`register` (tests, plug-ins)."""
    STRATEGIES.pop(name, None)


def get_strategy(name: str) -> Strategy:
    """The registered strategy ``name``, or a MedxferError with what is allowed."""
    if name not in STRATEGIES:
        raise MedxferError(f"unknown strategy '{name}'.{did_you_mean(str(name), NAMES)} Choose one of: "
                           f"{', '.join(NAMES)}.")
    return STRATEGIES[name]


def baseline() -> Strategy:
    """The registered strategy that trains everything from random weights (``scratch``): what a transfer
    strategy is compared with, and what trains a source from random weights."""
    return next(s for s in STRATEGIES.values() if not s.pretrained and s.trains == "all")


def help_text() -> str:
    """One line per strategy, for ``--help`` and the README."""
    return "; ".join(f"{s.name}: {s.description}" for s in STRATEGIES.values())
