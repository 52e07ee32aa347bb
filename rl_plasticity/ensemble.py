"""Layers of `num_members` independent networks evaluated as one batched op (critic ensembles,
seeds batched along a leading dimension), and `fresh_weight`, the initial distribution a layer's
weights are re-drawn from (continual backprop), and the CReLU activation.

The building blocks both the agents' networks and the plasticity code (which finds and re-draws
these layers) depend on; neither package imports the other for them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def fresh_weight(layer: nn.Module) -> torch.Tensor:
    """A new weight tensor for `layer` drawn from its initial distribution: orthogonal with the
    remembered gain (`orthogonal_init_`), otherwise PyTorch's default uniform(±1/sqrt(fan_in))."""
    weight = layer.weight
    if getattr(layer, "init_gain", None) is not None:
        return nn.init.orthogonal_(torch.empty_like(weight), layer.init_gain)
    fan_in = weight.shape[-2] if isinstance(layer, EnsembleLinear) else weight[0].numel()
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty_like(weight).uniform_(-bound, bound)


class EnsembleLinear(nn.Module):
    """`num_members` independent linear layers evaluated as one batched matmul.

    weight: (members, in, out), bias: (members, 1, out).  Input (B, in) is shared by all
    members; input (members, B, in) gives each member its own rows.  Initialised like
    `nn.Linear` (uniform in ±1/sqrt(in)) independently per member.
    """

    def __init__(self, num_members: int, in_features: int, out_features: int):
        super().__init__()
        self.num_members, self.in_features, self.out_features = num_members, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_members, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_members, 1, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, detached: bool = False) -> torch.Tensor:
        w, b = (self.weight.detach(), self.bias.detach()) if detached else (self.weight, self.bias)
        if self.num_members == 1:
            # One member: a plain fused addmm (cheaper than a batched matmul, and its backward
            # needs no transposed copies).
            return torch.addmm(b[0], x.reshape(-1, self.in_features), w[0]).unsqueeze(0)
        if x.dim() == 2:
            return torch.matmul(x, w) + b
        return torch.baddbmm(b, x, w)

    def extra_repr(self) -> str:
        return f"members={self.num_members}, in_features={self.in_features}, out_features={self.out_features}"


class EnsembleLayerNorm(nn.Module):
    """LayerNorm with separate gain and bias per ensemble member."""

    def __init__(self, num_members: int, width: int, eps: float = 1e-5):
        super().__init__()
        self.width, self.eps = width, eps
        self.weight = nn.Parameter(torch.ones(num_members, 1, width))
        self.bias = nn.Parameter(torch.zeros(num_members, 1, width))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, detached: bool = False) -> torch.Tensor:
        w, b = (self.weight.detach(), self.bias.detach()) if detached else (self.weight, self.bias)
        if w.shape[0] == 1:
            return F.layer_norm(x, (self.width,), w[0, 0], b[0, 0], self.eps)
        return torch.addcmul(b, F.layer_norm(x, (self.width,), eps=self.eps), w)


class CReLU(nn.Module):
    """CReLU(x) = [relu(x), relu(−x)] along the last dimension: n inputs give 2n features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.relu(x), torch.relu(-x)], dim=-1)
