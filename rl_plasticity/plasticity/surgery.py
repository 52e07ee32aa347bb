"""Unit surgery shared by the interventions: finding hidden units, drawing fresh weights for them,
and resetting the optimizer state of what was re-initialised, per element.

Hidden units are found on any network whose hidden layers are Linear (or ensemble linear) →
[LayerNorm] → ReLU → Linear; ensemble members are separate layers.

`AdamElementSteps` gives Adam a per-element step count, as the `AdamGnT` optimizer of Dohare
et al. 2024 (github.com/shibhansh/loss-of-plasticity, `lop/utils/AdamGnT.py`) keeps one: an
entry re-initialised at optimizer step t₀ takes, at step t, the update of an Adam that started at
t₀ (bias corrections 1 − β^{t−t₀}, moments cleared at t₀), while every other entry keeps torch's
own update bitwise.  torch's Adam has one step per tensor, so the correction is applied around
the optimizer step: `before_step()` keeps the re-initialised entries' values, `after_step()`
rewrites them as

    θ ← θ_before − lr / (1 − β₁^s) · m / (√v / √(1 − β₂^s) + ε),   s = t − t₀,

which is torch's Adam formula (ε outside the bias-corrected √v̂) with the element's own s.  (AdamGnT
puts ε inside: lr·√(1−β₂^s)/(1−β₁^s) · m / (√v + ε); the two differ only in where ε enters,
and torch's form keeps untouched entries identical to the agents' torch Adam.)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from rl_plasticity.ensemble import EnsembleLayerNorm, EnsembleLinear, chain_blocks

_LINEAR = (nn.Linear, EnsembleLinear)
_NORM = (nn.LayerNorm, EnsembleLayerNorm)


def unit_rows(weight: torch.Tensor, ensemble: bool) -> torch.Tensor:
    """A view (members, out, in) of a linear weight: row j holds unit j's input weights."""
    return weight.transpose(1, 2) if ensemble else weight.unsqueeze(0)


def vector_rows(vec: torch.Tensor, ensemble: bool) -> torch.Tensor:
    """A view (members, width) of a bias or LayerNorm parameter."""
    return vec.reshape(vec.shape[0], -1) if ensemble else vec.unsqueeze(0)


@torch.no_grad()
def fresh_bias(layer: nn.Module) -> torch.Tensor:
    """A new bias for `layer` from its initial distribution: zero for the orthogonal scheme
    (`orthogonal_init_`), otherwise PyTorch's default uniform(±1/sqrt(fan_in))."""
    bias = layer.bias
    if getattr(layer, "init_gain", None) is not None:
        return torch.zeros_like(bias)
    fan_in = layer.weight.shape[-2] if isinstance(layer, EnsembleLinear) else layer.weight[0].numel()
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty_like(bias).uniform_(-bound, bound)


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
        return unit_rows(self.linear_in.weight, self.ensemble)

    def outgoing_weights(self) -> torch.Tensor:
        """(members, width, next): row j holds unit j's outgoing weights."""
        w = self.linear_out.weight
        return w if isinstance(self.linear_out, EnsembleLinear) else w.t().unsqueeze(0)

    def next_bias(self) -> Optional[torch.Tensor]:
        """(members, next): the bias of the layer reading the units."""
        b = self.linear_out.bias
        return None if b is None else vector_rows(b, isinstance(self.linear_out, EnsembleLinear))

    def touched(self) -> list[tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]:
        """(parameter, view) pairs whose view(t)[member, units] are the entries of those units:
        input weights and bias, LayerNorm gain and bias, outgoing weights."""
        ens_in = self.ensemble
        ens_out = isinstance(self.linear_out, EnsembleLinear)
        out: list[tuple[torch.Tensor, Callable]] = [
            (self.linear_in.weight, lambda t: unit_rows(t, ens_in)),
            (self.linear_out.weight, (lambda t: t) if ens_out else (lambda t: t.t().unsqueeze(0))),
        ]
        if self.linear_in.bias is not None:
            out.append((self.linear_in.bias, lambda t: vector_rows(t, ens_in)))
        if self.norm is not None:
            ens_norm = isinstance(self.norm, EnsembleLayerNorm)
            for p in (self.norm.weight, self.norm.bias):
                if p is not None:
                    out.append((p, lambda t, e=ens_norm: vector_rows(t, e)))
        return out


