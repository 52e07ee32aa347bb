"""PlasticityMixin: regularizers, interventions and diagnostics for any agent's networks.

The mixin knows networks, not algorithms.  An agent

1. calls `init_plasticity(cfg, reset_interval)` and `register_networks({"actor": ..., ...})` with
   modules whose forward takes one input tensor (so features can be recorded on any input);
2. adds `plasticity_loss(name)` to each network's loss (None when the regularizer has no term),
   and/or calls `plasticity_before_step()` between backward and the optimizer step: either one
   applies every regularizer's penalty, both apply it once (regularizers whose gradient is
   cheaper to add directly, like spectral, add it there unless the loss holds it; the agents
   pass `defer_direct=True` to leave it there; same gradient);
3. calls `plasticity_after_update(batch)` after each optimizer step: the interventions
   (plasticity/interventions.py: the effective-rank step, continual backprop, ReDo,
   shrink-and-perturb, partial and full resets) that are due run there, in order.  Continual
   backprop reads the hidden features of the update's own training forward, before the step
   (Dohare et al.'s code does): the agent records them around that forward with
   `with self.plasticity_record(name): ...` (or passes them, `plasticity_after_update(batch,
   features)`), which costs nothing on updates where no due intervention wants them
   (`plasticity_wants_features()`); unrecorded, CBP runs a forward of its own on the inputs,
   after the step;
4. implements `plasticity_inputs(batch) -> {name: input tensor}`, `plasticity_optimizers()` (whose
   state the interventions reset for what they re-initialise, per element:
   surgery.AdamElementSteps), `plasticity_targets()` (target copies of networks, if any) and, for
   full resets, `reset_networks()` (fresh networks, targets, temperature and optimizer state, then
   `register_networks` again).

Seed groups ask `plasticity_draws_random()` whether the next update's interventions draw random
numbers; loops call `plasticity_task_change()` when the environment's task changes.  Regularizer
state, initial parameters, counters and the interventions' state are saved with
`plasticity_state_dict()`.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn

from rl_plasticity.config import ConfigError, from_node, require
from rl_plasticity.plasticity.effective_rank import effective_rank
from rl_plasticity.plasticity.interventions import (CONFIG_TYPES, INTERVENTIONS, Intervention, ResetConfig,
                                                    check_names, intervention_config)
from rl_plasticity.plasticity.layers import FeatureRecorder, weights_and_vectors
from rl_plasticity.plasticity.surgery import AdamElementSteps
from rl_plasticity.plasticity.regularizers import REGULARIZERS, Regularizer

DORMANT_THRESHOLD = 0.025  # ReDo (Sokar et al. 2023): a unit is dormant when its score ≤ τ
# The diagnostics that depend on the probe data (the rest read only the parameters): the loops
# also report these on a fixed reference batch, as plasticity_ref/<network>/<metric>.
DATA_METRICS = frozenset({"feature_effective_rank", "dormant_fraction", "dead_fraction", "dead_units",
                          "feature_srank", "active_fraction", "feature_norm"})


def _srank(s: torch.Tensor, threshold: float = 0.99) -> torch.Tensor:
    """srank₉₉ of singular values `s` (..., k): the fewest of the largest whose sum exceeds 99 %
    of the total (Kumar et al. 2021; directions-of-curvature.md §4)."""
    cum = s.cumsum(-1) / s.sum(-1, keepdim=True).clamp_min(1e-30)
    return ((cum <= threshold).sum(-1) + 1).clamp(max=s.shape[-1]).float()


@torch.no_grad()
def _last_update_norm(params: list[torch.Tensor], optimizers: list[torch.optim.Optimizer]) -> Optional[torch.Tensor]:
    """‖Δθ‖ of the optimizers' last Adam step on `params` (directions-of-curvature.md Fig. 1/5):
    lr · m̂ / (√v̂ + ε) rebuilt from the moment estimates (no copy of θ kept between updates);
    None when the optimizer is not Adam or has not stepped."""
    ids = {id(p) for p in params}
    total, found = None, False
    for opt in optimizers:
        if not isinstance(opt, torch.optim.Adam):
            return None
        for group in opt.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if id(p) not in ids or p not in opt.state or "exp_avg" not in opt.state[p]:
                    continue
                st = opt.state[p]
                step = float(st["step"])
                m_hat = st["exp_avg"] / (1 - beta1 ** step)
                v_hat = st["exp_avg_sq"] / (1 - beta2 ** step)
                d = (float(group["lr"]) * m_hat / (v_hat.sqrt() + group["eps"])).square().sum()
                total = d if total is None else total + d
                found = True
    return total.sqrt() if found else None


# The keys a regularizer's preset sets (configs/plasticity/<name>.yaml): unset, they take its values.
PRESET_KEYS = ("coef", "er", "er_lr", "cbp")


def preset_values(name: str) -> dict[str, Any]:
    """The values of `PRESET_KEYS` in the preset `configs/plasticity/<name>.yaml` (over none.yaml,
    as Hydra composes it): one source of the papers' defaults for the command line and the API."""
    from importlib import resources

    from omegaconf import OmegaConf

    folder = resources.files("rl_plasticity.configs").joinpath("plasticity")
    values = OmegaConf.to_container(OmegaConf.load(str(folder.joinpath("none.yaml"))))
    path = folder.joinpath(f"{name}.yaml")
    if name != "none" and path.is_file():  # a regularizer registered in Python may have no preset
        preset = OmegaConf.to_container(OmegaConf.load(str(path)))
        values.update({k: v for k, v in preset.items() if k != "defaults"})
    return {key: values[key] for key in PRESET_KEYS}


