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

from rl_plasticity.ensemble import NORM_LAYERS, EnsembleLayerNorm, EnsembleLinear, chain_blocks

_LINEAR = (nn.Linear, EnsembleLinear)  # the chain's linear layers surgery knows (no convolutions)
_NORM = NORM_LAYERS


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


@dataclasses.dataclass
class _Plan:
    """The tracked entries of every parameter on one (device, dtype), laid end to end, so that the
    correction's arithmetic runs once over all of them (gathers and scatters stay per parameter).

    Entries reset at the same optimizer step of the same parameter form a cohort; the bias
    corrections depend only on a cohort's s = t − t₀, so they are computed per cohort (float64)
    and gathered per entry (`entry_cohort`)."""

    params: list[torch.Tensor]
    owners: list[tuple[dict[str, Any], dict[str, Any]]]  # (Adam state, param group) per parameter
    index: list[torch.Tensor]                            # flat indices per parameter
    slices: list[slice]                                  # its entries in the buffers
    cohort_param: list[int]                              # per cohort: position in `params`
    cohort_t0: list[float]                               # per cohort: the optimizer step of the reset
    entry_cohort: torch.Tensor                           # (N,) int64
    s: torch.Tensor                                      # (cohorts,) float64: t − t₀ after the last step
    hyper: torch.Tensor                                  # (4, cohorts) float64: lr, β₁, β₂, ε
    lrs: list[float]                                     # lr per parameter when `hyper` was built
    eps: Optional[float]                                 # ε when every parameter has the same one
    before: torch.Tensor                                 # (N,) the entries' values before the step
    exp_avg: torch.Tensor                                # (N,) gathered m after the step
    exp_avg_sq: torch.Tensor                             # (N,) gathered v after the step
    stepping: list[bool]                                 # per parameter: stepped by this update
    views: list[tuple[torch.Tensor, ...]] = dataclasses.field(default_factory=list)
    # per parameter, made once: flat parameter, flat m, flat v (the optimizer's tensors), its
    # slices of before, exp_avg, exp_avg_sq, and the optimizer's m (to notice a replaced state)


