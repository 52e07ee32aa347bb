"""Proximal policy optimisation (Schulman et al. 2017) with the PlasticityMixin.

The setting of spectral-collapse-l2-er.md App. J (Slippery Ant): a Gaussian policy with a
state-independent log standard deviation and a separate value network (ReLU MLPs, orthogonal
initialisation: gain √2 in hidden layers, 0.01 for the policy head, 1 for the value head), GAE,
the clipped surrogate with advantages normalised per minibatch, an entropy bonus, one Adam over
both networks.  Defaults are Table 8's (rollout 2048, 10 epochs, 128 minibatches, γ 0.99, λ 0.95,
clip 0.2, value coefficient 1, entropy coefficient 0.01, lr 2.5e-4, no gradient clipping: its
1e9 threshold never binds); the presets in configs/experiment/ carry Table 7's swept values.

Observations are normalised by running statistics updated while acting (as with
Stable-Baselines3's VecNormalize) and stored normalised, so the update sees what the policy saw.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from rl_plasticity.agents.formulas import (HALF_LOG_2PI, clipped_surrogate, gaussian_log_prob, gaussian_sample,
                                           normalize_advantages)
from rl_plasticity.agents.formulas import value_loss as ppo_value_loss
from rl_plasticity.agents.networks import (ACTIVATIONS, chain_layers, check_activation, orthogonal_init_,
                                           parameter_count)
from rl_plasticity.config import from_node, require
from rl_plasticity.optim import adam_step_many
from rl_plasticity.plasticity.mixin import PlasticityConfig, PlasticityMixin


@dataclasses.dataclass
class PPOConfig:
    name: str = "ppo"
    num_envs: int = 1                 # environments stepped together (gymnasium vector API)
    rollout_steps: int = 2048         # steps per environment between updates
    epochs: int = 10
    num_minibatches: int = 128
    hidden_sizes: tuple[int, ...] = (256, 256)
    layer_norm: bool = False
    activation: str = "relu"          # relu | crelu ([relu(x), relu(-x)]: the next layer takes twice the width)
    lr: float = 2.5e-4
    adam_eps: float = 1e-5
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    vf_coef: float = 1.0
    ent_coef: float = 0.01
    max_grad_norm: Optional[float] = None  # null: no clipping (Table 8's 1e9 never binds)
    normalize_obs: bool = True
    init_log_std: float = 0.0
    reset_interval: Optional[int] = None  # full reset every N gradient updates (null: never)

    @classmethod
    def from_node(cls, node: Mapping[str, Any]) -> "PPOConfig":
        cfg = from_node(cls, node, "agent")
        for key in ("num_envs", "rollout_steps", "epochs", "num_minibatches"):
            require(getattr(cfg, key) >= 1, f"agent.{key} must be >= 1, got {getattr(cfg, key)}")
        require(cfg.num_minibatches <= cfg.rollout_steps * cfg.num_envs,
                f"agent.num_minibatches ({cfg.num_minibatches}) must not exceed the rollout size "
                f"agent.rollout_steps × agent.num_envs ({cfg.rollout_steps * cfg.num_envs})")
        require(len(cfg.hidden_sizes) >= 1 and min(cfg.hidden_sizes) >= 1,
                f"agent.hidden_sizes must be a non-empty list of positive widths, got {list(cfg.hidden_sizes)}")
        require(cfg.activation in ACTIVATIONS,
                f"agent.activation must be one of {', '.join(ACTIVATIONS)}, got {cfg.activation!r}")
        require(cfg.lr > 0, f"agent.lr must be > 0, got {cfg.lr}")
        require(cfg.adam_eps > 0, f"agent.adam_eps must be > 0, got {cfg.adam_eps}")
        require(0.0 <= cfg.gamma <= 1.0, f"agent.gamma must be in [0, 1], got {cfg.gamma}")
        require(0.0 <= cfg.gae_lambda <= 1.0, f"agent.gae_lambda must be in [0, 1], got {cfg.gae_lambda}")
        require(cfg.clip > 0, f"agent.clip must be > 0, got {cfg.clip}")
        require(cfg.vf_coef >= 0, f"agent.vf_coef must be >= 0, got {cfg.vf_coef}")
        require(cfg.ent_coef >= 0, f"agent.ent_coef must be >= 0, got {cfg.ent_coef}")
        require(cfg.max_grad_norm is None or cfg.max_grad_norm > 0,
                f"agent.max_grad_norm must be > 0 or null, got {cfg.max_grad_norm}")
        require(cfg.reset_interval is None or cfg.reset_interval >= 1,
                f"agent.reset_interval must be >= 1 (gradient updates) or null, got {cfg.reset_interval}")
        return cfg


def policy_mlp(in_dim: int, hidden_sizes: tuple[int, ...], out_dim: int, layer_norm: bool, head_gain: float,
               activation: str = "relu") -> nn.Sequential:
    """`networks.chain_layers` with orthogonal initialisation: gain √2 in hidden layers, `head_gain`
    for the head."""
    return nn.Sequential(*chain_layers(
        in_dim, hidden_sizes, out_dim, layer_norm, activation,
        lambda i, o, head: orthogonal_init_(nn.Linear(i, o), head_gain if head else math.sqrt(2.0)),
        nn.LayerNorm, inplace=False))


class RunningMeanStd:
    """Running mean and variance of observations (parallel Welford update, float64)."""

    def __init__(self, dim: int):
        self.mean = np.zeros(dim, dtype=np.float64)
        self.var = np.ones(dim, dtype=np.float64)
        self.count = 1e-4

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.mean.shape[0])
        batch_mean, batch_var, n = x.mean(0), x.var(0), x.shape[0]
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean = self.mean + delta * n / total
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.var = m2 / total
        self.count = total

    def normalize(self, x: np.ndarray, clip: float = 10.0) -> np.ndarray:
        return np.clip((x - self.mean) / np.sqrt(self.var + 1e-8), -clip, clip).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": torch.from_numpy(self.mean.copy()), "var": torch.from_numpy(self.var.copy()),
                "count": float(self.count)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mean = state["mean"].double().numpy().copy()
        self.var = state["var"].double().numpy().copy()
        self.count = float(state["count"])


STAT_NAMES = ("losses/policy", "losses/value", "losses/entropy", "losses/approx_kl", "losses/clip_fraction")


def ppo_loss(mean: torch.Tensor, value: torch.Tensor, log_std: torch.Tensor, mb: Mapping[str, torch.Tensor],
             cfg: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped-surrogate loss of a minibatch, and its stats (`STAT_NAMES`, detached).

    Rows are the last dimension (mean (..., rows, |A|), value and `mb` entries (..., rows),
    `log_std` (..., |A|)), so a leading seed dimension gives each seed's loss and stats.
    """
    ls = log_std.unsqueeze(-2)
    z = (mb["action"] - mean) * torch.exp(-ls)
    log_prob = gaussian_log_prob(z, ls)
    log_ratio = log_prob - mb["log_prob"]
    ratio = log_ratio.exp()
    adv = mb["advantage"]
    if adv.shape[-1] > 1:
        adv = normalize_advantages(adv)
    policy_loss = clipped_surrogate(adv, ratio, cfg.clip).mean(-1)
    value_loss = ppo_value_loss(value, mb["return"]).mean(-1)
    entropy = (log_std + 0.5 + HALF_LOG_2PI).sum(-1)
    loss = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
    with torch.no_grad():
        approx_kl = ((ratio - 1.0) - log_ratio).mean(-1)
        clip_fraction = ((ratio - 1.0).abs() > cfg.clip).float().mean(-1)
        stats = torch.stack([policy_loss.detach(), value_loss.detach(), entropy.detach(), approx_kl, clip_fraction], -1)
    return loss, stats


