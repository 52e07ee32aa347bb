"""Soft actor-critic for high replay ratios (Haarnoja et al. 2018, automatic temperature).

Settings default to those of the SAC experiments in spectral-regularization.md §5.4 / App. B:
replay ratio 16, 2x256 ReLU MLPs with LayerNorm after each hidden linear layer, one critic,
batch 256, Adam 3e-4, γ 0.99, Polyak τ 0.005, target entropy −|A|.

The update path is built for speed: `update(batch)` takes all the batches of one environment
step at once (leading dimension = replay ratio) and draws their Gaussian noise in one call; each
update then runs the fused path of agents/fused.py (forward and backward written out, no
autograd graph), or with `agent.fused=false` the autograd reference `_update_once` it is tested
against.  The critics are one batched module, Adam is fused, the target critic moves with one
`_foreach_lerp_`, and nothing synchronises with the host; metrics come back as device tensors.

The critic, actor and temperature losses are evaluated at the same parameters and stepped
together, as in the original SAC implementation: the actor's loss reads the critic through
fixed parameters, so each loss sends gradients only into its own network, and one fused Adam
step (a parameter group per network) applies all three.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from rl_plasticity.agents.accelerate import accelerate
from rl_plasticity.agents.formulas import (actor_loss as sac_actor_loss, critic_td_loss, min_over_critics,
                                           soft_td_target, squash_log_std, tanh_gaussian_sample, temperature_loss)
from rl_plasticity.agents.fused import FusedSAC
from rl_plasticity.agents.networks import ACTIVATIONS, check_activation, Critic, TanhGaussianActor, parameter_count
from rl_plasticity.buffers import Batch
from rl_plasticity.config import from_node, require
from rl_plasticity.optim import adam_step_many
from rl_plasticity.plasticity.layers import FeatureRecorder
from rl_plasticity.plasticity.mixin import PlasticityConfig, PlasticityMixin


@dataclasses.dataclass
class SACConfig:
    name: str = "sac"
    replay_ratio: int = 16
    batch_size: int = 256
    buffer_size: int = 1_000_000
    prefill_steps: int = 10_000
    hidden_sizes: tuple[int, ...] = (256, 256)
    layer_norm: bool = True
    activation: str = "relu"  # relu | crelu ([relu(x), relu(-x)]: the next layer takes twice the width)
    num_critics: int = 1
    gamma: float = 0.99
    tau: float = 0.005
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    alpha_lr: float = 3e-4
    init_alpha: float = 1.0
    target_entropy: Optional[float] = None  # None: −|A|
    log_std_min: float = -5.0
    log_std_max: float = 2.0
    reset_interval: Optional[int] = None  # full reset every N gradient updates (null: never)
    fused: bool = True  # hand-written forward/backward (agents/fused.py); false: autograd reference

    @classmethod
    def from_node(cls, node: Mapping[str, Any]) -> "SACConfig":
        cfg = from_node(cls, node, "agent")
        require(cfg.replay_ratio >= 1, f"agent.replay_ratio must be >= 1, got {cfg.replay_ratio}")
        require(cfg.batch_size >= 1, f"agent.batch_size must be >= 1, got {cfg.batch_size}")
        require(cfg.buffer_size >= cfg.batch_size,
                f"agent.batch_size ({cfg.batch_size}) must not exceed agent.buffer_size ({cfg.buffer_size})")
        require(cfg.prefill_steps >= 0, f"agent.prefill_steps must be >= 0, got {cfg.prefill_steps}")
        require(len(cfg.hidden_sizes) >= 1 and min(cfg.hidden_sizes) >= 1,
                f"agent.hidden_sizes must be a non-empty list of positive widths, got {list(cfg.hidden_sizes)}")
        require(cfg.num_critics >= 1, f"agent.num_critics must be >= 1, got {cfg.num_critics}")
        require(cfg.activation in ACTIVATIONS,
                f"agent.activation must be one of {', '.join(ACTIVATIONS)}, got {cfg.activation!r}")
        require(0.0 <= cfg.gamma <= 1.0, f"agent.gamma must be in [0, 1], got {cfg.gamma}")
        require(0.0 < cfg.tau <= 1.0, f"agent.tau must be in (0, 1], got {cfg.tau}")
        for key in ("actor_lr", "critic_lr", "alpha_lr", "init_alpha"):
            require(getattr(cfg, key) > 0, f"agent.{key} must be > 0, got {getattr(cfg, key)}")
        require(cfg.log_std_min < cfg.log_std_max, "agent.log_std_min must be below agent.log_std_max")
        require(cfg.reset_interval is None or cfg.reset_interval >= 1,
                f"agent.reset_interval must be >= 1 (gradient updates) or null, got {cfg.reset_interval}")
        return cfg


def update_noise(agent: "SACAgent", updates: int, size: int) -> torch.Tensor:
    """The standard normal noise of `updates` updates of `agent` (next action and policy action),
    (updates, 2, size, |A|), drawn from the agent's generator in one call."""
    return torch.randn((updates, 2, size, agent.action_dim), device=agent.device, generator=agent.generator)


