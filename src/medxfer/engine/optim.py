"""Which parameters train, at which learning rate, and the optimiser that trains them.

Usage::

    groups = param_groups(model, get_strategy("partial"), lr=1e-3, unfreeze=2)  # freezes what it keeps
    optimizer = build_optimizer(model, groups, weight_decay=0.05)       # timm's AdamW, no decay on 1-D params
    scheduler = warmup_cosine(optimizer, total_steps, warmup_steps)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medxfer.errors import MedxferError
from medxfer.strategies import get_strategy


def layer_groups(model) -> list[list[nn.Parameter]]:
    """Parameters by depth, stem first, head last (timm ``group_matcher`` with coarse groups)."""
    from timm.models import group_parameters

    net = model.net
    mapping = group_parameters(net, net.group_matcher(coarse=True), reverse=False)
    named = dict(net.named_parameters())
    groups = [[named[n] for n in names] for _, names in sorted(mapping.items())]
    head = {id(p) for p in model.head().parameters()}
    body = [[p for p in g if id(p) not in head] for g in groups]
    return [g for g in body if g] + [list(model.head().parameters())]


def param_groups(model, strategy, lr: float, *, unfreeze: int = 1, backbone_lr_mult: float = 0.1,
                 layer_decay: float | None = None) -> list[dict]:
    """Freeze what the strategy keeps fixed and return parameter groups (``params``, ``lr``, ``name``).

    ``strategy``: a :class:`~medxfer.strategies.Strategy` or its registered name. What trains is its
    ``trains`` (the head; the head and the last ``unfreeze`` stages; all), and at which rates its
    ``scaled_backbone`` (the backbone at ``lr * backbone_lr_mult``, or by layer-wise decay; else all at ``lr``)."""
    s = get_strategy(strategy) if isinstance(strategy, str) else strategy
    groups = layer_groups(model)
    head, body = groups[-1], groups[:-1]
    if s.trains == "last stages" and unfreeze > len(body):
        raise MedxferError(f"The 'unfreeze' parameter must be at most {len(body)} for this architecture "
                           f"(its stages). Got {unfreeze} instead.")
    train = {"head": [], "last stages": body[-unfreeze:], "all": body}[s.trains]
    for p in model.parameters():
        p.requires_grad_(s.trains == "all")
    for p in [*head, *(p for g in train for p in g)]:
        p.requires_grad_(True)
    head_group = {"params": head, "lr": lr, "name": "head"}
    if not train:
        return [head_group]
    name = {"last stages": "unfrozen", "all": "backbone" if s.scaled_backbone else "body"}[s.trains]
    if not s.scaled_backbone:
        return [{"params": [p for g in train for p in g], "lr": lr, "name": name}, head_group]
    if layer_decay is not None and s.trains == "all":
        n = len(body)
        return [{"params": g, "lr": lr * layer_decay ** (n - i), "name": f"layer{i}"} for i, g in enumerate(body)] + \
               [head_group]
    return [{"params": [p for g in train for p in g], "lr": lr * backbone_lr_mult, "name": name}, head_group]


def head_groups(model, lr: float) -> list[dict]:
    """Everything frozen but the head (BatchNorm of the frozen backbone then stays in eval mode): the one group
    that trains a head on the frozen source's features."""
    for p in model.parameters():
        p.requires_grad_(False)
    head = list(model.head().parameters())
    for p in head:
        p.requires_grad_(True)
    return [{"params": head, "lr": lr, "name": "head"}]


def build_optimizer(module: nn.Module, groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    """AdamW through timm's optimiser factory, with no weight decay on biases and norm weights (1-D
    parameters, timm's rule), each of ``groups`` split into a decayed and an undecayed part."""
    from timm.optim import create_optimizer_v2

    names = {id(p): n for n, p in module.named_parameters()}
    skip = set(getattr(module, "no_weight_decay", lambda: set())())
    split = []
    for g in groups:
        params = [p for p in g["params"] if p.requires_grad]
        decay = [p for p in params if p.ndim > 1 and names.get(id(p), "") not in skip]
        no_decay = [p for p in params if p.ndim <= 1 or names.get(id(p), "") in skip]
        for part, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if part:
                split.append({"params": part, "lr": g["lr"], "weight_decay": wd, "name": g.get("name", "")})
    return create_optimizer_v2(split, opt="adamw", lr=groups[-1]["lr"], weight_decay=weight_decay)


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int):
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