class AdamElementSteps:
    """Per-element Adam steps for the entries interventions re-initialise (see the module docstring).

    `reset(param, mask)` clears the moments of `param`'s entries under `mask` in every optimizer
    holding it and starts their step count again; `before_step()` / `after_step()` go around each
    optimizer step.  Only the re-initialised entries are tracked (flat indices and the optimizer
    step t₀ of their reset), so the correction costs in proportion to them, not to the tensor.  An
    entry leaves once β^s < 2⁻²⁵ for both betas: from then on 1 − β^s is 1 in float32 for its own
    s and for the tensor's t alike, so torch's update is the per-element one to float32 rounding.

    Cost per update: one gather of the tracked entries' values before the step, two of their
    moments after it and one scatter, per tracked parameter; the arithmetic runs once over the
    entries of all parameters (`_Plan`), with the bias corrections computed per cohort (entries of
    one parameter reset at the same step).  No value is read back from the device per update: a
    parameter is stepped by the optimizer exactly when it has a gradient (torch's Adam and
    `optim.adam_step_many` skip the others), so its step count is followed on the host and read
    from the optimizer state only when the tracked set changes (a reset, a load, entries leaving).
    Every optimizer step of a tracked parameter is meant to run between `before_step()` and
    `after_step()` (the agents and the README's loop do): a step outside them is not corrected."""

    HORIZON_EPS = 2.0 ** -25

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self._optimizers()) if callable(self._optimizers) else self._optimizers

    def __init__(self, optimizers: Union[Iterable[torch.optim.Optimizer], Callable[[], Iterable[torch.optim.Optimizer]]]):
        # A callable is asked each time (the mixin passes `plasticity_optimizers`), so networks may
        # be registered before their optimizers exist.
        self._optimizers = optimizers if callable(optimizers) else list(optimizers)
        self.tracked: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}  # param -> (flat index, t₀)
        self._plans: Optional[list[_Plan]] = None  # built from `tracked` when first needed
        self._t: dict[torch.Tensor, float] = {}    # param -> its optimizer step, followed on the host
        self._countdown = 0                        # updates until the next check for entries leaving
        self._armed = False                        # before_step ran since the last after_step

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
                self._plans = None

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
        if self.tracked.pop(param, None) is not None:
            self._plans = None

    def _adam_state(self, param: torch.Tensor) -> Optional[tuple[dict[str, Any], dict[str, Any]]]:
        """(state, param group) of the Adam holding `param` with state, if any."""
        found = None
        for opt, group in self._owners(param):
            if isinstance(opt, torch.optim.Adam) and opt.state.get(param):
                found = (opt.state[param], group)
        return found

    # -- the correction ---------------------------------------------------------------------------
    def _build(self) -> list[_Plan]:
        """Plans from `tracked` (one host read of each tracked parameter's optimizer step)."""
        by_kind: dict[tuple[Any, Any], list[torch.Tensor]] = {}
        owners = {}
        for p in self.tracked:
            owner = self._adam_state(p)
            if owner is not None:
                owners[p] = owner
                by_kind.setdefault((p.device, p.dtype), []).append(p)
        self._t = {p: float(owners[p][0]["step"]) for p in owners}
        plans = []
        for (device, dtype), params in by_kind.items():
            index, slices, cohort_param, cohort_t0, entry_cohort, start = [], [], [], [], [], 0
            for i, p in enumerate(params):
                idx, t0 = self.tracked[p]
                born, inverse = torch.unique(t0, return_inverse=True)
                entry_cohort.append(inverse + len(cohort_t0))
                cohort_t0.extend(born.tolist())
                cohort_param.extend([i] * born.numel())
                index.append(idx)
                slices.append(slice(start, start + idx.numel()))
                start += idx.numel()
            t = [self._t[params[i]] for i in cohort_param]
            s = torch.tensor([a - b for a, b in zip(t, cohort_t0)], dtype=torch.float64, device=device)
            empty = torch.empty(start, dtype=dtype, device=device)
            plans.append(_Plan(params, [owners[p] for p in params], index, slices, cohort_param, cohort_t0,
                               torch.cat(entry_cohort).to(device), s, s, [], None, empty, torch.empty_like(empty),
                               torch.empty_like(empty), [True] * len(params)))
            self._hyper(plans[-1])
            plan = plans[-1]
            plan.views = [(self._flat(p.data), self._flat(st["exp_avg"]), self._flat(st["exp_avg_sq"]),
                           plan.before[sl], plan.exp_avg[sl], plan.exp_avg_sq[sl], st["exp_avg"])
                          for p, (st, _), sl in zip(plan.params, plan.owners, plan.slices)]
        self._countdown = self._steps_to_next_exit(plans)
        return plans

    @staticmethod
    def _hyper(plan: _Plan) -> None:
        """(Re)build the per-cohort lr, β₁, β₂, ε (lr may be changed by a schedule)."""
        groups = [g for _, g in plan.owners]
        plan.lrs = [float(g["lr"]) for g in groups]
        rows = [(plan.lrs[i], *groups[i]["betas"], groups[i]["eps"]) for i in plan.cohort_param]
        plan.hyper = torch.tensor(rows, dtype=torch.float64, device=plan.s.device).reshape(-1, 4).t().contiguous()
        epsilons = {float(g["eps"]) for g in groups}
        plan.eps = epsilons.pop() if len(epsilons) == 1 else None

    def _beta_max(self, plan: _Plan, i: int) -> float:
        return max(plan.owners[i][1]["betas"])

    def _steps_to_next_exit(self, plans: list[_Plan]) -> int:
        """A lower bound on the updates until some cohort has β^s < HORIZON_EPS for both betas
        (each update advances a cohort's s by at most one)."""
        best = None
        for plan in plans:
            for i, t0 in zip(plan.cohort_param, plan.cohort_t0):
                b, s = self._beta_max(plan, i), self._t[plan.params[i]] - t0
                need = max(0, math.ceil(math.log(self.HORIZON_EPS) / math.log(b) - s) - 1) if 0 < b < 1 else 0
                best = need if best is None else min(best, need)
        return 0 if best is None else best

    def _plans_now(self) -> list[_Plan]:
        if self._plans is None:
            self._plans = self._build()
        return self._plans

    @torch.no_grad()
    def before_step(self) -> None:
        self._armed = bool(self.tracked)
        if not self._armed:
            return
        plans = self._plans_now()
        if any(st["exp_avg"] is not view[6] or p.data_ptr() != view[0].data_ptr()
               for plan in plans for p, (st, _), view in zip(plan.params, plan.owners, plan.views)):
            self._plans = None  # the optimizer's state or a parameter's storage was replaced: views anew
            plans = self._plans_now()
        for plan in plans:
            for i, p in enumerate(plan.params):
                plan.stepping[i] = p.grad is not None  # what torch's Adam and adam_step_many step
                torch.index_select(plan.views[i][0], 0, plan.index[i], out=plan.views[i][3])

    @torch.no_grad()
    def after_step(self) -> None:
        if not self._armed or self._plans is None:
            self._armed = False
            return
        self._armed = False
        for plan in self._plans:
            if not any(plan.stepping):
                continue
            for i, p in enumerate(plan.params):
                if plan.stepping[i]:
                    self._t[p] += 1.0
            stepped: Optional[torch.Tensor] = None  # per cohort 1.0/0.0 when some parameter was not stepped
            if all(plan.stepping):
                plan.s.add_(1.0)
                s = plan.s
            else:
                stepped = torch.tensor([float(plan.stepping[i]) for i in plan.cohort_param],
                                       dtype=torch.float64, device=plan.s.device)
                plan.s.add_(stepped)
                # A cohort not stepped gets step size 0 below; s = 1 keeps its bias corrections
                # finite (a cohort reset just now has s = 0, and 1 − β^0 = 0 would give 0·∞ = NaN).
                s = torch.where(stepped > 0, plan.s, 1.0)
            if [float(g["lr"]) for _, g in plan.owners] != plan.lrs:
                self._hyper(plan)
            lr, beta1, beta2, eps = plan.hyper
            # Per cohort: lr / (1 − β₁^s), 1 / √(1 − β₂^s), ε; a parameter not stepped keeps its values.
            step_size = lr / (1.0 - torch.pow(beta1, s))
            if stepped is not None:
                step_size = step_size * stepped
            dtype, cohort = plan.before.dtype, plan.entry_cohort
            step_size = step_size.to(dtype).index_select(0, cohort)
            inv_bc2_sqrt = (1.0 - torch.pow(beta2, s)).rsqrt_().to(dtype).index_select(0, cohort)
            eps = plan.eps if plan.eps is not None else eps.to(dtype).index_select(0, cohort)
            for index, (_, m, v, _, m_out, v_out, _) in zip(plan.index, plan.views):
                torch.index_select(m, 0, index, out=m_out)
                torch.index_select(v, 0, index, out=v_out)
            # θ ← θ_before − lr/(1 − β₁^s) · m / (√v / √(1 − β₂^s) + ε)
            denom = plan.exp_avg_sq.sqrt_().mul_(inv_bc2_sqrt).add_(eps)
            new = plan.before.addcdiv_(plan.exp_avg.mul_(step_size), denom, value=-1.0)
            for index, (flat, *_), sl in zip(plan.index, plan.views, plan.slices):
                flat.scatter_(0, index, new[sl])
        self._countdown -= 1
        if self._countdown <= 0:
            self._drop_old()

    def _drop_old(self) -> None:
        """Entries with β^s < HORIZON_EPS for both betas (s after this step) leave the tracking.
        Also (one host read per tracked parameter, at these checks only) takes the optimizer's
        step count again should an optimizer step have run outside before_step/after_step."""
        changed = False
        for plan in self._plans:
            for i, p in enumerate(plan.params):
                if float(plan.owners[i][0]["step"]) != self._t[p]:
                    self._t[p], changed = float(plan.owners[i][0]["step"]), True
                index, t0 = self.tracked[p]
                young = torch.pow(self._beta_max(plan, i), self._t[p] - t0) >= self.HORIZON_EPS
                if not bool(young.all()):
                    changed = True
                    if bool(young.any()):
                        self.tracked[p] = (index[young], t0[young])
                    else:
                        del self.tracked[p]
        if changed:
            self._plans = None
        else:
            self._countdown = self._steps_to_next_exit(self._plans)

    def adopt(self, other: "AdamElementSteps") -> None:
        """Take over `other`'s tracked entries of the parameters the optimizers still hold (after
        a change of the networks' structure that keeps those parameters, e.g. plasticity injection)."""
        held = {id(p) for opt in self.optimizers for g in opt.param_groups for p in g["params"]}
        for p, entry in other.tracked.items():
            if id(p) in held:
                self.tracked[p] = entry
        self._plans = None

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
        self._plans = None
        self.tracked = {params[k]: (v["index"].to(params[k].device).clone(),
                                    v["step"].to(params[k].device, torch.float64).clone())
                        for k, v in state.items()}
