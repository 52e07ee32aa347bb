"""Interventions: periodic surgery on the registered networks (not a loss term), composable with
any regularizer (`plasticity=<regularizer> plasticity.interventions=[redo,shrink_perturb]`).

An intervention is built for the agent (the `PlasticityMixin` host: its networks, optimizers and
their per-element Adam steps) and, at every (re)registration of the networks, `attach`ed to them.
After each update the mixin asks `due(update)`; a due intervention gets
`after_update(update, inputs)` (inputs: the update's batch per network, when it `needs_inputs`)
and returns what it did ({metric: number}).  One that `needs_features` (continual backprop) is
called `after_update(update, inputs, features=...)` with the hidden features of the update's own
training forward, taken before the optimizer step ({network: [(members, batch, width) per hidden
layer]}; the agents record them only when such an intervention is due, see
`PlasticityMixin.plasticity_wants_features`); a network without them gets None there and the
intervention falls back to a forward of its own on `inputs` (built for it then).  `draws_random(next_update)` (by default: due and
`random_surgery`) tells the seed groups whether the coming update's surgery draws from the global
generators (agents/seeds.py then runs it under that seed's own generators); `on_task_change()` is called by the loops when the
environment's task changes (Slippery Ant's friction, continual DMC's task); `state_dict()` /
`load_state_dict()` travel in checkpoints; `diagnostics()` adds `plasticity/<network>/<metric>`.

The registry `INTERVENTIONS` maps each name to its class; each class's docstring cites its paper,
section and defaults, and its hyper-parameters are the dataclass `cfg_type` under
`plasticity.<name>.<key>` (configs/plasticity/none.yaml).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar, Mapping, Optional

import torch
from torch import nn

from rl_plasticity.ensemble import CReLU, fresh_weight
from rl_plasticity.optim import adam_step_many
from rl_plasticity.config import ConfigError, from_node, require
from rl_plasticity.plasticity.cbp import ContinualBackprop, reinit_units
from rl_plasticity.plasticity.effective_rank import layer_effective_ranks
from rl_plasticity.plasticity.layers import FeatureRecorder
from rl_plasticity.plasticity.surgery import _NORM, fresh_bias, hidden_layers, linear_layers


# -- hyper-parameters ----------------------------------------------------------------------------
@dataclasses.dataclass
class ReDoConfig:
    every: int = 1000     # gradient updates between recycling steps (F)
    tau: float = 0.025    # dormancy threshold τ on the normalised score

    def check(self, prefix: str) -> None:
        require(self.every >= 1, f"{prefix}.every must be >= 1, got {self.every}")
        require(self.tau >= 0, f"{prefix}.tau must be >= 0, got {self.tau}")


@dataclasses.dataclass
class ShrinkPerturbConfig:
    every: Optional[int] = None  # gradient updates between applications (null: only at task changes)
    task_change: bool = True     # also at every task change of the environment
    shrink: float = 0.8          # λ
    perturb: float = 0.2         # σ

    def check(self, prefix: str) -> None:
        require(self.every is None or self.every >= 1, f"{prefix}.every must be >= 1 or null, got {self.every}")
        require(self.shrink >= 0, f"{prefix}.shrink must be >= 0, got {self.shrink}")
        require(self.perturb >= 0, f"{prefix}.perturb must be >= 0, got {self.perturb}")


@dataclasses.dataclass
class PartialResetConfig:
    every: int = 200_000                          # gradient updates between resets
    layers: int = 1                               # the last k linear layers are re-initialised
    networks: tuple[str, ...] = ("actor", "critic")  # which registered networks

    def check(self, prefix: str) -> None:
        require(self.every >= 1, f"{prefix}.every must be >= 1, got {self.every}")
        require(self.layers >= 1, f"{prefix}.layers must be >= 1, got {self.layers}")
        require(len(self.networks) >= 1, f"{prefix}.networks must name at least one network")


@dataclasses.dataclass
class ResetConfig:
    every: int = 2_560_000  # gradient updates between full resets

    def check(self, prefix: str) -> None:
        require(self.every >= 1, f"{prefix}.every must be >= 1, got {self.every}")


@dataclasses.dataclass
class InjectionConfig:
    at: Optional[int] = None                         # the gradient update after which to inject
    layers: int = 2                                  # the head: the last k linear layers
    networks: tuple[str, ...] = ("actor", "critic")  # which registered networks

    def check(self, prefix: str) -> None:
        require(self.at is None or self.at >= 1, f"{prefix}.at must be >= 1 (a gradient update), got {self.at}")
        require(self.layers >= 1, f"{prefix}.layers must be >= 1, got {self.layers}")
        require(len(self.networks) >= 1, f"{prefix}.networks must name at least one network")


CONFIG_TYPES: dict[str, type] = {"redo": ReDoConfig, "shrink_perturb": ShrinkPerturbConfig,
                                 "partial_reset": PartialResetConfig, "reset": ResetConfig,
                                 "injection": InjectionConfig}


def intervention_config(name: str, node: Any) -> Any:
    """`plasticity.<name>` as its dataclass (a dict from the command line, or the dataclass)."""
    cls = CONFIG_TYPES[name]
    cfg = node if isinstance(node, cls) else from_node(cls, dict(node or {}), f"plasticity.{name}")
    if isinstance(cfg, (PartialResetConfig, InjectionConfig)):
        cfg.networks = tuple(cfg.networks)
    cfg.check(f"plasticity.{name}")
    return cfg


# -- the interface -------------------------------------------------------------------------------
class Intervention:
    """See the module docstring.  Subclasses set `name` and override what they need."""

    name: ClassVar[str] = ""
    needs_inputs: ClassVar[bool] = False
    # Takes the hidden features of the update's own training forward (pre-step) as `features`.
    needs_features: ClassVar[bool] = False
    random_surgery: ClassVar[bool] = False  # its surgery draws from the global generators

    def __init__(self, host: Any, cfg: Any = None):
        self.host = host
        self.cfg = cfg

    def attach(self, networks: Mapping[str, nn.Module]) -> None:
        """Called at every registration of the networks (construction and full resets)."""

    def due(self, update: int) -> bool:
        return False

    def after_update(self, update: int, inputs: Optional[Mapping[str, torch.Tensor]]) -> dict[str, float]:
        return {}

    def draws_random(self, next_update: int) -> bool:
        return self.random_surgery and self.due(next_update)

    def on_task_change(self) -> None:
        """The environment's task just changed."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def diagnostics(self) -> dict[str, dict[str, float]]:
        """{network: {metric: value}}, written as plasticity/<network>/<metric>."""
        return {}