def hidden_layers(network: nn.Module) -> list[HiddenLayer]:
    """Linear → [LayerNorm] → ReLU → Linear chains of `network` (`chain_blocks`), in forward order."""
    blocks = chain_blocks(network)
    if any(block.crelu for block in blocks):
        raise TypeError(f"{type(network).__name__}: CReLU units (two features per linear unit) cannot be "
                        f"re-initialised unit by unit; use agent.activation=relu")
    return [HiddenLayer(block.linear, block.norm, after.linear)
            for block, after in zip(blocks, blocks[1:]) if block.relu]


def linear_layers(network: nn.Module) -> list[nn.Module]:
    """The linear (and ensemble linear) layers of `network`, in forward order."""
    return [m for m in network.modules() if isinstance(m, _LINEAR)]


class AdamElementSteps:
    """Per-element Adam steps for the entries interventions re-initialise (see the module docstring).

    `reset(param, mask)` clears the moments of `param`'s entries under `mask` in every optimizer
    holding it and starts their step count again; `before_step()` / `after_step()` go around each
    optimizer step.  Only the re-initialised entries are tracked (flat indices and the optimizer
    step t₀ of their reset), so the correction costs in proportion to them, not to the tensor.  An
    entry leaves once β^s < 2⁻²⁵ for both betas: from then on 1 − β^s is 1 in float32 for its own
    s and for the tensor's t alike, so torch's update is the per-element one to float32 rounding."""

    HORIZON_EPS = 2.0 ** -25

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self._optimizers()) if callable(self._optimizers) else self._optimizers

    def __init__(self, optimizers: Union[Iterable[torch.optim.Optimizer], Callable[[], Iterable[torch.optim.Optimizer]]]):
        # A callable is asked each time (the mixin passes `plasticity_optimizers`), so networks may
        # be registered before their optimizers exist.
        self._optimizers = optimizers if callable(optimizers) else list(optimizers)
        self.tracked: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}  # param -> (flat index, t₀)
        self._oldest: dict[torch.Tensor, float] = {}  # param -> min t₀, kept on the host (no sync per update)
        self._before: dict[torch.Tensor, tuple[torch.Tensor, float]] = {}
        self._owner_cache: dict[torch.Tensor, Any] = {}

    def _owners(self, param: torch.Tensor) -> list[tuple[torch.optim.Optimizer, dict[str, Any]]]:
        out = []
        for opt in self.optimizers:
            for group in opt.param_groups:
                if any(p is param for p in group["params"]):
                    out.append((opt, group))
        return out

    @staticmethod
    def _flat(t: torch.Tensor) -> torch.Tensor:
        if not t.is_contiguous():
            raise ValueError("per-element Adam steps need contiguous parameters")
        return t.view(-1)

    @torch.no_grad()
    def reset(self, param: torch.Tensor, mask: torch.Tensor) -> None:
        """Moments of `param[mask]` to zero and their step count to zero (the next step is their first)."""
        for opt, group in self._owners(param):
            state = opt.state.get(param)
            if not state:
                continue  # no step taken yet: moments are zero and the step is 0 already
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
                if key in state and torch.is_tensor(state[key]) and state[key].shape == param.shape:
                    state[key].masked_fill_(mask, 0.0)
            if "exp_avg" in state and isinstance(opt, torch.optim.Adam):
                if group.get("amsgrad") or group.get("weight_decay", 0.0) != 0.0 or group.get("maximize"):
                    raise ValueError("per-element Adam steps cover Adam without amsgrad, weight decay or maximize")
                born = torch.full((param.numel(),), -1.0, dtype=torch.float64, device=param.device)
                if param in self.tracked:
                    index, t0 = self.tracked[param]
                    born[index] = t0
                born.masked_fill_(mask.reshape(-1), float(state["step"]))
                index = (born >= 0).nonzero().flatten()
                self.tracked[param] = (index, born[index])
                self._oldest[param] = float(born[index].min())
                self._owner_cache.pop(param, None)

    @torch.no_grad()
    def reset_whole(self, param: torch.Tensor) -> None:
        """All of `param` re-initialised: its moments cleared and its tensor step set to 0 (exact
        with torch's own per-tensor step)."""
        for opt, _ in self._owners(param):
            state = opt.state.get(param)
            if not state:
                continue
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
                if key in state and torch.is_tensor(state[key]):
                    state[key].zero_()
            if "step" in state:
                if torch.is_tensor(state["step"]):
                    state["step"].zero_()
                else:
                    state["step"] = 0
        self.tracked.pop(param, None)
        self._oldest.pop(param, None)
        self._owner_cache.pop(param, None)

    def _adam_state(self, param: torch.Tensor) -> Optional[tuple[dict[str, Any], dict[str, Any]]]:
        """(state, param group) of the Adam holding `param` (cached per tracked tensor)."""
        if param not in self._owner_cache:
            found = None
            for opt, group in self._owners(param):
                if isinstance(opt, torch.optim.Adam) and opt.state.get(param):
                    found = (opt.state[param], group)
            self._owner_cache[param] = found
        return self._owner_cache[param]

    @torch.no_grad()
    def before_step(self) -> None:
        self._before = {}
        for p, (index, _) in self.tracked.items():
            owner = self._adam_state(p)
            if owner is not None:
                self._before[p] = (self._flat(p.detach())[index], float(owner[0]["step"]))

    @torch.no_grad()
    def after_step(self) -> None:
        if not self._before:
            return
        for param, (before, step_before) in self._before.items():
            state, group = self._adam_state(param)
            t = float(state["step"])
            if t == step_before:
                continue  # the optimizer did not step this tensor (no gradient)
            index, t0 = self.tracked[param]
            beta1, beta2 = group["betas"]
            s = (t - t0).to(param.dtype)
            step_size = float(group["lr"]) / (1.0 - torch.pow(beta1, s))
            bc2_sqrt = (1.0 - torch.pow(beta2, s)).sqrt()
            m, v = self._flat(state["exp_avg"])[index], self._flat(state["exp_avg_sq"])[index]
            self._flat(param.data).index_copy_(0, index, before - step_size * m / (v.sqrt() / bc2_sqrt + group["eps"]))
            if max(beta1, beta2) ** (t - self._oldest[param]) < self.HORIZON_EPS:  # some are old enough: drop them
                young = torch.pow(max(beta1, beta2), t - t0) >= self.HORIZON_EPS
                if bool(young.any()):
                    self.tracked[param] = (index[young], t0[young])
                    self._oldest[param] = float(t0[young].min())
                else:
                    del self.tracked[param]
                    del self._oldest[param]
        self._before = {}

    # -- checkpointing: entries keyed by optimizer index and parameter index within it ----------
    def _index(self) -> dict[str, torch.Tensor]:
        keys = {}
        for i, opt in enumerate(self.optimizers):
            params = [p for g in opt.param_groups for p in g["params"]]
            for j, p in enumerate(params):
                keys[f"{i}.{j}"] = p
        return keys

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        by_param = {id(p): k for k, p in self._index().items()}
        return {by_param[id(p)]: {"index": index.clone(), "step": t0.clone()} for p, (index, t0) in self.tracked.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        params = self._index()
        self._owner_cache = {}
        self.tracked = {params[k]: (v["index"].to(params[k].device).clone(),
                                    v["step"].to(params[k].device, torch.float64).clone())
                        for k, v in state.items()}
        self._oldest = {p: float(t0.min()) for p, (_, t0) in self.tracked.items()}
