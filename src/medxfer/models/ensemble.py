"""An ensemble of trained runs as one network: the weighted average of the members' calibrated probabilities.

Usage::

    net = EnsembleNet(members, weights=[2, 1, 1], temperatures=[1.3, 0.9, 1.0], sizes=[64, 64, 96], size=96)
    log_p = net(x)        # x: float (N, C, 96, 96) in [0, 1]; each member sees x resized to its own size

The output is log(sum_i w_i softmax(z_i / T_i)): log-probabilities, so ``softmax(output / T)`` with the
ensemble's own temperature T (fitted on validation like a single run's) is a probability again, and
every caller that treats a run's output as logits (predict, the report, the ONNX export, serve)
treats an ensemble the same way. Pure torch ops: one ONNX graph holds every member.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EnsembleNet(nn.Module):
    """Members (each a run's network, with its test-time augmentation) combined into one module."""

    def __init__(self, members: list[nn.Module], weights, temperatures, sizes, size: int, data_chans: int):
        super().__init__()
        self.members = nn.ModuleList(members)
        w = torch.tensor([float(v) for v in weights])
        self.register_buffer("weights", w / w.sum())
        self.register_buffer("temperatures", torch.tensor([float(t) for t in temperatures]))
        self.sizes, self.size, self.data_chans = [int(s) for s in sizes], int(size), int(data_chans)

    @property
    def net(self) -> nn.Module:
        """The first member's timm network: Grad-CAM of an ensemble takes its layers from it."""
        first = self.members[0]
        return first.net if hasattr(first, "net") else first.model.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = 0
        for i, member in enumerate(self.members):
            xi = x if self.sizes[i] == x.shape[-1] else F.interpolate(
                x, size=(self.sizes[i], self.sizes[i]), mode="bilinear", align_corners=False)
            probs = probs + self.weights[i] * torch.softmax(member(xi).float() / self.temperatures[i], dim=1)
        return torch.log(probs.clamp_min(1e-12))