def _features(net: nn.Module, x: torch.Tensor, view: Optional[nn.Module] = None) -> list[torch.Tensor]:
    """Hidden features of `net` on `x`: of every activation of `view` (default: of `net`)."""
    with FeatureRecorder(net if view is None else view) as rec:
        net(x)
    return rec.features


def trainable_view(network: nn.Module) -> nn.Module:
    """The network as the unit-level interventions see it.  Without plasticity injection, the
    network itself; after it, an `nn.Sequential` of the same module objects in forward order that
    leaves out the frozen heads: the trunk, then the fresh head θ' (`InjectedHead.fresh`)."""
    seq = network.layers if isinstance(getattr(network, "layers", None), nn.Sequential) else network
    if not isinstance(seq, nn.Sequential) or len(seq) == 0 or not isinstance(seq[-1], InjectedHead):
        return network
    return nn.Sequential(*list(seq)[:-1], *seq[-1].fresh)


def head_boundary(network: nn.Module) -> Optional[nn.Module]:
    """After plasticity injection: the first linear layer of the fresh head (the units before it
    are read by all three heads); None without injection."""
    view = trainable_view(network)
    if view is network:
        return None
    seq = network.layers if isinstance(getattr(network, "layers", None), nn.Sequential) else network
    return linear_layers(seq[-1].fresh)[0]


