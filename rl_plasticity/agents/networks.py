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

from typing import Any, Callable, Sequence

import torch
from torch import nn

from rl_plasticity.agents.formulas import squash_log_std, tanh_gaussian_sample
from rl_plasticity.config import ConfigError
from rl_plasticity.ensemble import (ACTIVATION_LAYERS, CReLU, EnsembleLayerNorm, EnsembleLinear,  # noqa: F401
                                    fresh_weight)  # (CReLU, fresh_weight re-exported)


ACTIVATIONS = ("relu", "crelu")


def activation_module(activation: str, inplace: bool = False) -> nn.Module:
    """The module of `activation` (one of ACTIVATIONS)."""
    if activation == "relu":
        return nn.ReLU(inplace=inplace)
    if activation == "crelu":
        return CReLU()
    raise ValueError(f"unknown activation '{activation}'. Valid choices: {', '.join(ACTIVATIONS)}")


def check_activation(activation: str, plasticity: Any) -> None:
    """One ConfigError for an unknown `agent.activation`, or for CReLU with the interventions that
    re-initialise ReLU units one by one (cbp, redo: a CReLU unit feeds two features)."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"agent.activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    unit_surgery = [n for n in ("cbp", "redo") if n in getattr(plasticity, "interventions", ())]
    if activation == "crelu" and (unit_surgery or getattr(plasticity, "cbp", False)):
        raise ConfigError(f"plasticity.interventions {unit_surgery or ['cbp']} re-initialise ReLU units; they do not "
                          f"support agent.activation=crelu. Valid choices with them: agent.activation=relu")


def features_out(width: int, activation: str) -> int:
    """Features a hidden layer of `width` linear units hands to the next layer."""
    return 2 * width if activation == "crelu" else width


def parameter_count(module: nn.Module) -> int:
    """Trainable parameters of `module` (what the run prints at its start)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def chain_layers(in_dim: int, hidden_sizes: Sequence[int], out_dim: int, layer_norm: bool, activation: str,
                 linear: Callable[[int, int, bool], nn.Module], norm: Callable[[int], nn.Module],
                 inplace: bool) -> list[nn.Module]:
    """Linear -> [LayerNorm] -> activation per hidden layer, then a linear head: the chain every
    network of the agents is (`ensemble.chain_blocks` walks it).  LayerNorm comes before the
    activation; with CReLU the next linear layer takes twice the width as inputs.
    `linear(in, out, is_head)` and `norm(width)` build the layers, in forward order (so initial
    draws happen layer by layer)."""
    layers: list[nn.Module] = []
    last = in_dim
    for width in hidden_sizes:
        layers.append(linear(last, width, False))
        if layer_norm:
            layers.append(norm(width))
        layers.append(activation_module(activation, inplace=inplace))
        last = features_out(width, activation)
    layers.append(linear(last, out_dim, True))
    return layers


def mlp(in_dim: int, hidden_sizes: Sequence[int], out_dim: int, layer_norm: bool,
        activation: str = "relu") -> nn.Sequential:
    """`chain_layers` of `nn.Linear` (PyTorch's default initialisation) and `nn.LayerNorm`."""
    return nn.Sequential(*chain_layers(in_dim, hidden_sizes, out_dim, layer_norm, activation,
                                       lambda i, o, head: nn.Linear(i, o), nn.LayerNorm, inplace=True))


def orthogonal_init_(layer: nn.Linear, gain: float) -> nn.Linear:
    """Orthogonal weights scaled by `gain`, zero bias (the usual PPO initialisation); the scheme
    is remembered on the layer so that `fresh_weight` can draw from it again (continual backprop)."""
    nn.init.orthogonal_(layer.weight, gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    layer.init_gain = float(gain)  # type: ignore[attr-defined]
    return layer


class EnsembleMLP(nn.Module):
    """`num_members` MLPs of identical shape as one module: every layer is one batched op.

    Output shape (members, B, out_dim).  `forward(x, detached=True)` uses the parameters without
    recording gradients for them (the actor's loss differentiates through the critic this way).
    """

    def __init__(self, num_members: int, in_dim: int, hidden_sizes: Sequence[int], out_dim: int, layer_norm: bool,
                 activation: str = "relu"):
        super().__init__()
        self.layers = nn.Sequential(*chain_layers(in_dim, hidden_sizes, out_dim, layer_norm, activation,
                                                  lambda i, o, head: EnsembleLinear(num_members, i, o),
                                                  lambda width: EnsembleLayerNorm(num_members, width), inplace=True))
        self.num_members = num_members

    def forward(self, x: torch.Tensor, detached: bool = False) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x) if isinstance(layer, ACTIVATION_LAYERS) else layer(x, detached)
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
        return mean, squash_log_std(raw, self.log_std_min, self.log_std_max)[0]

    def sample(self, obs: torch.Tensor, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised action and its log-probability under the squashed Gaussian.

        `noise` (standard normal, shape of the mean) is drawn from `generator` when not given."""
        mean, log_std = self.distribution_params(obs)
        if noise is None:
            noise = torch.randn(mean.shape, device=mean.device, generator=generator)
        action, log_prob, _ = tanh_gaussian_sample(mean, log_std, noise)
        return action, log_prob

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """The evaluation action tanh(mean)."""
        return torch.tanh(self.distribution_params(obs)[0])
