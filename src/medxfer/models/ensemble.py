"""An ensemble of trained runs as one network: the weighted average of the members' calibrated probabilities.

Usage::

    net = EnsembleNet(members, weights=[2, 1, 1], temperatures=[1.3, 0.9, 1.0], sizes=[64, 64, 96], size=96)
    z = net(x)            # x: float (N, C, 96, 96) in [0, 1]; each member sees x resized to its own size

Each member's output becomes probabilities the way its task's head defines them (softmax for binary and
multi-class, a sigmoid per finding for multi-label, CORN grade probabilities for ordinal), with the
member's own temperature(s). The weighted average p is returned in the same form as one run's logits,
so that the task's probability rule gives p back and the ensemble's own temperature (fitted on
validation like a single run's) applies on top:

- binary / multi-class: log p (softmax(log p) = p);
- multi-label: log p - log(1 - p), per finding (sigmoid of it = p);
- ordinal: the CORN logits whose grade probabilities are p.

So predict, the report, the ONNX export and serve treat an ensemble's output as any run's. Volumes
(``spatial_dims=3``) are resized trilinearly for members trained at another size. Pure torch ops: one
ONNX graph holds every member.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medxfer.errors import MedxferError
from medxfer.models.ordinal import corn_logits_from_probabilities, corn_probabilities

TASKS = ("binary", "multiclass", "multilabel", "ordinal")


class EnsembleNet(nn.Module):
    """Members (each a run's network, with its test-time augmentation) combined into one module.

    ``temperatures``: one per member, a number or (multi-label) one per finding.
    """

    def __init__(self, members: list[nn.Module], weights, temperatures, sizes, size: int, data_chans: int,
                 task: str = "multiclass", spatial_dims: int = 2):
        super().__init__()
        if task not in TASKS:
            raise MedxferError(f"The 'task' parameter must be one of {list(TASKS)}. Got '{task}' instead.")
        self.members = nn.ModuleList(members)
        w = torch.tensor([float(v) for v in weights])
        self.register_buffer("weights", w / w.sum())
        rows = [[float(v) for v in t] if isinstance(t, (list, tuple)) else [float(t)] for t in temperatures]
        width = max(len(r) for r in rows)  # (M,) as before for one temperature per member; (M, K) per finding
        t = torch.tensor([r[0] for r in rows]) if width == 1 else torch.tensor([r * width if len(r) == 1 else r
                                                                                for r in rows])
        self.register_buffer("temperatures", t)
        self.sizes, self.size, self.data_chans = [int(s) for s in sizes], int(size), int(data_chans)
        self.task, self.spatial_dims = task, int(spatial_dims)

    @property
    def net(self) -> nn.Module:
        """The first member's timm network: Grad-CAM of an ensemble takes its layers from it."""
        first = self.members[0]
        return first.net if hasattr(first, "net") else first.model.net

    def _resize(self, x: torch.Tensor, size: int) -> torch.Tensor:
        if size == x.shape[-1]:
            return x
        mode = "trilinear" if self.spatial_dims == 3 else "bilinear"
        return F.interpolate(x, size=(size,) * self.spatial_dims, mode=mode, align_corners=False)

    def _probabilities(self, z: torch.Tensor, i: int) -> torch.Tensor:
        z = z.float() / self.temperatures[i]
        if self.task == "multilabel":
            return torch.sigmoid(z)
        if self.task == "ordinal":
            return corn_probabilities(z)
        return torch.softmax(z, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = 0
        for i, member in enumerate(self.members):
            probs = probs + self.weights[i] * self._probabilities(member(self._resize(x, self.sizes[i])), i)
        if self.task == "multilabel":
            p = probs.clamp(1e-12, 1 - 1e-12)
            return torch.log(p) - torch.log1p(-p)
        if self.task == "ordinal":
            return corn_logits_from_probabilities(probs)
        return torch.log(probs.clamp_min(1e-12))