def sac_update_step(agents: Sequence["SACAgent"], gradients: Callable[..., tuple[dict[str, torch.Tensor], Any]],
                    plasticity_gradients: bool, lerp_target: Callable[[], None],
                    after_update: Callable[[int, torch.Tensor, torch.Tensor, Any], None], obs: torch.Tensor,
                    action: torch.Tensor, reward: torch.Tensor, next_obs: torch.Tensor, terminated: torch.Tensor,
                    noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """One SAC gradient update (Haarnoja et al. 2018b, Alg. 1's gradient step, the critic, actor and
    temperature stepped together), of one agent or of a seed group (agents/seeds.py), in order:

    1. `gradients(obs, action, reward, next_obs, terminated, noise, features)`: the losses'
       gradients in `.grad`, the update's metrics (the fused path, or autograd with the plasticity
       losses) and, when `features` (a due intervention, continual backprop, takes them:
       `plasticity_wants_features`), the hidden features of this forward (else None);
    2. per agent, the plasticity gradients when `plasticity_gradients` (the fused path's: its
       losses carry none) and the regularizers' work before the step;
    3. one Adam step over every agent's optimizer (bitwise `optimizer.step()` per agent);
    4. the target critics' Polyak step (`lerp_target`);
    5. per agent, the update count and `after_update(i, obs, action, features)`: ER step, continual
       backprop (on those pre-step features), resets and the other interventions.
    """
    want = any(agent.plasticity_wants_features() for agent in agents)
    metrics, features = gradients(obs, action, reward, next_obs, terminated, noise, want)
    for agent in agents:
        if plasticity_gradients:
            agent.add_plasticity_gradients(("critic", "actor"))
        agent.plasticity_before_step()
    adam_step_many([agent.optimizer for agent in agents])
    lerp_target()
    for i, agent in enumerate(agents):
        agent.update_count += 1
        after_update(i, obs, action, features)
    return metrics


class SACAgent(PlasticityMixin):
    """SAC with a tanh-Gaussian actor, `num_critics` critics (min over them) and auto temperature.

    Plasticity: the actor's and critic's MLPs are registered with the mixin as "actor" and
    "critic"; each one's penalty joins the summed loss, and `agent.reset_interval` triggers a
    full reset (actor, critic, target, temperature, optimizer state; the replay buffer is kept).
    """

    def __init__(self, obs_dim: int, action_dim: int, cfg: SACConfig, device: torch.device | str = "cpu",
                 plasticity: Optional[PlasticityConfig] = None, seed: int = 0, compile: bool = False,
                 cudagraphs: bool = False):
        self.cfg = cfg
        self.device = torch.device(device)
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.target_entropy = float(-action_dim if cfg.target_entropy is None else cfg.target_entropy)
        self.update_count = 0
        # The agent's randomness after initialisation (exploration and update noise) comes
        # from its own generator, so that one agent's run never depends on another's draws.
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        if (compile or cudagraphs) and not cfg.fused:
            warnings.warn("compile/cudagraphs apply to the fused update (agent.fused=true); this run uses the "
                          "autograd reference path uncompiled", stacklevel=2)
        self._compile, self._cudagraphs = compile, cudagraphs
        plasticity = plasticity or PlasticityConfig()
        check_activation(cfg.activation, plasticity)
        self.init_plasticity(plasticity, cfg.reset_interval)
        self._build()
        self._step = self._fused_step if cfg.fused else self._update_once

    # -- construction -------------------------------------------------------------------------
    def _build(self) -> None:
        """Fresh networks, target, temperature and optimizer state (also what a full reset does)."""
        cfg, dev = self.cfg, self.device
        self.actor = TanhGaussianActor(self.obs_dim, self.action_dim, cfg.hidden_sizes, cfg.layer_norm,
                                       cfg.log_std_min, cfg.log_std_max, cfg.activation).to(dev)
        self.critic = Critic(self.obs_dim, self.action_dim, cfg.hidden_sizes, cfg.num_critics, cfg.layer_norm,
                             cfg.activation).to(dev)
        self.critic_target = Critic(self.obs_dim, self.action_dim, cfg.hidden_sizes, cfg.num_critics,
                                    cfg.layer_norm, cfg.activation).to(dev)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.requires_grad_(False)
        self.log_alpha = torch.tensor(float(np.log(cfg.init_alpha)), device=dev, requires_grad=True)
        # One Adam, one parameter group per trained object: a single optimizer step per update
        # (less Python overhead than three), while each group keeps its own learning rate.
        self.optimizer = torch.optim.Adam(
            [{"params": list(self.actor.parameters()), "lr": cfg.actor_lr, "name": "actor"},
             {"params": list(self.critic.parameters()), "lr": cfg.critic_lr, "name": "critic"},
             {"params": [self.log_alpha], "lr": cfg.alpha_lr, "name": "alpha"}],
            fused=dev.type in ("cpu", "cuda"))
        self._critic_params = list(self.critic.parameters())
        self._target_params = list(self.critic_target.parameters())
        self.register_networks({"actor": self.actor.net, "critic": self.critic.net})
        self._build_fused()

    def _build_fused(self) -> None:
        """The fused update's plans over the current modules, wrapped as `compile`/`cudagraphs` ask.
        A reset or a plasticity injection builds new modules, so the plans are rebuilt and the
        function compiled again."""
        self._fused = FusedSAC(self) if self.cfg.fused else None
        if self._fused is not None:
            self._losses_and_grads = accelerate(self._fused.losses_and_grads, self.device, self._compile,
                                                self._cudagraphs, "the fused SAC update")

    def reset_networks(self) -> None:
        """Full reset (the SR-SAC reset baseline): everything re-initialised, buffer kept."""
        self._build()

    def plasticity_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def plasticity_targets(self) -> dict[str, torch.nn.Module]:
        return {"critic": self.critic_target.net}

    def plasticity_structure_changed(self) -> None:
        self._critic_params = list(self.critic.parameters())
        self._target_params = list(self.critic_target.parameters())
        self._build_fused()
        super().plasticity_structure_changed()

    def plasticity_inputs(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        obs, action = batch
        return {"actor": obs, "critic": torch.cat([obs, action], dim=-1)}

    def diagnostics(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Plasticity diagnostics on a probe batch of shape (B, ...) (see PlasticityMixin)."""
        return self.plasticity_diagnostics((batch.obs, batch.action))

    def curvature_losses(self, batch: Batch, seed: int) -> dict[str, Any]:
        """The unregularized critic TD loss and actor loss on `batch` for plasticity/curvature.py:
        the TD target, α and the actor's Gaussian noise fixed (noise from a generator seeded with
        `seed`), so each loss is a function of its own network only, as in the update."""
        g = torch.Generator(device=self.device).manual_seed(int(seed))
        noise = torch.randn((2, batch.obs.shape[0], self.action_dim), device=self.device, generator=g)
        alpha = self.alpha
        target = self.td_target(batch.reward, batch.next_obs, batch.terminated, alpha, noise[0])
        actor, critic = self.actor, self.critic

        def critic_loss(forward, d):  # Σ over critics of (Q − target)², per sample
            return (forward(d["x"]).squeeze(-1) - d["target"]).square().sum(0)

        def actor_loss(forward, d):  # α log π(ã|s) − min Q(s, ã), ã = tanh(mean + std·noise), per sample
            mean, raw = forward(d["obs"]).chunk(2, dim=-1)
            log_std = squash_log_std(raw, actor.log_std_min, actor.log_std_max)[0]
            action, log_prob, _ = tanh_gaussian_sample(mean, log_std, d["noise"])
            return alpha * log_prob - min_over_critics(critic(d["obs"], action, detached=True))

        return {"critic": (self.critic.net, critic_loss,
                           {"x": torch.cat([batch.obs, batch.action], -1), "target": target}),
                "actor": (self.actor.net, actor_loss, {"obs": batch.obs, "noise": noise[1]})}

    @property
    def networks(self) -> dict[str, torch.nn.Module]:
        """The trained networks by name (what plasticity code and checkpoints iterate over)."""
        return {"actor": self.actor, "critic": self.critic}

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per network (all critic members together; the target is a copy)."""
        return {name: parameter_count(net) for name, net in self.networks.items()}

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.detach().exp()

    # -- acting -------------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """Action in [-1, 1] for one observation (or a batch of them)."""
        o = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        a = self.actor.deterministic(o) if deterministic else self.actor.sample(o, generator=self.generator)[0]
        return a.cpu().numpy()

    @torch.no_grad()
    def value(self, obs: np.ndarray) -> float:
        """Critic's estimate of V(s) ≈ Q(s, tanh(mean)) (min over critics), for diagnostics."""
        o = torch.as_tensor(obs, dtype=torch.float32, device=self.device).unsqueeze(0)
        return float(min_over_critics(self.critic(o, self.actor.deterministic(o))).item())

    # -- learning -----------------------------------------------------------------------------
    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One gradient update per leading slice of `batch` (shape (updates, batch_size, ...)).

        The Gaussian noise of all these updates (next action and policy action) is drawn in one
        call.  Returns the last update's metrics as detached device tensors (no host sync).
        """
        noise = update_noise(self, batch.obs.shape[0], batch.obs.shape[1])
        metrics: dict[str, torch.Tensor] = {}
        for i in range(batch.obs.shape[0]):
            metrics = self._step(batch.obs[i], batch.action[i], batch.reward[i], batch.next_obs[i],
                                 batch.terminated[i], noise[i])
        return metrics

    @torch.no_grad()
    def td_target(self, reward: torch.Tensor, next_obs: torch.Tensor, terminated: torch.Tensor,
                  alpha: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """r + γ (1 − terminated) (min_i Q̄_i(s', a') − α log π(a'|s')), a' ~ π(·|s')
        (`formulas.soft_td_target`: only a true termination stops bootstrapping)."""
        alpha = self.alpha if alpha is None else alpha
        next_action, next_log_prob = self.actor.sample(next_obs, noise, self.generator)
        next_q = min_over_critics(self.critic_target(next_obs, next_action))
        return soft_td_target(reward, terminated, next_q, next_log_prob, alpha, self.cfg.gamma)

    def _update_once(self, obs, action, reward, next_obs, terminated, noise) -> dict[str, torch.Tensor]:
        """The autograd reference update (agent.fused=false); `noise` (2, B, |A|)."""
        return sac_update_step([self], self._autograd_gradients, False, self._lerp_target, self._after_update,
                               obs, action, reward, next_obs, terminated, noise)

    def _fused_step(self, obs, action, reward, next_obs, terminated, noise) -> dict[str, torch.Tensor]:
        """The same update as `_update_once` with the hand-written gradients of agents/fused.py."""
        return sac_update_step([self], self._losses_and_grads, True, self._lerp_target, self._after_update,
                               obs, action, reward, next_obs, terminated, noise)

    def _autograd_gradients(self, obs, action, reward, next_obs, terminated, noise,
                            features: bool = False) -> tuple[dict[str, torch.Tensor], Any]:
        """The losses (the plasticity losses included) and their gradients in `.grad`, by autograd;
        the update's metrics, and with `features` the hidden features continual backprop reads:
        the critic's on (obs, action) (its TD-loss forward) and the actor's on obs (its actor-loss
        forward), {network: [(members, B, width) per hidden layer]}; else None."""
        alpha = self.log_alpha.detach().exp()
        target = self.td_target(reward, next_obs, terminated, alpha, noise[0])
        # The package's MLPs overwrite no activation output later in the forward: no copies.
        with FeatureRecorder(self.critic.net, copy=False) if features else contextlib.nullcontext() as critic_rec:
            q = self.critic(obs, action)
        critic_loss = critic_td_loss(q, target)[0]

        with FeatureRecorder(self.actor.net, copy=False) if features else contextlib.nullcontext() as actor_rec:
            new_action, log_prob = self.actor.sample(obs, noise[1])
        q_pi = min_over_critics(self.critic(obs, new_action, detached=True))
        actor_loss = sac_actor_loss(alpha, log_prob, q_pi)
        alpha_loss = temperature_loss(self.log_alpha, log_prob.detach(), self.target_entropy)

        loss = critic_loss + actor_loss + alpha_loss
        loss = self.add_plasticity_losses(loss, ("critic", "actor"), defer_direct=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return {
            "losses/critic": critic_loss.detach(),
            "losses/actor": actor_loss.detach(),
            "losses/alpha": alpha_loss.detach(),
            "value/alpha": alpha,
            "value/q_mean": q.detach().mean(),
            "value/entropy": -log_prob.detach().mean(),
        }, ({"actor": actor_rec.features, "critic": critic_rec.features} if features else None)

    @torch.no_grad()
    def _lerp_target(self) -> None:
        torch._foreach_lerp_(self._target_params, self._critic_params, self.cfg.tau)

    def _after_update(self, i: int, obs: torch.Tensor, action: torch.Tensor, features: Any = None) -> None:
        self.plasticity_after_update((obs, action), features)

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "update_count": self.update_count,
            "generator": self.generator.get_state(),
            "plasticity": self.plasticity_state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.plasticity_prepare_load(state["plasticity"])
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        # Optimizer.load_state_dict keeps the given tensors when device and dtype already match;
        # copy them so that two agents never share moment estimates.
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.update_count = int(state["update_count"])
        if "generator" in state:
            self.generator.set_state(state["generator"].cpu())
        self.load_plasticity_state_dict(state["plasticity"])
