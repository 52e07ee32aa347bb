"""Network building blocks shared by the agents.

Layers are kept as plain modules in order (linear, optional LayerNorm, ReLU or CReLU, ...) so
that the plasticity code can find weight matrices, LayerNorm gains and post-activation features
by walking the modules, whatever agent owns them.

Activations (`agent.activation`): `relu`, or `crelu`, the concatenated ReLU [relu(x), relu(−x)]
(Shang et al. 2016), which Abbas et al. 2023 ("Loss of plasticity in continual deep RL", CoLLAs)
use against loss of plasticity: half of its outputs are active for any pre-activation, so no unit
goes silent.  A hidden width n counts linear units (LayerNorm works on those n); with CReLU the
layer hands 2n features to the next, whose weight takes 2n inputs, so the network has more
parameters than its ReLU twin (`parameter_count` tells how many).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


ACTIVATIONS = ("relu", "crelu")


class CReLU(nn.Module):
    """CReLU(x) = [relu(x), relu(−x)] along the last dimension: n inputs give 2n features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.relu(x), torch.relu(-x)], dim=-1)


def activation_module(activation: str, inplace: bool = False) -> nn.Module:
    """The module of `activation` (one of ACTIVATIONS)."""
    if activation == "relu":
        return nn.ReLU(inplace=inplace)
    if activation == "crelu":
        return CReLU()
    raise ValueError(f"unknown activation '{activation}'. Valid choices: {', '.join(ACTIVATIONS)}")


def features_out(width: int, activation: str) -> int:
    """Features a hidden layer of `width` linear units hands to the next layer."""
    return 2 * width if activation == "crelu" else width


def parameter_count(module: nn.Module) -> int:
    """Trainable parameters of `module` (what the run prints at its start)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def mlp(in_dim: int, hidden_sizes: Sequence[int], out_dim: int, layer_norm: bool,
        activation: str = "relu") -> nn.Sequential:
    """Linear -> [LayerNorm] -> activation per hidden layer, then a linear head (LayerNorm before
    the activation; with CReLU the next linear layer takes twice the width as inputs)."""
    layers: list[nn.Module] = []
    last = in_dim
    for width in hidden_sizes:
        layers.append(nn.Linear(last, width))
        if layer_norm:
            layers.append(nn.LayerNorm(width))
        layers.append(activation_module(activation, inplace=True))
        last = features_out(width, activation)
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


def orthogonal_init_(layer: nn.Linear, gain: float) -> nn.Linear:
    """Orthogonal weights scaled by `gain`, zero bias (the usual PPO initialisation); the scheme
    is remembered on the layer so that `fresh_weight` can draw from it again (continual backprop)."""
    nn.init.orthogonal_(layer.weight, gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    layer.init_gain = float(gain)  # type: ignore[attr-defined]
    return layer


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


class EnsembleMLP(nn.Module):
    """`num_members` MLPs of identical shape as one module: every layer is one batched op.

    Output shape (members, B, out_dim).  `forward(x, detached=True)` uses the parameters without
    recording gradients for them (the actor's loss differentiates through the critic this way).
    """

    def __init__(self, num_members: int, in_dim: int, hidden_sizes: Sequence[int], out_dim: int, layer_norm: bool,
                 activation: str = "relu"):
        super().__init__()
        layers: list[nn.Module] = []
        last = in_dim
        for width in hidden_sizes:
            layers.append(EnsembleLinear(num_members, last, width))
            if layer_norm:
                layers.append(EnsembleLayerNorm(num_members, width))
            layers.append(activation_module(activation, inplace=True))
            last = features_out(width, activation)
        layers.append(EnsembleLinear(num_members, last, out_dim))
        self.layers = nn.Sequential(*layers)
        self.num_members = num_members

    def forward(self, x: torch.Tensor, detached: bool = False) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x) if isinstance(layer, (nn.ReLU, CReLU)) else layer(x, detached)
        return x


class Critic(nn.Module):
    """Q(s, a) for `num_critics` members at once: returns (num_critics, B)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes: Sequence[int], num_critics: int, layer_norm: bool,
                 activation: str = "relu"):
        super().__init__()
        self.net = EnsembleMLP(num_critics, obs_dim + action_dim, hidden_sizes, 1, layer_norm, activation)

    def forward(self, obs: torch.Tensor, action: torch.Tensor, detached: bool = False) -> torch.Tensor:
        return self.net(torch.cat([obs, action], dim=-1), detached).squeeze(-1)


class TanhGaussianActor(nn.Module):
    """π(a|s) = tanh(N(μ(s), σ(s))), log σ squashed smoothly into [log_std_min, log_std_max]."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes: Sequence[int], layer_norm: bool,
                 log_std_min: float = -5.0, log_std_max: float = 2.0, activation: str = "relu"):
        super().__init__()
        self.net = mlp(obs_dim, hidden_sizes, 2 * action_dim, layer_norm, activation)
        self.log_std_min, self.log_std_max = float(log_std_min), float(log_std_max)

    def distribution_params(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw = self.net(obs).chunk(2, dim=-1)
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (torch.tanh(raw) + 1.0)
        return mean, log_std

    def sample(self, obs: torch.Tensor, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised action and its log-probability under the squashed Gaussian.

        `noise` (standard normal, shape of the mean) is drawn from `generator` when not given."""
        mean, log_std = self.distribution_params(obs)
        if noise is None:
            noise = torch.randn(mean.shape, device=mean.device, generator=generator)
        u = torch.addcmul(mean, log_std.exp(), noise)
        # log N(u; mean, std) - log|d tanh(u)/du|, with log(1 - tanh(u)^2) = 2(log 2 - u - softplus(-2u)).
        log_prob = (-0.5 * noise.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)
        return torch.tanh(u), log_prob

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """The evaluation action tanh(mean)."""
        return torch.tanh(self.distribution_params(obs)[0])
