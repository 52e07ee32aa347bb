"""Layers of `num_members` independent networks evaluated as one batched op (critic ensembles,
seeds batched along a leading dimension), and `fresh_weight`, the initial distribution a layer's
weights are re-drawn from (continual backprop), the CReLU activation, and `chain_blocks`, the one
walker of the Linear → [LayerNorm] → [ReLU | CReLU] chain the networks are made of.

The building blocks both the agents' networks and the plasticity code (which finds and re-draws
these layers) depend on; neither package imports the other for them.
"""
from __future__ import annotations

import math
from typing import Optional

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


def crelu(z: torch.Tensor) -> torch.Tensor:
    """The concatenated ReLU [relu(z), relu(−z)] along the last dimension (Shang et al. 2016; against
    loss of plasticity: Abbas et al. 2023): n inputs give 2n features."""
    return torch.cat([torch.relu(z), torch.relu(-z)], dim=-1)


class CReLU(nn.Module):
    """`crelu` as a module: n inputs give 2n features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return crelu(x)


LINEAR_LAYERS = (nn.Linear, EnsembleLinear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_LAYERS = (nn.LayerNorm, EnsembleLayerNorm)
ACTIVATION_LAYERS = (nn.ReLU, CReLU)


class Block:
    """One layer of the chain: `linear` (plain, ensemble or convolutional), its optional
    LayerNorm `norm` and its optional `activation` (ReLU or CReLU); a network's head has neither.
    `relu` says there is an activation, `crelu` that it is CReLU [relu(z), relu(−z)]."""

    __slots__ = ("linear", "norm", "activation", "relu", "crelu")

    def __init__(self, linear: nn.Module, norm: Optional[nn.Module] = None, activation: Optional[nn.Module] = None):
        self.linear, self.norm, self.activation = linear, norm, activation
        self.relu = activation is not None
        self.crelu = isinstance(activation, CReLU)


def chain_blocks(network: nn.Module, strict: Optional[str] = None) -> list[Block]:
    """The Linear → [LayerNorm] → [ReLU | CReLU] blocks of `network`, in forward order.

    Walks `network.modules()` (registration order, which is the forward order of an
    nn.Sequential, an EnsembleMLP, and the heads plasticity injection builds): each linear layer
    opens a block, a LayerNorm right after it and then an activation join it.  A LayerNorm or an
    activation with no linear layer before it in its block is a TypeError.  Modules without
    submodules of any other kind (Flatten, Tanh, ...) are passed over, unless `strict` names the
    caller (the fused update, which knows only these layers): then they are a TypeError too.
    """
    blocks: list[Block] = []
    linear: Optional[nn.Module] = None
    norm: Optional[nn.Module] = None
    for module in network.modules():
        if isinstance(module, LINEAR_LAYERS):
            if linear is not None:
                blocks.append(Block(linear, norm))
            linear, norm = module, None
        elif isinstance(module, NORM_LAYERS):
            if linear is None or norm is not None:
                raise TypeError(f"{type(network).__name__}: a {type(module).__name__} without a linear layer "
                                f"right before it")
            norm = module
        elif isinstance(module, ACTIVATION_LAYERS):
            if linear is None:
                raise TypeError(f"{type(network).__name__}: an activation without a linear layer before it")
            blocks.append(Block(linear, norm, module))
            linear, norm = None, None
        elif strict is not None and next(module.children(), None) is None:
            raise TypeError(f"{strict}: unexpected layer {type(module).__name__}")
    if linear is not None:
        blocks.append(Block(linear, norm))
    return blocks