class FullReset(Intervention):
    """Full reset (Nikishin et al. 2022, "The primacy bias in deep RL", §4; the SR-SAC reset
    baseline of spectral-regularization.md §5.4): every `every` updates the agent's
    `reset_networks()` builds fresh networks, targets, temperature and optimizer state; the replay
    buffer is kept.  Default period 2,560,000 updates (SR-SAC, 160k env steps at replay ratio 16);
    `agent.reset_interval` sets the same."""

    name = "reset"
    random_surgery = True

    def due(self, update: int) -> bool:
        return update % self.cfg.every == 0

    def after_update(self, update, inputs):
        self.host.reset_networks()
        self.host.reset_count += 1
        return {"resets": 1.0}


class PartialReset(Intervention):
    """Reset of the last k layers (Nikishin et al. 2022, "The primacy bias in deep RL", §4:
    "periodically re-initialize the last layers", with the number of reset layers an ablation).

    Every `every` updates, in each network of `networks` (SAC: actor and critic separately
    selectable): the last `layers` linear layers get weights and biases drawn anew from their
    initial distribution, LayerNorms between them gain 1 and bias 0; the optimizer state of
    those tensors is cleared (moments 0, step 0).  A network with a target copy (SAC's critic)
    has the same layers of its target set to the fresh values, as a full reset does.
    Defaults: every 200,000 updates, the last layer, actor and critic.  After plasticity
    injection the layers are counted on the trainable network (`trainable_view`: the trunk, then
    the fresh head θ'), so the frozen heads θ and θ'' stay as they are.

    What their code (github.com/evgenii-nikishin/rl_with_resets) does, for comparison: SAC on DMC
    states (`train_dense.py`) builds a whole new agent (every layer of actor and critic, target,
    temperature, optimizer state: the `reset` intervention) every `reset_interval` = 2·10⁵
    environment steps, i.e. 200,000 updates at their default replay ratio 1 (3,200,000 at the
    replay ratio 16 of configs/agent/sac.yaml); DrQ (`train_pixels.py`) resets everything but the
    encoder every 10⁵ environment steps; SPR on Atari (`SPR_with_resets.gin`) resets the final
    layer only (`reset_head`).  So `layers` = 1 is their SPR choice, and `every` = 200,000 is
    their SAC period at replay ratio 1."""

    name = "partial_reset"
    random_surgery = True

    def attach(self, networks):
        unknown = [n for n in self.cfg.networks if n not in networks]
        if unknown:
            raise ConfigError(f"plasticity.partial_reset.networks: unknown network '{unknown[0]}'. "
                              f"Valid choices: {', '.join(networks)}")
        for n in self.cfg.networks:
            if len(linear_layers(trainable_view(networks[n]))) < self.cfg.layers:
                raise ConfigError(f"plasticity.partial_reset.layers={self.cfg.layers}: network '{n}' has only "
                                  f"{len(linear_layers(trainable_view(networks[n])))} trainable linear layers")
        self.count = getattr(self, "count", 0)

    def due(self, update):
        return update % self.cfg.every == 0

    @staticmethod
    def chosen_modules(network: nn.Module, layers: int) -> list[nn.Module]:
        """The last `layers` linear layers and the LayerNorms after the first of them."""
        linears = linear_layers(network)
        first, ids = linears[-layers], {id(m) for m in linears}
        chosen, on = [], False
        for m in network.modules():
            on = on or m is first
            if on and (id(m) in ids or isinstance(m, _NORM)):
                chosen.append(m)
        return chosen

    @torch.no_grad()
    def after_update(self, update, inputs):
        nets = self.host._plasticity_networks
        targets = self.host.plasticity_targets()
        steps = self.host.plasticity_element_steps
        touched = 0
        for name in self.cfg.networks:
            net = nets[name]
            chosen = self.chosen_modules(trainable_view(net), self.cfg.layers)
            for m in chosen:
                if isinstance(m, _NORM):
                    if m.weight is not None:
                        m.weight.fill_(1.0)
                    if m.bias is not None:
                        m.bias.zero_()
                else:
                    m.weight.copy_(fresh_weight(m))
                    if m.bias is not None:
                        m.bias.copy_(fresh_bias(m))
                for p in m.parameters(recurse=False):
                    steps.reset_whole(p)
                    touched += p.numel()
            target = targets.get(name)
            if target is not None:
                index = {id(m): i for i, m in enumerate(net.modules())}
                target_modules = list(target.modules())
                for m in chosen:
                    for p, q in zip(m.parameters(recurse=False), target_modules[index[id(m)]].parameters(recurse=False)):
                        q.copy_(p)
        self.count += 1
        return {"params_reset": float(touched)}

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = int(state.get("count", 0))

    def diagnostics(self):
        return {n: {"partial_resets": float(self.count)} for n in self.cfg.networks}


