"""Continual backprop (Dohare et al. 2024, "Loss of plasticity in deep continual learning").

Generate-and-test on the hidden units of one network: after every gradient update each hidden
unit's *contribution utility* is tracked as a running average (decay η) of

    mean over the batch of |h_j|  ×  mean over outgoing weights of |w_jk|

and bias-corrected by 1 − η^age.  Among the *mature* units (age > maturity threshold) a fraction
`replacement_rate` per update (accumulated, so fractional rates work) with the lowest utility is
replaced: input weights re-drawn from the layer's initial distribution, input bias zeroed,
outgoing weights zeroed (so the network's output does not change), utility and age reset, and
the optimizer's moment estimates of those weights cleared.  A LayerNorm between the unit's
linear layer and its activation gets its gain and bias for that unit reset to 1 and 0.

Works on any network whose hidden layers are Linear (or ensemble linear) → [LayerNorm] → ReLU →
Linear; ensemble members are separate layers with their own utilities.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional

import torch
from torch import nn

from rl_plasticity.ensemble import EnsembleLayerNorm, EnsembleLinear, fresh_weight

_LINEAR = (nn.Linear, EnsembleLinear)
_NORM = (nn.LayerNorm, EnsembleLayerNorm)


def _unit_rows(weight: torch.Tensor, ensemble: bool) -> torch.Tensor:
    """A view (members, out, in) of a linear weight: row j holds unit j's input weights."""
    return weight.transpose(1, 2) if ensemble else weight.unsqueeze(0)


def _vector_rows(vec: torch.Tensor, ensemble: bool) -> torch.Tensor:
    """A view (members, width) of a bias or LayerNorm parameter."""
    return vec.reshape(vec.shape[0], -1) if ensemble else vec.unsqueeze(0)


@dataclasses.dataclass
class HiddenLayer:
    """One layer of hidden units: the linear layer feeding them, its optional LayerNorm, and the
    linear layer reading them."""

    linear_in: nn.Module
    norm: Optional[nn.Module]
    linear_out: nn.Module

    @property
    def ensemble(self) -> bool:
        return isinstance(self.linear_in, EnsembleLinear)

    def input_weights(self) -> torch.Tensor:
        return _unit_rows(self.linear_in.weight, self.ensemble)

    def outgoing_weights(self) -> torch.Tensor:
        """(members, width, next): row j holds unit j's outgoing weights."""
        w = self.linear_out.weight
        return w if isinstance(self.linear_out, EnsembleLinear) else w.t().unsqueeze(0)


def hidden_layers(network: nn.Module) -> list[HiddenLayer]:
    """Linear → [LayerNorm] → ReLU → Linear chains of `network`, in forward order."""
    layers: list[HiddenLayer] = []
    linear: Optional[nn.Module] = None
    norm: Optional[nn.Module] = None
    pending: Optional[tuple[nn.Module, Optional[nn.Module]]] = None
    for module in network.modules():
        if isinstance(module, _LINEAR):
            if pending is not None:
                layers.append(HiddenLayer(pending[0], pending[1], module))
                pending = None
            linear, norm = module, None
        elif isinstance(module, _NORM):
            norm = module
        elif isinstance(module, nn.ReLU):
            if linear is None:
                raise TypeError(f"{type(network).__name__}: an activation without a linear layer before it")
            pending, linear = (linear, norm), None
    return layers