@dataclasses.dataclass
class PlasticityConfig:
    """What `plasticity=<name>` configures.  `coef`, `er`, `er_lr` and `cbp` left as None take the
    values of the preset `configs/plasticity/<name>.yaml` (the papers' defaults, as the command line
    uses them), so `PlasticityConfig(name="spectral")` regularizes with coef 1e-4 rather than 0.
    Every value is checked at construction: an unknown name or an impossible value is one
    ConfigError naming the key (and, for the name, the valid choices)."""

    name: str = "none"
    coef: Optional[float] = None       # penalty coefficient for every network ...
    coef_actor: Optional[float] = None  # ... unless overridden per network
    coef_critic: Optional[float] = None
    k: float = 2.0                     # spectral exponent
    parseval_s: float = 2.0            # parseval: WWᵀ is pulled to s·I (Chung et al. 2024: gain √2 squared)
    parseval_width: Optional[float] = 64.0  # parseval: each matrix's term × (parseval_width / its rows)²; null: × 1
    er: Optional[bool] = None          # run the effective-rank step (er, l2_er)
    er_lr: Optional[float] = None
    er_batch: int = 128
    er_step: int = 1                   # updates between effective-rank steps
    log_every: int = 16_000            # updates between diagnostics
    cbp: Optional[bool] = None         # continual backprop (Dohare et al. 2024) on every hidden layer
    cbp_replacement_rate: float = 1e-4  # fraction of mature units replaced per update
    cbp_maturity: int = 10_000         # updates a unit is protected after (re)initialisation
    cbp_decay: float = 0.99            # running-average decay of the contribution utility
    # Curvature diagnostics (plasticity/curvature.py): every `curvature_every` updates (null: never
    # periodically) and, with `curvature_task_start`, right after each task change (a reset, a
    # Slippery Ant friction switch).  Both off: nothing is measured or paid for.
    curvature_every: Optional[int] = None
    curvature_task_start: bool = False
    curvature_samples: int = 32        # per-sample gradients m (empirical Fisher, gradient diversity)
    curvature_lanczos_steps: int = 24  # Lanczos steps per probe vector (and for the overlap run)
    curvature_lanczos_vectors: int = 1  # SLQ probe vectors
    curvature_epsilon: float = 0.1     # ε of the ε-Hessian rank (spectral-collapse-l2-er.md Fig. 2)
    # Interventions (plasticity/interventions.py), in the order they run after an update; `cbp`
    # and `er` above switch on "cbp" and "er_step".  Each one's keys: plasticity.<name>.<key>.
    interventions: tuple[str, ...] = ()
    redo: Any = None
    shrink_perturb: Any = None
    partial_reset: Any = None
    reset: Any = None
    injection: Any = None

    def __post_init__(self) -> None:
        if self.name not in REGULARIZERS:
            raise ConfigError(f"unknown plasticity '{self.name}'. Valid choices: {', '.join(sorted(REGULARIZERS))}")
        unset = [key for key in PRESET_KEYS if getattr(self, key) is None]
        if unset:
            preset = preset_values(self.name)
            for key in unset:
                setattr(self, key, preset[key])
        for key in ("coef", "coef_actor", "coef_critic"):
            value = getattr(self, key)
            require(value is None or value >= 0, f"plasticity.{key} must be >= 0, got {value}")
        require(self.k > 0, f"plasticity.k must be > 0, got {self.k}")
        require(self.parseval_s > 0, f"plasticity.parseval_s must be > 0, got {self.parseval_s}")
        require(self.parseval_width is None or self.parseval_width > 0,
                f"plasticity.parseval_width must be > 0 or null, got {self.parseval_width}")
        require(self.er_lr > 0, f"plasticity.er_lr must be > 0, got {self.er_lr}")
        require(self.er_batch >= 2, f"plasticity.er_batch must be >= 2, got {self.er_batch}")
        require(self.er_step >= 1, f"plasticity.er_step must be >= 1, got {self.er_step}")
        require(self.log_every >= 1, f"plasticity.log_every must be >= 1, got {self.log_every}")
        require(0.0 <= self.cbp_replacement_rate <= 1.0,
                f"plasticity.cbp_replacement_rate must be in [0, 1], got {self.cbp_replacement_rate}")
        require(self.cbp_maturity >= 0, f"plasticity.cbp_maturity must be >= 0, got {self.cbp_maturity}")
        require(0.0 <= self.cbp_decay < 1.0, f"plasticity.cbp_decay must be in [0, 1), got {self.cbp_decay}")
        require(self.curvature_every is None or self.curvature_every >= 1,
                f"plasticity.curvature_every must be >= 1 (updates) or null, got {self.curvature_every}")
        require(self.curvature_samples >= 2, f"plasticity.curvature_samples must be >= 2, got {self.curvature_samples}")
        require(self.curvature_lanczos_steps >= 2,
                f"plasticity.curvature_lanczos_steps must be >= 2, got {self.curvature_lanczos_steps}")
        require(self.curvature_lanczos_vectors >= 1,
                f"plasticity.curvature_lanczos_vectors must be >= 1, got {self.curvature_lanczos_vectors}")
        require(self.curvature_epsilon > 0, f"plasticity.curvature_epsilon must be > 0, got {self.curvature_epsilon}")
        names = list(check_names(self.interventions))
        if self.er and "er_step" not in names:
            names.insert(0, "er_step")
        if self.cbp and "cbp" not in names:
            names.insert(1 if self.er else 0, "cbp")
        self.interventions = tuple(names)
        self.er = "er_step" in names
        self.cbp = "cbp" in names
        for name in CONFIG_TYPES:
            setattr(self, name, intervention_config(name, getattr(self, name)))

    @classmethod
    def from_node(cls, node: Mapping[str, Any]) -> "PlasticityConfig":
        return from_node(cls, node, "plasticity")

    @property
    def curvature_enabled(self) -> bool:
        return self.curvature_every is not None or self.curvature_task_start

    def coef_for(self, network: str) -> float:
        override = getattr(self, f"coef_{network}", None)
        return self.coef if override is None else override


