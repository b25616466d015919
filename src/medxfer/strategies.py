"""Transfer strategies: which parameters train, and at which learning rate.

- ``linear-probe``: every source weight frozen (BatchNorm in eval mode); only the new head trains.
- ``partial``: the head and the last ``unfreeze`` stages train (timm ``group_matcher``).
- ``full``: everything trains; the backbone at ``lr * backbone_lr_mult``, or with layer-wise decay.
- ``scratch``: same architecture from random initialisation; everything trains at ``lr``.

Usage::

    groups = param_groups(model, "partial", lr=1e-3, unfreeze=2)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.05)
"""

from __future__ import annotations

from torch import nn

from medxfer.errors import MedxferError
from medxfer.models.adapt import MedxferNet


def layer_groups(model: MedxferNet) -> list[list[nn.Parameter]]:
    """Parameters by depth, stem first, head last (timm ``group_matcher`` with coarse groups)."""
    from timm.models import group_parameters

    net = model.net
    mapping = group_parameters(net, net.group_matcher(coarse=True), reverse=False)
    named = dict(net.named_parameters())
    groups = [[named[n] for n in names] for _, names in sorted(mapping.items())]
    head = {id(p) for p in model.head().parameters()}
    body = [[p for p in g if id(p) not in head] for g in groups]
    return [g for g in body if g] + [list(model.head().parameters())]


def param_groups(model: MedxferNet, strategy: str, lr: float, *, unfreeze: int = 1, backbone_lr_mult: float = 0.1,
                 layer_decay: float | None = None) -> list[dict]:
    """Freeze what the strategy keeps fixed and return AdamW parameter groups for the rest."""
    groups = layer_groups(model)
    head, body = groups[-1], groups[:-1]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head:
        p.requires_grad_(True)
    if strategy == "linear-probe":
        return [{"params": head, "lr": lr, "name": "head"}]
    if strategy == "partial":
        if unfreeze > len(body):
            raise MedxferError(f"The 'unfreeze' parameter must be at most {len(body)} for this architecture "
                               f"(its stages). Got {unfreeze} instead.")
        train = body[-unfreeze:]
        for g in train:
            for p in g:
                p.requires_grad_(True)
        return [{"params": [p for g in train for p in g], "lr": lr * backbone_lr_mult, "name": "unfrozen"},
                {"params": head, "lr": lr, "name": "head"}]
    for p in model.parameters():
        p.requires_grad_(True)
    if strategy == "scratch":
        return [{"params": [p for g in body for p in g], "lr": lr, "name": "body"},
                {"params": head, "lr": lr, "name": "head"}]
    if layer_decay is not None:
        if not 0 < layer_decay <= 1:
            raise MedxferError(f"The 'layer-decay' parameter must be in (0, 1]. Got {layer_decay} instead.")
        n = len(body)
        return [{"params": g, "lr": lr * layer_decay ** (n - i), "name": f"layer{i}"} for i, g in enumerate(body)] + \
               [{"params": head, "lr": lr, "name": "head"}]
    return [{"params": [p for g in body for p in g], "lr": lr * backbone_lr_mult, "name": "backbone"},
            {"params": head, "lr": lr, "name": "head"}]