class ContinualBackprop:
    """Utilities, ages and the replacement counter of every hidden layer of one network."""

    def __init__(self, network: nn.Module, replacement_rate: float, maturity: int, decay: float):
        self.layers = hidden_layers(network)
        self.replacement_rate = float(replacement_rate)
        self.maturity = int(maturity)
        self.decay = float(decay)
        self.utility: list[torch.Tensor] = []
        # Ages live on the host: they change only by +1 per step and by resets the host decides,
        # so counting the mature units never waits for the device.
        self.age: list[torch.Tensor] = []
        self.to_replace: list[torch.Tensor] = []  # accumulated fractional replacements, per member
        for layer in self.layers:
            rows = layer.input_weights()
            members, width = rows.shape[0], rows.shape[1]
            self.utility.append(torch.zeros(members, width, device=rows.device))
            self.age.append(torch.zeros(members, width, dtype=torch.long))
            self.to_replace.append(torch.zeros(members, dtype=torch.float64))
        self.replaced_total = 0

    @torch.no_grad()
    def step(self, features: list[torch.Tensor], optimizers: Iterable[torch.optim.Optimizer] = ()) -> int:
        """Update utilities from this update's hidden `features` (members, batch, width) per layer,
        age every unit, replace the due ones; returns how many units were replaced."""
        if len(features) != len(self.layers):
            raise ValueError(f"continual backprop: {len(features)} feature tensors for {len(self.layers)} hidden layers")
        optimizers = list(optimizers)
        replaced = 0
        for i, (layer, h) in enumerate(zip(self.layers, features)):
            out_w = layer.outgoing_weights()
            contribution = h.abs().mean(1) * out_w.abs().mean(-1)
            self.utility[i].mul_(self.decay).add_(contribution, alpha=1.0 - self.decay)
            self.age[i] += 1
            mature = self.age[i] > self.maturity
            eligible = mature.sum(-1)
            self.to_replace[i] += self.replacement_rate * eligible.double()
            counts = self.to_replace[i].floor().long()
            if int(counts.sum()) == 0:
                continue
            self.to_replace[i] -= counts.double()
            device = self.utility[i].device
            bias = (1.0 - self.decay ** self.age[i].double()).float().clamp_min(1e-12).to(device)
            corrected = (self.utility[i] / bias).masked_fill(~mature.to(device), float("inf"))
            for member, n in enumerate(counts.tolist()):
                n = min(n, int(eligible[member]))
                if n == 0:
                    continue
                units = torch.topk(corrected[member], n, largest=False).indices
                self._replace(layer, i, member, units, optimizers)
                replaced += n
        self.replaced_total += replaced
        return replaced

    def _replace(self, layer: HiddenLayer, i: int, member: int, units: torch.Tensor,
                 optimizers: list[torch.optim.Optimizer]) -> None:
        fresh = _unit_rows(fresh_weight(layer.linear_in), layer.ensemble)[member, units]
        layer.input_weights()[member, units] = fresh.to(layer.input_weights().dtype)
        if layer.linear_in.bias is not None:
            _vector_rows(layer.linear_in.bias, layer.ensemble)[member, units] = 0.0
        if layer.norm is not None:
            ens = isinstance(layer.norm, EnsembleLayerNorm)
            if layer.norm.weight is not None:
                _vector_rows(layer.norm.weight, ens)[member, units] = 1.0
            if layer.norm.bias is not None:
                _vector_rows(layer.norm.bias, ens)[member, units] = 0.0
        layer.outgoing_weights()[member, units] = 0.0
        self.utility[i][member, units] = 0.0
        self.age[i][member, units.cpu()] = 0
        # Clear the optimizer moments of everything that was just re-initialised.
        for opt in optimizers:
            for param, view in self._touched(layer):
                state = opt.state.get(param)
                if not state:
                    continue
                for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                    if key in state and torch.is_tensor(state[key]) and state[key].shape == param.shape:
                        view(state[key])[member, units] = 0.0

    @staticmethod
    def _touched(layer: HiddenLayer) -> list[tuple[torch.Tensor, Any]]:
        ens_in = layer.ensemble
        ens_out = isinstance(layer.linear_out, EnsembleLinear)
        touched: list[tuple[torch.Tensor, Any]] = [
            (layer.linear_in.weight, lambda t: _unit_rows(t, ens_in)),
            (layer.linear_out.weight, (lambda t: t) if ens_out else (lambda t: t.t().unsqueeze(0))),
        ]
        if layer.linear_in.bias is not None:
            touched.append((layer.linear_in.bias, lambda t: _vector_rows(t, ens_in)))
        if layer.norm is not None:
            ens_norm = isinstance(layer.norm, EnsembleLayerNorm)
            for p in (layer.norm.weight, layer.norm.bias):
                if p is not None:
                    touched.append((p, lambda t, e=ens_norm: _vector_rows(t, e)))
        return touched

    def state_dict(self) -> dict[str, Any]:
        return {"utility": [t.clone() for t in self.utility], "age": [t.clone() for t in self.age],
                "to_replace": [t.clone() for t in self.to_replace], "replaced_total": self.replaced_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for dst, src in zip(self.utility + self.age + self.to_replace,
                            state["utility"] + state["age"] + state["to_replace"]):
            dst.copy_(src)
        self.replaced_total = int(state["replaced_total"])