class PlasticityMixin:
    """See the module docstring."""

    plasticity_cfg: PlasticityConfig

    def init_plasticity(self, cfg: PlasticityConfig, reset_interval: Optional[int] = None) -> None:
        if reset_interval is not None and reset_interval < 1:
            raise ConfigError(f"agent.reset_interval must be >= 1 (updates) or null, got {reset_interval}")
        if reset_interval is not None and "reset" in cfg.interventions:
            raise ConfigError("agent.reset_interval and plasticity.interventions=[reset] both ask for full resets: "
                              "use one (plasticity.reset.every sets the period of the second)")
        self.plasticity_cfg = cfg
        self.plasticity_updates = 0
        self.reset_count = 0
        self.plasticity_structure_changes = 0  # seed groups restack their networks when this moves
        self._plasticity_networks: dict[str, nn.Module] = {}
        self.interventions: list[Intervention] = [
            INTERVENTIONS[name](self, getattr(cfg, name, None)) for name in cfg.interventions]
        self.reset_interval = reset_interval
        self._recorded_features: dict[str, list[torch.Tensor]] = {}
        self._registrations = 0

    @property
    def reset_interval(self) -> Optional[int]:
        """The agent's full-reset period (agent.reset_interval; None: none): a `reset` intervention
        run last, after those of plasticity.interventions."""
        return self._reset_interval

    @reset_interval.setter
    def reset_interval(self, value: Optional[int]) -> None:
        self._reset_interval = value
        self.interventions = [iv for iv in self.interventions if not getattr(iv, "from_agent", False)]
        if value is not None:
            reset = INTERVENTIONS["reset"](self, ResetConfig(every=value))
            reset.from_agent = True
            self.interventions.append(reset)

    # -- registration -------------------------------------------------------------------------
    def register_networks(self, networks: Mapping[str, nn.Module]) -> None:
        """(Re)build regularizer state, initial-parameter copies and ER optimizers for `networks`."""
        cfg = self.plasticity_cfg
        self._plasticity_networks = dict(networks)
        # Parameters no optimizer steps (the heads plasticity injection froze): autograd gives them no
        # gradient, so neither may a regularizer's closed-form gradient (_add_direct_gradients).
        self._frozen_params = {name: [p for p in net.parameters() if not p.requires_grad]
                               for name, net in networks.items()}
        self._registrations = getattr(self, "_registrations", 0) + 1  # features recorded before are stale
        self._regularizers: dict[str, Regularizer] = {
            name: REGULARIZERS[cfg.name].build(net, cfg) for name, net in networks.items()}
        self._initial_params = {name: [p.detach().clone() for p in net.parameters()] for name, net in networks.items()}
        self._layers = {name: weights_and_vectors(net) for name, net in networks.items()}
        self.plasticity_element_steps = AdamElementSteps(self.plasticity_optimizers)
        for intervention in self.interventions:
            intervention.attach(self._plasticity_networks)
        self._last_penalty: dict[str, torch.Tensor] = {}
        self._direct_penalty: set[str] = set()  # networks whose regularizer adds its gradient itself
        self._penalty_taken: set[str] = set()  # networks whose penalty this update already has (loss or gradient)

    # -- the loss term ------------------------------------------------------------------------
    def plasticity_loss(self, name: str, defer_direct: bool = False) -> Optional[torch.Tensor]:
        """coef · penalty of network `name` (None when there is no term, so nothing is added).

        Either way of applying the penalty is complete on its own: the loss path (this, or
        `add_plasticity_losses`) or the gradient path (`plasticity_before_step`), and using both
        applies it once.  A regularizer with a closed-form gradient (spectral, wasserstein,
        parseval) returns its term through autograd here, and `plasticity_before_step` then
        leaves that network alone until the next update; with `defer_direct` (the agents, which
        always call `plasticity_before_step`) it returns None and the cheaper closed form is
        added there instead.  Same gradient either way.
        """
        coef = self.plasticity_cfg.coef_for(name)
        reg = self._regularizers[name]
        if coef == 0.0 or (reg.direct_gradient and defer_direct):
            return None
        penalty = reg.penalty()
        if penalty is None:
            return None
        loss = coef * penalty
        self._last_penalty[name] = loss.detach()
        if reg.direct_gradient:
            self._penalty_taken.add(name)
            self._direct_penalty.discard(name)
        return loss

    def _plasticity_penalty(self, names: tuple[str, ...], defer_direct: bool = False) -> Optional[torch.Tensor]:
        """The sum of coef · penalty over the networks in `names` that have a loss term (None if none)."""
        total = None
        for name in names:
            penalty = self.plasticity_loss(name, defer_direct)
            if penalty is not None:
                total = penalty if total is None else total + penalty
        return total

    def add_plasticity_losses(self, loss: torch.Tensor, names: tuple[str, ...],
                              defer_direct: bool = False) -> torch.Tensor:
        """`loss` plus coef · penalty of each network in `names` that has a loss term (see
        `plasticity_loss` for `defer_direct`)."""
        penalty = self._plasticity_penalty(names, defer_direct)
        return loss if penalty is None else loss + penalty

    def add_plasticity_gradients(self, names: tuple[str, ...]) -> None:
        """For updates that write their gradients outside this agent's autograd graph (the fused SAC
        path, the batched seed groups): add the gradient of coef · penalty of each network in
        `names` to its parameters' `.grad` (closed-form gradients included, so that
        `plasticity_before_step` adds nothing more for them)."""
        penalty = self._plasticity_penalty(names, defer_direct=True)
        if penalty is not None:
            penalty.backward()
        self._add_direct_gradients(names, skip_taken=False)

    def _add_direct_gradients(self, names: tuple[str, ...], skip_taken: bool) -> None:
        """Add the closed-form penalty gradient of each network in `names` (with `skip_taken`, of
        those whose penalty this update does not hold yet)."""
        for name in names:
            reg = self._regularizers[name]
            coef = self.plasticity_cfg.coef_for(name)
            if reg.direct_gradient and coef != 0.0 and not (skip_taken and name in self._penalty_taken):
                reg.add_penalty_gradient(coef)
                for p in self._frozen_params[name]:
                    p.grad = None
                self._direct_penalty.add(name)
                self._last_penalty.pop(name, None)
                self._penalty_taken.add(name)

    def plasticity_before_step(self) -> None:
        """Between backward and the optimizer step: regularizers that add their gradient directly
        (spectral) do it here, unless this update's loss already holds their term (see
        `plasticity_loss`).  The result equals adding `coef · penalty` to the loss.  Also keeps the
        values the per-element Adam step correction starts from (surgery.AdamElementSteps)."""
        self.plasticity_element_steps.before_step()
        self._add_direct_gradients(tuple(self._regularizers), skip_taken=True)
        self._penalty_taken.clear()

    # -- after each update --------------------------------------------------------------------
    def plasticity_wants_features(self) -> bool:
        """Whether a due intervention of the coming update (continual backprop) takes the hidden
        features of its training forward: the agents record them only then."""
        update = self.plasticity_updates + 1
        return any(iv.needs_features and iv.due(update) for iv in self.interventions)

    @contextlib.contextmanager
    def plasticity_record(self, name: str, copy: bool = True) -> Iterator[None]:
        """Around this update's training forward of network `name` (before the optimizer step):
        records its hidden features (FeatureRecorder; `copy=False` for networks that overwrite no
        activation output in place later in their forward) when `plasticity_wants_features()`,
        for the next `plasticity_after_update`; otherwise does nothing.  The last forward of the
        network inside the block is the one kept."""
        if not self.plasticity_wants_features():
            yield
            return
        with FeatureRecorder(self._plasticity_networks[name], copy=copy) as rec:
            yield
        n = len(rec.modules)
        if len(rec.features) >= n:
            self._recorded_features[name] = rec.features[len(rec.features) - n:]

    def plasticity_after_update(self, batch: Any, features: Optional[Mapping[str, list[torch.Tensor]]] = None
                                ) -> dict[str, dict[str, float]]:
        """Count the update, finish the per-element Adam steps of re-initialised entries, and run
        every due intervention in order; returns what each did, by name.

        `features`: {network: [hidden features (members, batch, width) per layer]} of this
        update's training forward, before the step (default: those `plasticity_record` took since
        the last update), for the interventions that take them (`needs_features`).  Inputs are
        built once, when an intervention needs them (or needs features not given for a network).
        Features stop being passed once an intervention re-registered the networks (a reset)."""
        self.plasticity_element_steps.after_step()
        self.plasticity_updates += 1
        update = self.plasticity_updates
        if features is None:
            features = self._recorded_features or None
        self._recorded_features = {}
        due = [iv for iv in self.interventions if iv.due(update)]
        if not due:
            return {}
        registrations = self._registrations
        inputs = None
        out: dict[str, dict[str, float]] = {}
        for iv in due:
            feats = features if self._registrations == registrations else None
            missing = feats is None or any(feats.get(n) is None for n in self._plasticity_networks)
            if inputs is None and (iv.needs_inputs or (iv.needs_features and missing)):
                inputs = self.plasticity_inputs(batch)
            out[iv.name] = (iv.after_update(update, inputs, features=feats) if iv.needs_features
                            else iv.after_update(update, inputs))
        return out

    def plasticity_draws_random(self) -> bool:
        """Whether the next update's interventions may draw from the global generators (seed
        groups run them under the seed's own generators then)."""
        return any(iv.draws_random(self.plasticity_updates + 1) for iv in self.interventions)

    def plasticity_task_change(self) -> None:
        """The environment's task changed (loops call this): interventions that act at a task change
        (shrink-and-perturb) do so after the next update."""
        for iv in self.interventions:
            iv.on_task_change()

    def intervention(self, name: str) -> Optional[Intervention]:
        """The active intervention called `name`, or None."""
        return next((iv for iv in self.interventions if iv.name == name), None)

    def effective_rank_step(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The ER step now (see interventions.EffectiveRankStep.step)."""
        return self.intervention("er_step").step(inputs)

    @property
    def _er_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        er = self.intervention("er_step")
        return er.optimizers if er is not None else {}

    @property
    def _cbp(self) -> dict[str, Any]:
        """Continual backprop's per-network state (ContinualBackprop), {} without it."""
        cbp = self.intervention("cbp")
        return cbp.units if cbp is not None else {}

    # -- diagnostics --------------------------------------------------------------------------
    @torch.no_grad()
    def plasticity_diagnostics(self, probe: Any) -> dict[str, torch.Tensor]:
        """`plasticity/<network>/<metric>` on a fixed probe batch, plus `losses/plasticity`.

        Exact spectral norms (torch.linalg.matrix_norm, ord=2) over every weight matrix (ensemble
        members count as layers), parameter and last-gradient norms, distance from the initial
        parameters, and on the probe's hidden features: effective rank of the last hidden layer,
        dormant fraction (ReDo score ≤ 0.025), dead units (never active on the probe; count and
        fraction) over all hidden units, and with continual backprop the units replaced so far.

        Per weight matrix i (`layer<i>/`): stable rank ‖W‖²_F/‖W‖²₂ (mean over ensemble members),
        largest and smallest singular values (spectral-regularization.md App. C.6).  Per hidden
        layer i (`layer<i>/`): srank₉₉ and entropy effective rank of the features, fraction of
        active (> 0) unit activations, mean feature norm ‖h‖₂.  `update_norm`: ‖Δθ‖ of the last
        optimizer step (directions-of-curvature.md Fig. 1/5).
        """
        out: dict[str, torch.Tensor] = {}
        inputs = self.plasticity_inputs(probe)
        for name, net in self._plasticity_networks.items():
            prefix = f"plasticity/{name}/"
            weights, _ = self._layers[name]
            sigmas = torch.cat([torch.linalg.matrix_norm(w.matrices().detach(), ord=2) for w in weights])
            out[prefix + "spectral_norm_max"] = sigmas.max()
            out[prefix + "spectral_norm_mean"] = sigmas.mean()
            params = list(net.parameters())
            out[prefix + "param_norm"] = torch.stack([p.square().sum() for p in params]).sum().sqrt()
            grads = [p.grad.square().sum() for p in params if p.grad is not None]
            if grads:
                out[prefix + "grad_norm"] = torch.stack(grads).sum().sqrt()
            out[prefix + "distance_from_init"] = torch.stack(
                [(p - p0).square().sum() for p, p0 in zip(params, self._initial_params[name])]).sum().sqrt()
            for i, w in enumerate(weights):  # spectral-regularization.md App. C.6
                s = torch.linalg.svdvals(w.matrices().detach().float())  # (members, k)
                out[prefix + f"layer{i}/stable_rank"] = (s.square().sum(-1) / s[:, 0].square().clamp_min(1e-30)).mean()
                out[prefix + f"layer{i}/sigma_max"] = s[:, 0].max()
                out[prefix + f"layer{i}/sigma_min"] = s[:, -1].min()
            update = _last_update_norm(params, self.plasticity_optimizers())
            if update is not None:
                out[prefix + "update_norm"] = update
            with FeatureRecorder(net) as rec:
                net(inputs[name])
            for i, f in enumerate(rec.features):  # (members, batch, width)
                s = torch.linalg.svdvals(f.float())
                out[prefix + f"layer{i}/feature_srank"] = _srank(s).mean()
                out[prefix + f"layer{i}/feature_effective_rank"] = effective_rank(f).mean()
                out[prefix + f"layer{i}/active_fraction"] = (f > 0).float().mean()
                out[prefix + f"layer{i}/feature_norm"] = f.norm(dim=-1).mean()
            if rec.features:
                out[prefix + "feature_effective_rank"] = effective_rank(rec.features[-1]).mean()
                dormant, dead, total = 0, 0, 0
                for f in rec.features:  # (members, batch, width)
                    activity = f.abs().mean(1)
                    score = activity / activity.mean(-1, keepdim=True).clamp_min(1e-12)
                    dormant += int((score <= DORMANT_THRESHOLD).sum())
                    dead += int(((f > 0).sum(1) == 0).sum())
                    total += activity.numel()
                out[prefix + "dormant_fraction"] = torch.tensor(dormant / total)
                out[prefix + "dead_fraction"] = torch.tensor(dead / total)
                out[prefix + "dead_units"] = torch.tensor(float(dead))
        for iv in self.interventions:
            for name, values in iv.diagnostics().items():
                out.update({f"plasticity/{name}/{k}": torch.tensor(float(v)) for k, v in values.items()})
        penalties = list(self._last_penalty.values()) + [self._regularizers[n].last_value() for n in self._direct_penalty]
        if penalties:
            out["losses/plasticity"] = torch.stack(penalties).sum()
        return out

    def plasticity_curvature(self, probe: Any, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """`curvature/<network>/<metric>` of each registered network's unregularized loss on
        `probe` (plasticity/curvature.py), and each network's SLQ spectrum (for the density).

        The randomness (SLQ probe vectors, the losses' sampled actions) comes from a generator
        seeded with `seed`, never from a training generator."""
        from rl_plasticity.plasticity.curvature import CurvatureSettings, curvature_diagnostics

        cfg = self.plasticity_cfg
        settings = CurvatureSettings(cfg.curvature_samples, cfg.curvature_lanczos_steps,
                                     cfg.curvature_lanczos_vectors, cfg.curvature_epsilon)
        out: dict[str, torch.Tensor] = {}
        spectra: dict[str, Any] = {}
        for name, (module, loss, data) in self.curvature_losses(probe, seed).items():
            g = torch.Generator().manual_seed(int(seed))
            values, spectra[name] = curvature_diagnostics(module, loss, data, settings, g)
            out.update({f"curvature/{name}/{k}": torch.tensor(v) for k, v in values.items()})
        return out, spectra

    # -- checkpointing ------------------------------------------------------------------------
    def plasticity_state_dict(self) -> dict[str, Any]:
        return {
            "updates": self.plasticity_updates,
            "reset_count": self.reset_count,
            "regularizers": {n: r.state_dict() for n, r in self._regularizers.items()},
            "initial_params": {n: [t.clone() for t in ts] for n, ts in self._initial_params.items()},
            "interventions": {iv.name: iv.state_dict() for iv in self.interventions},
            "adam_element_steps": self.plasticity_element_steps.state_dict(),
        }

    def load_plasticity_state_dict(self, state: Mapping[str, Any]) -> None:
        self.plasticity_updates = int(state["updates"])
        self.reset_count = int(state["reset_count"])
        for n, s in state["regularizers"].items():
            self._regularizers[n].load_state_dict(s)
        for n, ts in state["initial_params"].items():
            for dst, src in zip(self._initial_params[n], ts):
                dst.copy_(src)
        saved = dict(state.get("interventions", {}))
        # Checkpoints from before interventions.py kept the ER optimizers and CBP at the top level.
        if state.get("er_optimizers"):
            saved["er_step"] = state["er_optimizers"]
        if state.get("cbp"):
            saved["cbp"] = state["cbp"]
        for iv in self.interventions:
            if iv.name in saved:
                iv.load_state_dict(saved[iv.name])
        self.plasticity_element_steps.load_state_dict(state.get("adam_element_steps", {}))

    # -- hooks the agent implements -----------------------------------------------------------
    def plasticity_inputs(self, batch: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def plasticity_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers holding per-parameter state of the registered networks."""
        return []

    def plasticity_targets(self) -> dict[str, nn.Module]:
        """{network: its target copy (same structure)}: what partial resets and injection also change."""
        return {}

    def plasticity_structure_changed(self) -> None:
        """An intervention (plasticity injection) changed the networks' modules: the agent refreshes
        what it derived from them (parameter lists), then the networks are registered again."""
        self.plasticity_structure_changes += 1
        self.register_networks(self._plasticity_networks)

    def plasticity_prepare_load(self, state: Mapping[str, Any]) -> None:
        """Before a checkpoint's networks load: interventions that change structure (injection)
        rebuild it as saved."""
        saved = state.get("interventions", {})
        for iv in self.interventions:
            if hasattr(iv, "prepare_load") and iv.name in saved:
                iv.prepare_load(saved[iv.name])

    def curvature_losses(self, probe: Any, seed: int) -> dict[str, tuple[nn.Module, Any, dict[str, torch.Tensor]]]:
        """{network: (module, loss(forward, data) -> per-sample losses, data)}: each registered
        network's unregularized loss on `probe` as plasticity/curvature.py takes it (targets and
        everything not differentiated precomputed into `data`); randomness seeded with `seed`."""
        raise NotImplementedError

    def reset_networks(self) -> None:
        raise NotImplementedError
