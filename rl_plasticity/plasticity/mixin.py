"""PlasticityMixin: regularizers, interventions and diagnostics for any agent's networks.

The mixin knows networks, not algorithms.  An agent

1. calls `init_plasticity(cfg, reset_interval)` and `register_networks({"actor": ..., ...})` with
   modules whose forward takes one input tensor (so features can be recorded on any input);
2. adds `plasticity_loss(name)` to each network's loss (None when the regularizer has no term),
   and/or calls `plasticity_before_step()` between backward and the optimizer step: either one
   applies every regularizer's penalty, both apply it once (regularizers whose gradient is
   cheaper to add directly, like spectral, add it there unless the loss holds it; the agents
   pass `defer_direct=True` to leave it there; same gradient);
3. calls `plasticity_after_update(batch)` after each optimizer step (effective-rank steps,
   continual-backprop unit replacement and periodic resets happen there);
4. implements `plasticity_inputs(batch) -> {name: input tensor}`, `plasticity_optimizers()` (whose
   moment estimates continual backprop clears for the units it re-initialises) and, for resets,
   `reset_networks()` (fresh networks, targets, temperature and optimizer state, then
   `register_networks` again).

Regularizer state, initial parameters and counters are saved with `plasticity_state_dict()`.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping, Optional

import torch
from torch import nn

from rl_plasticity.config import ConfigError, from_node, require
from rl_plasticity.optim import adam_step_many
from rl_plasticity.plasticity.cbp import ContinualBackprop
from rl_plasticity.plasticity.effective_rank import effective_rank, layer_effective_ranks
from rl_plasticity.plasticity.layers import FeatureRecorder, weights_and_vectors
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

    @classmethod
    def from_node(cls, node: Mapping[str, Any]) -> "PlasticityConfig":
        return from_node(cls, node, "plasticity")

    @property
    def curvature_enabled(self) -> bool:
        return self.curvature_every is not None or self.curvature_task_start

    def coef_for(self, network: str) -> float:
        override = getattr(self, f"coef_{network}", None)
        return self.coef if override is None else override


def _fused_ok(net: nn.Module) -> Optional[bool]:
    """Adam's fused kernel where torch has one (CPU and CUDA), else torch's default."""
    devices = {p.device.type for p in net.parameters()}
    return True if devices and devices <= {"cpu", "cuda"} else None


class PlasticityMixin:
    """See the module docstring."""

    plasticity_cfg: PlasticityConfig
    reset_interval: Optional[int]

    def init_plasticity(self, cfg: PlasticityConfig, reset_interval: Optional[int] = None) -> None:
        if reset_interval is not None and reset_interval < 1:
            raise ConfigError(f"agent.reset_interval must be >= 1 (updates) or null, got {reset_interval}")
        self.plasticity_cfg = cfg
        self.reset_interval = reset_interval
        self.plasticity_updates = 0
        self.reset_count = 0
        self._plasticity_networks: dict[str, nn.Module] = {}

    # -- registration -------------------------------------------------------------------------
    def register_networks(self, networks: Mapping[str, nn.Module]) -> None:
        """(Re)build regularizer state, initial-parameter copies and ER optimizers for `networks`."""
        cfg = self.plasticity_cfg
        self._plasticity_networks = dict(networks)
        self._regularizers: dict[str, Regularizer] = {
            name: REGULARIZERS[cfg.name].build(net, cfg) for name, net in networks.items()}
        self._initial_params = {name: [p.detach().clone() for p in net.parameters()] for name, net in networks.items()}
        self._layers = {name: weights_and_vectors(net) for name, net in networks.items()}
        self._er_optimizers = {name: torch.optim.Adam(net.parameters(), lr=cfg.er_lr, fused=_fused_ok(net))
                               for name, net in networks.items()} if cfg.er else {}
        self._cbp = {name: ContinualBackprop(net, cfg.cbp_replacement_rate, cfg.cbp_maturity, cfg.cbp_decay)
                     for name, net in networks.items()} if cfg.cbp else {}
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
                self._direct_penalty.add(name)
                self._last_penalty.pop(name, None)
                self._penalty_taken.add(name)

    def plasticity_before_step(self) -> None:
        """Between backward and the optimizer step: regularizers that add their gradient directly
        (spectral) do it here, unless this update's loss already holds their term (see
        `plasticity_loss`).  The result equals adding `coef · penalty` to the loss."""
        self._add_direct_gradients(tuple(self._regularizers), skip_taken=True)
        self._penalty_taken.clear()

    # -- after each update --------------------------------------------------------------------
    def plasticity_after_update(self, batch: Any) -> None:
        """Count the update; run the effective-rank step, continual backprop and a reset when due."""
        self.plasticity_updates += 1
        cfg = self.plasticity_cfg
        er_due = cfg.er and self.plasticity_updates % cfg.er_step == 0
        inputs = self.plasticity_inputs(batch) if er_due or self._cbp else None
        if er_due:
            self.effective_rank_step(inputs)
        if self._cbp:
            self.continual_backprop_step(inputs)
        if self.reset_interval is not None and self.plasticity_updates % self.reset_interval == 0:
            self.reset_networks()
            self.reset_count += 1

    def effective_rank_step(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One step of the networks' own optimizers on −mean over hidden layers of ER(features)
        of a block of `er_batch` inputs per network (Algorithm 1 of spectral-collapse-l2-er.md,
        App. D.2); returns each network's mean effective rank before the step.

        Same objective and gradient as autograd through `effective_rank` (torch.linalg.svdvals),
        network by network; computed faster: every layer of every network in one batched
        float64 Gram eigendecomposition (`layer_effective_ranks`, see plasticity/effective_rank.py
        for its accuracy), one backward over all networks (their parameters are disjoint, so
        each gets its own objective's gradient), and one fused Adam call over every network's
        ER optimizer (each keeps its own moments).  The task gradients in `.grad` are kept.
        """
        nets = self._plasticity_networks
        features: dict[str, list[torch.Tensor]] = {}
        for name, net in nets.items():
            x = inputs[name][: self.plasticity_cfg.er_batch].detach()
            with FeatureRecorder(net, detach=False) as rec:
                net(x)
            features[name] = rec.features
        layer_ranks = iter(layer_effective_ranks([f for fs in features.values() for f in fs]))
        ranks = {name: torch.stack([next(layer_ranks).mean() for _ in fs]).mean() for name, fs in features.items()}
        params = [p for net in nets.values() for p in net.parameters()]
        grads = torch.autograd.grad(-torch.stack(list(ranks.values())).sum(), params, allow_unused=True)
        task_grads = [p.grad for p in params]  # keep the task update's gradients for diagnostics
        for p, g in zip(params, grads):
            p.grad = g
        adam_step_many(list(self._er_optimizers.values()))
        for p, g in zip(params, task_grads):
            p.grad = g
        return {name: rank.detach() for name, rank in ranks.items()}

    @torch.no_grad()
    def continual_backprop_step(self, inputs: Mapping[str, torch.Tensor]) -> int:
        """Utilities from the hidden features of `inputs` (the update's batch), then replacement of
        the due units of every network (see plasticity/cbp.py); returns the number replaced."""
        replaced = 0
        optimizers = self.plasticity_optimizers()
        for name, net in self._plasticity_networks.items():
            with FeatureRecorder(net) as rec:
                net(inputs[name])
            replaced += self._cbp[name].step(rec.features, optimizers)
        return replaced

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
            if name in self._cbp:
                out[prefix + "cbp_replaced"] = torch.tensor(float(self._cbp[name].replaced_total))
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
            "er_optimizers": {n: o.state_dict() for n, o in self._er_optimizers.items()},
            "cbp": {n: c.state_dict() for n, c in self._cbp.items()},
        }

    def load_plasticity_state_dict(self, state: Mapping[str, Any]) -> None:
        self.plasticity_updates = int(state["updates"])
        self.reset_count = int(state["reset_count"])
        for n, s in state["regularizers"].items():
            self._regularizers[n].load_state_dict(s)
        for n, ts in state["initial_params"].items():
            for dst, src in zip(self._initial_params[n], ts):
                dst.copy_(src)
        for n, s in state["er_optimizers"].items():
            opt = self._er_optimizers[n]
            s = copy.deepcopy(s)
            for group, saved in zip(opt.param_groups, s["param_groups"]):
                # Checkpoints from before the ER optimizers were fused: same state, fused kernel.
                saved["fused"], saved["foreach"] = group["fused"], group["foreach"]
            opt.load_state_dict(s)
        for n, s in state.get("cbp", {}).items():
            self._cbp[n].load_state_dict(s)

    # -- hooks the agent implements -----------------------------------------------------------
    def plasticity_inputs(self, batch: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def plasticity_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers holding per-parameter state of the registered networks."""
        return []

    def curvature_losses(self, probe: Any, seed: int) -> dict[str, tuple[nn.Module, Any, dict[str, torch.Tensor]]]:
        """{network: (module, loss(forward, data) -> per-sample losses, data)}: each registered
        network's unregularized loss on `probe` as plasticity/curvature.py takes it (targets and
        everything not differentiated precomputed into `data`); randomness seeded with `seed`."""
        raise NotImplementedError

    def reset_networks(self) -> None:
        raise NotImplementedError