def ppo_epochs(cfg: PPOConfig, plasticity: PlasticityConfig, rows: int, generators: Sequence[torch.Generator],
               device: torch.device, minibatch: Callable[[torch.Tensor], tuple[torch.Tensor, Any]],
               after_update: Callable[[int, Any, Optional[torch.Tensor]], None]) -> torch.Tensor:
    """PPO's optimisation phase (Schulman et al. 2017, Alg. 1: K epochs of minibatch updates on
    the rollout), for one agent or a seed group (one generator per seed).

    Each epoch draws a permutation of the `rows` rollout rows from each seed's generator and
    steps on consecutive minibatches of rows // num_minibatches of them (the remainder sits that
    epoch out): `minibatch(index)` with index (seeds, size) returns (stats, minibatch); then
    `after_update(i, minibatch, block)` for each seed i.  The ER step needs er_batch inputs
    (spectral-collapse-l2-er.md Table 8: a minibatch may hold only 16 rows), so with ER and
    smaller minibatches `block` is the er_batch rows of seed i's permutation from the
    minibatch's start on, wrapping around; otherwise None (the minibatch's own rows).
    Returns the last epoch's stats averaged over its minibatches.
    """
    size = max(1, rows // cfg.num_minibatches)
    block = max(size, plasticity.er_batch) if plasticity.er else size
    history: list[torch.Tensor] = []
    for _ in range(cfg.epochs):
        perm = torch.stack([torch.randperm(rows, generator=g) for g in generators]).to(device)
        history = []
        for start in range(0, size * (rows // size), size):
            stats, mb = minibatch(perm[:, start:start + size])
            history.append(stats)
            for i in range(len(generators)):
                after_update(i, mb, None if block == size else perm[i].roll(-start)[:block])
    return torch.stack(history).mean(0)


def ppo_optimizer_step(agents: Sequence["PPOAgent"], plasticity_gradients: bool) -> None:
    """A minibatch step once its loss's gradients are in `.grad`, for one agent or a seed group:
    per agent the plasticity gradients when `plasticity_gradients` (a loss without the
    plasticity losses), the regularizers' work before the step and gradient clipping
    (`max_grad_norm`); one Adam step over every agent's optimizer (bitwise `optimizer.step()`
    per agent); the update counts."""
    max_grad_norm = agents[0].cfg.max_grad_norm
    for agent in agents:
        if plasticity_gradients:
            agent.add_plasticity_gradients(("actor", "critic"))
        agent.plasticity_before_step()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(agent.params, max_grad_norm)
    adam_step_many([agent.optimizer for agent in agents])
    for agent in agents:
        agent.update_count += 1


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
    """1 − Var(returns − values) / Var(returns), over the last dimension."""
    return 1.0 - (returns - values).var(-1) / returns.var(-1).clamp_min(1e-8)


class PPOAgent(PlasticityMixin):
    """Gaussian-policy PPO; networks registered with the PlasticityMixin as `actor` and `critic`."""

    def __init__(self, obs_dim: int, action_dim: int, cfg: PPOConfig, device: torch.device | str = "cpu",
                 plasticity: Optional[PlasticityConfig] = None, seed: int = 0):
        self.obs_dim, self.action_dim, self.cfg = obs_dim, action_dim, cfg
        self.device = torch.device(device)
        self.update_count = 0
        self.obs_rms = RunningMeanStd(obs_dim) if cfg.normalize_obs else None
        # The minibatch order has its own generator, so it is reproducible and checkpointable.
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))
        plasticity = plasticity or PlasticityConfig()
        check_activation(cfg.activation, plasticity)
        self.init_plasticity(plasticity, cfg.reset_interval)
        self._build()

    # -- construction -------------------------------------------------------------------------
    def _build(self) -> None:
        """Fresh networks, log-std and optimizer state (also what a full reset does)."""
        cfg, dev = self.cfg, self.device
        self.actor = policy_mlp(self.obs_dim, cfg.hidden_sizes, self.action_dim, cfg.layer_norm, 0.01,
                                cfg.activation).to(dev)
        self.critic = policy_mlp(self.obs_dim, cfg.hidden_sizes, 1, cfg.layer_norm, 1.0, cfg.activation).to(dev)
        self.log_std = nn.Parameter(torch.full((self.action_dim,), float(cfg.init_log_std), device=dev))
        self.params = list(self.actor.parameters()) + list(self.critic.parameters()) + [self.log_std]
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr, eps=cfg.adam_eps,
                                          fused=dev.type in ("cpu", "cuda"))
        self.register_networks({"actor": self.actor, "critic": self.critic})

    def reset_networks(self) -> None:
        self._build()

    def plasticity_inputs(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"actor": obs, "critic": obs}

    def plasticity_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def plasticity_structure_changed(self) -> None:
        self.params = list(self.actor.parameters()) + list(self.critic.parameters()) + [self.log_std]
        super().plasticity_structure_changed()

    def diagnostics(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Plasticity diagnostics on a probe of (normalised) observations."""
        return self.plasticity_diagnostics(obs.to(self.device))

    def curvature_losses(self, rows: Mapping[str, Any], seed: int) -> dict[str, Any]:
        """The unregularized clipped surrogate (actor) and value loss (critic) on rollout `rows`
        for plasticity/curvature.py; advantages normalised over the rows as over a minibatch."""
        d = {k: torch.as_tensor(v).to(self.device) for k, v in rows.items()}
        adv = normalize_advantages(d["advantage"])
        log_std, clip = self.log_std.detach(), self.cfg.clip

        def actor_loss(forward, b):
            z = (b["action"] - forward(b["obs"])) * torch.exp(-log_std)
            ratio = (gaussian_log_prob(z, log_std) - b["log_prob"]).exp()
            return clipped_surrogate(b["advantage"], ratio, clip)

        def critic_loss(forward, b):
            return ppo_value_loss(forward(b["obs"]).squeeze(-1), b["return"])

        return {"actor": (self.actor, actor_loss, {"obs": d["obs"], "action": d["action"],
                                                   "log_prob": d["log_prob"], "advantage": adv}),
                "critic": (self.critic, critic_loss, {"obs": d["obs"], "return": d["return"]})}

    @property
    def networks(self) -> dict[str, nn.Module]:
        return {"actor": self.actor, "critic": self.critic}

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per network (the log-std's |A| not included)."""
        return {name: parameter_count(net) for name, net in self.networks.items()}

    # -- acting -------------------------------------------------------------------------------
    def normalize(self, obs: np.ndarray, update: bool = False) -> np.ndarray:
        """Observations as the networks see them; `update` first folds them into the statistics."""
        obs = np.asarray(obs, dtype=np.float32)
        if self.obs_rms is None:
            return obs
        if update:
            self.obs_rms.update(obs)
        return self.obs_rms.normalize(obs)

    @torch.no_grad()
    def explore(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For a batch of raw observations (num_envs, obs_dim): (normalised obs, sampled action,
        its log-probability, V(s)).  The action is unclipped; the env gets it clipped to [-1, 1]."""
        norm = self.normalize(obs, update=True)
        o = torch.from_numpy(norm).to(self.device)
        mean = self.actor(o)
        noise = torch.randn_like(mean)
        action = gaussian_sample(mean, self.log_std, noise)
        log_prob = gaussian_log_prob(noise, self.log_std)
        value = self.critic(o).squeeze(-1)
        out = torch.cat([action, log_prob.unsqueeze(-1), value.unsqueeze(-1)], -1).cpu().numpy()
        a = self.action_dim
        return norm, out[:, :a], out[:, a], out[:, a + 1]

    @torch.no_grad()
    def values(self, obs: np.ndarray) -> np.ndarray:
        """V(s) for a batch of raw observations (statistics not updated)."""
        o = torch.from_numpy(self.normalize(obs)).to(self.device)
        return self.critic(o).squeeze(-1).cpu().numpy()

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """Action in [-1, 1] for one raw observation (or a batch): the mean when deterministic."""
        o = torch.from_numpy(self.normalize(obs)).to(self.device)
        mean = self.actor(o)
        action = mean if deterministic else gaussian_sample(mean, self.log_std, torch.randn_like(mean))
        return action.clamp(-1.0, 1.0).cpu().numpy()

    def value(self, obs: np.ndarray) -> float:
        return float(self.values(np.asarray(obs)[None])[0])

    # -- learning -----------------------------------------------------------------------------
    def update(self, rollout: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """`epochs` passes over the rollout in `num_minibatches` shuffled minibatches (`ppo_epochs`).

        Returns metrics averaged over the last epoch's minibatches, as device tensors.
        """
        data = {k: torch.from_numpy(v).to(self.device) for k, v in rollout.items()}

        def minibatch(index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            mb = {k: v[index[0]] for k, v in data.items()}
            return self._update_minibatch(mb), mb

        def after_update(i: int, mb: Mapping[str, torch.Tensor], block: Optional[torch.Tensor]) -> None:
            # The mixin reads the inputs only when an ER step, ReDo or a reset is due; CBP takes the
            # minibatch's training features `_update_minibatch` recorded, whatever the block.
            self.plasticity_after_update(mb["obs"] if block is None else data["obs"][block])

        stats = ppo_epochs(self.cfg, self.plasticity_cfg, data["obs"].shape[0], [self.generator], self.device,
                           minibatch, after_update)
        metrics = dict(zip(STAT_NAMES, stats.unbind()))
        metrics["losses/explained_variance"] = explained_variance(data["value"], data["return"])
        metrics["value/log_std"] = self.log_std.detach().mean()
        return metrics

    def _update_minibatch(self, mb: Mapping[str, torch.Tensor]) -> torch.Tensor:
        obs = mb["obs"]
        # The hidden features of this forward, for continual backprop after the step (only when it is
        # due); the MLPs overwrite no activation output later in their forward, so no copies.
        with self.plasticity_record("actor", copy=False):
            mean = self.actor(obs)
        with self.plasticity_record("critic", copy=False):
            value = self.critic(obs).squeeze(-1)
        loss, stats = ppo_loss(mean, value, self.log_std, mb, self.cfg)
        loss = self.add_plasticity_losses(loss, ("actor", "critic"), defer_direct=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ppo_optimizer_step([self], plasticity_gradients=False)
        return stats

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "log_std": self.log_std.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "update_count": self.update_count,
            "obs_rms": self.obs_rms.state_dict() if self.obs_rms is not None else None,
            "generator": self.generator.get_state(),
            "plasticity": self.plasticity_state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.plasticity_prepare_load(state["plasticity"])
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        with torch.no_grad():
            self.log_std.copy_(state["log_std"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.update_count = int(state["update_count"])
        if self.obs_rms is not None and state.get("obs_rms") is not None:
            self.obs_rms.load_state_dict(state["obs_rms"])
        self.generator.set_state(state["generator"])
        self.load_plasticity_state_dict(state["plasticity"])
