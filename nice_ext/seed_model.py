"""The seed-style NICE that many implementations copy, kept as a baseline for the benchmarks.

Every coupling network takes the full-width masked vector (D inputs, D outputs) and the update is a
chain of elementwise multiplies by the mask: y = x + (1 - mask) * m(mask * x). It computes the same
function family as ``nice_ext.NICE`` but its first and last GEMMs are twice as wide, half of them on
zeros. ReLU hidden units, as in the paper (the seed notes used LeakyReLU; the cost is the same).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .masks import odd_even_mask


class SeedMaskedCoupling(nn.Module):
    def __init__(self, mask: Tensor, hidden_dim: int, num_hidden_layers: int):
        super().__init__()
        data_dim = mask.numel()
        self.register_buffer("mask", mask.float())
        layers, width = [], data_dim
        for _ in range(num_hidden_layers):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
            width = hidden_dim
        layers.append(nn.Linear(width, data_dim))
        self.m = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.mask * x, (1.0 - self.mask) * x
        return x1 + x2 + self.m(x1) * (1.0 - self.mask)


class SeedMaskedNICE(nn.Module):
    def __init__(self, data_dim: int = 784, num_coupling_layers: int = 4, num_hidden_layers: int = 5,
                 hidden_dim: int = 1000):
        super().__init__()
        self.layers = nn.ModuleList(
            SeedMaskedCoupling(odd_even_mask(data_dim, keep_odd=(i % 2 == 0)), hidden_dim, num_hidden_layers)
            for i in range(num_coupling_layers))
        self.log_scale = nn.Parameter(torch.zeros(1, data_dim))

    def log_prob(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        z = torch.exp(self.log_scale) * x
        return -(F.softplus(z) + F.softplus(-z)).sum(dim=1) + self.log_scale.sum()