class ReDo(Intervention):
    """Recycling dormant neurons (Sokar et al. 2023, "The dormant neuron phenomenon in deep RL",
    §4, Definition 3.1 and Algorithm 1).

    Every F = `every` updates, on the update's batch (the current data), each hidden unit i of a
    layer ℓ with H units gets the score s_i = E_x|h_i(x)| / (1/H Σ_k E_x|h_k(x)|); a unit with
    s_i ≤ τ is dormant.  Dormant units get fresh incoming weights from the layer's initial
    distribution (incoming bias 0; a LayerNorm before the ReLU: gain 1, bias 0) and zero outgoing
    weights, and the optimizer's moments and (per-element) step of all those entries are reset.
    Defaults: F = 1000, τ = 0.025 (the paper's default; some of its settings use 0.1).  After
    plasticity injection it recycles the units of the trunk and of the fresh head θ'
    (`trainable_view`), except the trunk's last hidden layer: the frozen heads read those units
    too, so fresh incoming weights would change their outputs.  Their
    public code (github.com/google/dopamine, `labs/redo`) agrees where it fixes a value: its SAC
    config `tfagents/configs/sac_mujoco_dense_config.gin` recycles every 1000 updates, actor and
    both critics but not the target critics (`reset_target_models=False`), and scores units on
    256 samples of the training batch (`log_batch_size`; the DQN agents' `batch_size_statistics`
    is 256 too), as here on SAC's 256-sample update batch; τ is not fixed in its configs (the
    class default `dead_neuron_threshold` is 0, set per run)."""

    name = "redo"
    random_surgery = True
    needs_inputs = True

    def attach(self, networks):
        self.views = {n: trainable_view(net) for n, net in networks.items()}
        self.layers = {n: hidden_layers(view) for n, view in self.views.items()}
        # After plasticity injection, the units before the head are read by the frozen heads too:
        # new incoming weights would change θ's and θ''s outputs however θ' is zeroed, so they stay.
        self.skip = {n: [layer.linear_out is head_boundary(networks[n]) for layer in self.layers[n]] for n in networks}
        self.recycled: dict[str, int] = getattr(self, "recycled", None) or {n: 0 for n in networks}

    def due(self, update):
        return update % self.cfg.every == 0

    @staticmethod
    def scores(features: torch.Tensor) -> torch.Tensor:
        """s_i of every unit of a layer's features (members, batch, width) -> (members, width)."""
        activity = features.abs().mean(1)
        return activity / activity.mean(-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def after_update(self, update, inputs):
        steps = self.host.plasticity_element_steps
        total = 0
        for name, net in self.host._plasticity_networks.items():
            feats = _features(net, inputs[name], self.views[name])  # every score before any surgery
            for layer, f, skip in zip(self.layers[name], feats, self.skip[name]):
                if skip:
                    continue
                dormant = self.scores(f) <= self.cfg.tau
                for member in range(dormant.shape[0]):
                    units = dormant[member].nonzero().flatten()
                    if units.numel():
                        reinit_units(layer, member, units, steps)
                        self.recycled[name] += int(units.numel())
                        total += int(units.numel())
        return {"recycled": float(total)}

    def state_dict(self):
        return {"recycled": dict(self.recycled)}

    def load_state_dict(self, state):
        self.recycled.update({k: int(v) for k, v in state.get("recycled", {}).items()})

    def diagnostics(self):
        return {n: {"redo_recycled": float(v)} for n, v in self.recycled.items()}


class ShrinkPerturb(Intervention):
    """Shrink-and-perturb (Ash & Adams 2020, "On warm-starting neural network training", §4):
    every parameter θ ← λθ + σ·θ_fresh, θ_fresh drawn anew from the initial distribution each time
    (weights by the layer's scheme, biases likewise, LayerNorm gains 1 and biases 0), every `every`
    updates and, with `task_change`, at the first update after each task change of the
    environment.  The optimizer state is kept (the paper shrinks and perturbs the weights only).
    Frozen parameters (after plasticity injection: the heads θ and θ'') are left alone.
    Defaults λ = 0.8, σ = 0.2: the interpolation θ ← αθ + (1 − α)φ toward a fresh initialisation φ
    with α = 0.8 that D'Oro et al. 2023 ("Sample-efficient RL by breaking the replay ratio
    barrier") use in SR-SPR on Atari (a secondary summary of the paper states it; not checked
    against the paper text here); their SR-SAC
    on DMC (github.com/proceduralia/high_replay_ratio_continuous_control) resets fully instead, so
    no published SAC value exists for these two; Ash & Adams sweep λ and σ; `every` null (task
    changes only)."""

    name = "shrink_perturb"
    random_surgery = True

    def attach(self, networks):
        self.pending = getattr(self, "pending", False)
        self.count = getattr(self, "count", 0)

    def due(self, update):
        every = self.cfg.every
        return self.pending or (every is not None and update % every == 0)

    def on_task_change(self):
        if self.cfg.task_change:
            self.pending = True

    @staticmethod
    @torch.no_grad()
    def fresh(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, θ_fresh) for the parameters `module` owns directly."""
        if isinstance(module, _NORM):
            out = []
            if module.weight is not None:
                out.append((module.weight, torch.ones_like(module.weight)))
            if module.bias is not None:
                out.append((module.bias, torch.zeros_like(module.bias)))
            return out
        out = [(module.weight, fresh_weight(module))]
        if module.bias is not None:
            out.append((module.bias, fresh_bias(module)))
        return out

    @torch.no_grad()
    def after_update(self, update, inputs):
        lam, sigma = self.cfg.shrink, self.cfg.perturb
        for net in self.host._plasticity_networks.values():
            linears = {id(m) for m in linear_layers(net)}
            for module in net.modules():
                if isinstance(module, _NORM) or id(module) in linears:
                    for p, fresh in self.fresh(module):
                        if p.requires_grad:  # after plasticity injection: not the frozen heads θ, θ''
                            p.mul_(lam).add_(fresh, alpha=sigma)
        self.pending = False
        self.count += 1
        return {"applied": 1.0}

    def state_dict(self):
        return {"pending": self.pending, "count": self.count}

    def load_state_dict(self, state):
        self.pending, self.count = bool(state.get("pending", False)), int(state.get("count", 0))

    def diagnostics(self):
        return {n: {"shrink_perturb_count": float(self.count)} for n in self.host._plasticity_networks}


class ContinualBackpropIntervention(Intervention):
    """Continual backprop (Dohare et al. 2024) on every hidden layer of every network, after every
    update, on the hidden features of the update's own training forward (taken before the
    optimizer step, as in their code); see plasticity/cbp.py for the algorithm, its reference, this
    data source and its defaults (replacement rate `plasticity.cbp_replacement_rate` 1e-4,
    maturity `plasticity.cbp_maturity` 1e4, decay `plasticity.cbp_decay` 0.99).

    A network whose training features were not recorded (a Python-API host that did not record
    them: `PlasticityMixin.plasticity_record`) gets them from a forward on the update's inputs
    after the step instead (post-step features of the same batch)."""

    name = "cbp"
    random_surgery = True  # a replacement may fall on any update (due every update)
    needs_features = True

    def attach(self, networks):
        c = self.host.plasticity_cfg
        self.units = {n: ContinualBackprop(net, c.cbp_replacement_rate, c.cbp_maturity, c.cbp_decay)
                      for n, net in networks.items()}

    def due(self, update):
        return True

    @torch.no_grad()
    def after_update(self, update, inputs, features=None):
        steps = self.host.plasticity_element_steps
        replaced = 0
        for name, net in self.host._plasticity_networks.items():
            h = features.get(name) if features is not None else None
            if h is None:  # not recorded: a forward of its own, after the step
                h = _features(net, inputs[name])
            replaced += self.units[name].step(h, steps)
        return {"replaced": float(replaced)}

    def state_dict(self):
        return {n: c.state_dict() for n, c in self.units.items()}

    def load_state_dict(self, state):
        for n, s in state.items():
            self.units[n].load_state_dict(s)

    def diagnostics(self):
        return {n: {"cbp_replaced": float(c.replaced_total)} for n, c in self.units.items()}


def _fused_ok(net: nn.Module) -> Optional[bool]:
    """Adam's fused kernel where torch has one (CPU and CUDA), else torch's default."""
    devices = {p.device.type for p in net.parameters()}
    return True if devices and devices <= {"cpu", "cuda"} else None


class EffectiveRankStep(Intervention):
    """The effective-rank step of L2-ER (spectral-collapse-l2-er.md §7, Algorithm 1, App. D.2):
    every `plasticity.er_step` updates, one step of a separate Adam (lr `plasticity.er_lr`) per
    network on −mean over hidden layers of the effective rank exp(H(σ/Σσ)) of the features of
    `plasticity.er_batch` input rows.  Defaults: Table 8 (er_batch 128, er_step 1), the learning
    rate of the chosen preset (Table 7)."""

    name = "er_step"
    needs_inputs = True

    def attach(self, networks):
        lr = self.host.plasticity_cfg.er_lr
        self.optimizers = {n: torch.optim.Adam(net.parameters(), lr=lr, fused=_fused_ok(net))
                           for n, net in networks.items()}

    def due(self, update):
        return update % self.host.plasticity_cfg.er_step == 0

    def after_update(self, update, inputs):
        self.step(inputs)
        return {}

    def step(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One ER step on every network; returns each network's mean effective rank before it.

        Same objective and gradient as autograd through `effective_rank` (torch.linalg.svdvals),
        network by network; computed faster: every layer of every network in one batched float64
        Gram eigendecomposition (`layer_effective_ranks`), one backward over all networks (their
        parameters are disjoint), one fused Adam call over every network's ER optimizer.  The
        task gradients in `.grad` are kept."""
        nets = self.host._plasticity_networks
        batch = self.host.plasticity_cfg.er_batch
        features: dict[str, list[torch.Tensor]] = {}
        for name, net in nets.items():
            with FeatureRecorder(net, detach=False) as rec:
                net(inputs[name][:batch].detach())
            features[name] = rec.features
        layer_ranks = iter(layer_effective_ranks([f for fs in features.values() for f in fs]))
        ranks = {name: torch.stack([next(layer_ranks).mean() for _ in fs]).mean() for name, fs in features.items()}
        params = [p for net in nets.values() for p in net.parameters()]
        grads = torch.autograd.grad(-torch.stack(list(ranks.values())).sum(), params, allow_unused=True)
        task_grads = [p.grad for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        adam_step_many(list(self.optimizers.values()))
        for p, g in zip(params, task_grads):
            p.grad = g
        return {name: rank.detach() for name, rank in ranks.items()}

    def state_dict(self):
        return {n: o.state_dict() for n, o in self.optimizers.items()}

    def load_state_dict(self, state):
        for n, s in state.items():
            opt = self.optimizers[n]
            s = copy.deepcopy(s)
            for group, saved in zip(opt.param_groups, s["param_groups"]):
                # Checkpoints from before the ER optimizers were fused: same state, fused kernel.
                saved["fused"], saved["foreach"] = group["fused"], group["foreach"]
            opt.load_state_dict(s)


class InjectedHead(nn.Module):
    """h(z) = h_θ(z) + h_θ'(z) − h_θ''(z): the old head `frozen` (θ, no longer trained), a fresh head
    `fresh` (θ', trained) and its frozen copy `fresh_frozen` (θ'' = θ' at injection), so the output
    equals the old head's at injection.  `detached` is passed on to ensemble layers."""

    def __init__(self, frozen: nn.Sequential, fresh: nn.Sequential, fresh_frozen: nn.Sequential):
        super().__init__()
        self.frozen, self.fresh, self.fresh_frozen = frozen, fresh, fresh_frozen

    @staticmethod
    def _run(head: nn.Sequential, z: torch.Tensor, detached: Optional[bool]) -> torch.Tensor:
        for layer in head:
            z = layer(z) if detached is None or isinstance(layer, (nn.ReLU, CReLU)) else layer(z, detached)
        return z

    @staticmethod
    def combine(frozen: torch.Tensor, fresh: torch.Tensor, fresh_frozen: torch.Tensor) -> torch.Tensor:
        """h_θ(z) + h_θ'(z) − h_θ''(z) from the three heads' outputs (Nikishin et al. 2023, §3, Eq. 1);
        the fused update and the batched seeds sum them here too, in this order."""
        return (frozen + fresh) - fresh_frozen

    def forward(self, z: torch.Tensor, detached: Optional[bool] = None) -> torch.Tensor:
        return self.combine(*(self._run(head, z, detached) for head in (self.frozen, self.fresh, self.fresh_frozen)))


class PlasticityInjection(Intervention):
    """Plasticity injection (Nikishin et al. 2023, "Deep RL with plasticity injection", §3, Eq. 1):
    once, after update `at`, the head of each network in `networks` (its last `layers` linear layers
    and what follows them) becomes h_θ(z) + h_θ'(z) − h_θ''(z) (`InjectedHead`): θ frozen, θ' drawn
    fresh from the initial distribution and trained, θ'' a frozen copy of θ', so the output is
    unchanged at injection and the earlier layers keep training through all three heads.  θ' is
    added to the network's parameter group of each optimizer (fresh Adam state), θ and θ'' leave
    it; a target copy (SAC's critic) gets the same head (its own old head frozen, the same θ', θ'').
    The networks are then registered again, so regularizer state restarts there (θ₀ of l2_init and
    wasserstein becomes the injected network, spectral's power-iteration vectors are drawn anew).
    Defaults: the last two linear layers (the paper injects into the head), actor and critic;
    `at` must be set (the paper injects once, a quarter into training on Atari).

    It changes the networks' structure: `plasticity_structure_changed` lets the agent rebuild what
    it derived from the modules (SAC's fused update plans its forward and backward anew, the trunk
    then the three heads: agents/fused.py `InjectedPlan`, compiled again under compile/cudagraphs;
    a batched SAC or PPO seed group, whose seeds all inject at the same update, stacks their
    networks anew: agents/seeds.py).  It composes with every regularizer,
    full resets, and the unit-level interventions that act on trainable parameters: redo,
    partial_reset and shrink_perturb see the trunk and the fresh head θ' (`trainable_view`) and
    leave θ and θ'' frozen; per-element Adam steps of entries re-initialised before the injection
    carry over.  It does not compose with `cbp` and `er_step` (see INCOMPATIBLE)."""

    name = "injection"
    random_surgery = True
    INCOMPATIBLE = {
        "cbp": "continual backprop keeps a utility and age per hidden unit built with the networks (an injection "
               "would restart them) and moves a replaced unit's mean contribution into the next layer's bias, "
               "which for the units before the head are the biases of the frozen heads too",
        "er_step": "the effective-rank step's Adam holds every parameter of the network, the frozen heads too, and "
                   "its objective, the effective rank of every hidden layer's features, would count three heads",
    }

    def attach(self, networks):
        if self.cfg.at is None:
            raise ConfigError("plasticity.injection.at must be set: the gradient update after which to inject")
        clash = [n for n in self.host.plasticity_cfg.interventions if n in self.INCOMPATIBLE]
        if clash:
            raise ConfigError(f"plasticity injection does not compose with '{clash[0]}': {self.INCOMPATIBLE[clash[0]]}. "
                              f"It composes with any regularizer and with reset, redo, partial_reset, shrink_perturb")
        unknown = [n for n in self.cfg.networks if n not in networks]
        if unknown:
            raise ConfigError(f"plasticity.injection.networks: unknown network '{unknown[0]}'. "
                              f"Valid choices: {', '.join(networks)}")
        self.injected = getattr(self, "injected", False) and all(
            isinstance(self._sequence(networks[n])[-1], InjectedHead) for n in self.cfg.networks)

    def due(self, update):
        return not self.injected and update == self.cfg.at

    @staticmethod
    def _sequence(network: nn.Module) -> nn.Sequential:
        seq = network.layers if hasattr(network, "layers") and isinstance(network.layers, nn.Sequential) else network
        if not isinstance(seq, nn.Sequential):
            raise ConfigError(f"plasticity injection needs an nn.Sequential network (or one with .layers), "
                              f"got {type(network).__name__}")
        return seq

    def _split(self, seq: nn.Sequential) -> int:
        linears = [i for i, m in enumerate(seq) if m in linear_layers(seq)]
        if len(linears) < self.cfg.layers:
            raise ConfigError(f"plasticity.injection.layers={self.cfg.layers}: the network has {len(linears)} linear layers")
        return linears[-self.cfg.layers]

    @staticmethod
    @torch.no_grad()
    def _fresh_copy(head: nn.Sequential) -> nn.Sequential:
        fresh = copy.deepcopy(head)
        for m in fresh.modules():
            if isinstance(m, _NORM):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                if m.bias is not None:
                    m.bias.zero_()
            elif m in linear_layers(fresh):
                m.weight.copy_(fresh_weight(m))
                if m.bias is not None:
                    m.bias.copy_(fresh_bias(m))
        return fresh

    @torch.no_grad()
    def inject(self) -> None:
        nets = self.host._plasticity_networks
        targets = self.host.plasticity_targets()
        optimizers = self.host.plasticity_optimizers()
        for name in self.cfg.networks:
            seq = self._sequence(nets[name])
            i = self._split(seq)
            old = nn.Sequential(*list(seq)[i:])
            fresh = self._fresh_copy(old)
            fresh_frozen = copy.deepcopy(fresh)
            # Frozen from here on, without the gradient of the last update (which a gradient clip
            # over all the network's parameters, PPO's max_grad_norm, would otherwise count).
            for p in old.parameters():
                p.grad = None
            old.requires_grad_(False)
            fresh_frozen.requires_grad_(False)
            head = InjectedHead(old, fresh, fresh_frozen)
            # The optimizer: θ' joins the group that held θ; θ and θ'' leave it.
            for opt in optimizers:
                for group in opt.param_groups:
                    ids = {id(p) for p in old.parameters()}
                    if any(id(p) in ids for p in group["params"]):
                        group["params"] = [p for p in group["params"] if id(p) not in ids] + list(fresh.parameters())
                        for p in old.parameters():
                            opt.state.pop(p, None)
            del seq[i:]
            seq.append(head)
            target = targets.get(name)
            if target is not None:
                tseq = self._sequence(target)
                t_old = nn.Sequential(*list(tseq)[i:])
                t_old.requires_grad_(False)
                del tseq[i:]
                tseq.append(InjectedHead(t_old, copy.deepcopy(fresh).requires_grad_(False),
                                         copy.deepcopy(fresh_frozen)))
        self.injected = True
        steps = self.host.plasticity_element_steps
        self.host.plasticity_structure_changed()
        self.host.plasticity_element_steps.adopt(steps)

    def after_update(self, update, inputs):
        self.inject()
        return {"injected": 1.0}

    def prepare_load(self, state: Mapping[str, Any]) -> None:
        """Before a checkpoint's networks load: inject if the saved run had (values are then overwritten)."""
        if state.get("injected") and not self.injected:
            self.inject()

    def state_dict(self):
        return {"injected": self.injected}

    def load_state_dict(self, state):
        self.injected = bool(state.get("injected", False))

    def diagnostics(self):
        return {n: {"injected": float(self.injected)} for n in self.cfg.networks}


INTERVENTIONS: dict[str, type[Intervention]] = {
    cls.name: cls for cls in (ContinualBackpropIntervention, EffectiveRankStep, FullReset, PartialReset,
                              PlasticityInjection, ReDo, ShrinkPerturb)}


def check_names(names: Any) -> tuple[str, ...]:
    """`plasticity.interventions` as a tuple of known names (ConfigError naming the valid ones)."""
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for n in names:
        if n not in INTERVENTIONS:
            raise ConfigError(f"unknown intervention '{n}' in plasticity.interventions. "
                              f"Valid choices: {', '.join(sorted(INTERVENTIONS))}")
        if n not in out:
            out.append(n)
    return tuple(out)
