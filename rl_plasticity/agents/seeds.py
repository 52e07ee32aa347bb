"""Many seeds in one process (`num_seeds=N`): N independent runs whose updates are batched.

Each seed is a complete single-seed run (its own env, buffer, agent, optimizer state,
regularizer state, resets, logger, checkpoints and global random state), built exactly as
`num_seeds=1` builds it with that seed.  What the seeds share is the work of the update: a
`SACSeedGroup` stacks the seeds' parameters along a leading seed dimension and runs one fused
forward/backward for all of them (agents/fused.py, every matmul a batched one over
seeds × critics), one fused Adam call over every seed's tensors and one target-network lerp; a
`PPOSeedGroup` does the same for each PPO minibatch step (one batched forward and autograd
backward of every seed's policy and value networks, one fused Adam call).
Each seed's `nn.Parameter`s stay its own objects but alias slices of the stacked storage, so
everything written per seed (regularizer gradients, the effective-rank step, continual backprop,
diagnostics, checkpoints) acts on the stacked tensors directly.  A reset's new networks are bound
to the stacks after the update; a plasticity injection's new modules (SAC: every seed injects at
the same update) are stacked anew, with new plans.

Seed i of an N-seed run therefore follows the single-seed run with seed i: the same batches,
noise and initialisations, the same arithmetic up to the order of floating-point sums in the
batched matmuls (tests/test_seeds.py compares them).

What consumes the process-wide generators (PPO's exploration noise, the initialisation of
networks at a reset, the units continual backprop re-initialises) runs under that seed's own
copy of them (`SeedRNG`), as it would in its own process.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rl_plasticity.agents.accelerate import accelerate
from rl_plasticity.agents.fused import FusedSAC, InjectedPlan, MLPPlan, network_plan
from rl_plasticity.agents.ppo import STAT_NAMES, explained_variance, ppo_epochs, ppo_loss, ppo_optimizer_step
from rl_plasticity.agents.sac import sac_update_step, update_noise
from rl_plasticity.buffers import Batch
from rl_plasticity.ensemble import crelu
from rl_plasticity.plasticity.interventions import InjectedHead


class SeedRNG:
    """One seed's copy of the global generators (Python, NumPy, torch CPU and CUDA).

    `with rng:` installs it and takes it back (with whatever was drawn) on exit;
    `rng.torch_only()` does the same for torch's generators alone (cheaper, for code that
    draws only from torch).
    """

    def __init__(self) -> None:
        self.capture()

    def capture(self) -> None:
        self.python = random.getstate()
        self.numpy = np.random.get_state()
        self._capture_torch()

    def _capture_torch(self) -> None:
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def _restore_torch(self) -> None:
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)

    def __enter__(self) -> "SeedRNG":
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        self._restore_torch()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.capture()

    @contextlib.contextmanager
    def torch_only(self) -> Iterator[None]:
        self._restore_torch()
        try:
            yield
        finally:
            self._capture_torch()


def _bind(param: torch.Tensor, storage: torch.Tensor, grad: torch.Tensor | None, index: Any) -> None:
    """Make `param` (and its `.grad`) alias `storage[index]` (and `grad[index]`), keeping its value."""
    with torch.no_grad():
        storage[index].copy_(param.detach())
        param.data = storage[index]
        if grad is not None:
            param.grad = grad[index]


def _needs_rng(agent: Any) -> bool:
    """Whether the after-update work of the agent's next update may draw from the global
    generators: each intervention declares it (`draws_random`: a reset's fresh networks, the units
    continual backprop or ReDo re-initialise, shrink-and-perturb's fresh draw)."""
    return agent.plasticity_draws_random()


def _network_shape(n: int, param: torch.Tensor) -> tuple[int, ...]:
    """Stacked shape of one `nn.Linear`/`nn.LayerNorm` parameter of N seeds' networks: matrices
    (N, out, in), vectors (N, 1, n), the layout `MLPPlan.stacked_blocks` reads."""
    return (n, *param.shape) if param.dim() == 2 else (n, 1, param.shape[0])


def _network_index(param: torch.Tensor, i: int) -> Any:
    """Seed i's slice of a `_network_shape` stack."""
    return i if param.dim() == 2 else (i, 0)


class _StackedSeeds:
    """What the batched groups share: the seeds' agents and global generators, and the work after
    each optimizer step, which rebinds a seed whose networks a reset rebuilt (`_bind_seed`)."""

    def __init__(self, agents: Sequence[Any], rngs: Sequence[SeedRNG] | None):
        if len(agents) < 1:
            raise ValueError(f"{type(self).__name__} needs at least one agent")
        self.agents = list(agents)
        self.rngs = list(rngs) if rngs is not None else [None] * len(self.agents)
        # To notice a reset's new networks and a plasticity injection's new modules.
        self._bound_actor: list[Any] = [None] * len(self.agents)
        self._bound_changes: list[int] = [0] * len(self.agents)
        self._stale: set[int] = set()

    def _bind_seed(self, i: int) -> None:
        raise NotImplementedError

    def _stack(self) -> None:
        raise NotImplementedError

    def _parameters(self, agent: Any) -> list[torch.Tensor]:
        raise NotImplementedError

    def _layout(self, agent: Any) -> list[tuple[tuple[int, ...], bool]]:
        """What the stacks depend on: the shape and trainability of each parameter, in order."""
        return [(tuple(p.shape), p.requires_grad) for p in self._parameters(agent)]

    def _mark_bound(self, i: int) -> None:
        self._bound_actor[i] = self.agents[i].actor
        self._bound_changes[i] = self.agents[i].plasticity_structure_changes

    def _after_update(self, i: int, batch: Any, features: Any = None) -> None:
        """Seed i's `plasticity_after_update(batch, features)` (features: seed i's hidden features
        of the update's training forward, or None), under its own torch generators when it may
        draw from them.  A reset's new networks or an injection's new modules are bound to the
        stacks once every seed has had its turn (the seeds share the intervention settings, so
        they change together): bound in place when the layout is the one stacked (a reset),
        stacked anew when it changed (an injection, a reset after one)."""
        agent, rng = self.agents[i], self.rngs[i]
        if rng is not None and _needs_rng(agent):
            with rng.torch_only():
                agent.plasticity_after_update(batch, features)
        else:
            agent.plasticity_after_update(batch, features)
        self._note_change(i)
        if self._stale and i == len(self.agents) - 1:
            self._rebind()

    def _note_change(self, i: int) -> None:
        agent = self.agents[i]
        if agent.actor is not self._bound_actor[i] or agent.plasticity_structure_changes != self._bound_changes[i]:
            self._stale.add(i)

    def _sync(self) -> None:
        """Before a batched update: bind or stack anew what changed outside the group's own
        after-update work (a Python caller's reset, injection or checkpoint load on one of its
        agents), so that no update runs over stale stacks."""
        for i in range(len(self.agents)):
            self._note_change(i)
        if self._stale:
            self._rebind()

    def _rebind(self) -> None:
        layouts = [self._layout(a) for a in self.agents]
        if any(layout != layouts[0] for layout in layouts):
            changed = ", ".join(f"seed+{i}" for i in sorted(self._stale))
            raise RuntimeError(f"{type(self).__name__}: the seeds' networks no longer have the same layout (changed: "
                               f"{changed}, counted from the run's first seed); batched seeds need the same "
                               f"interventions at the same updates (batch_seeds=false runs them in turn)")
        if layouts[0] == self._stacked_layout:
            for i in sorted(self._stale):
                self._bind_seed(i)
        else:
            self._stack()
        self._stale.clear()


class SACSeedGroup(_StackedSeeds):
    """The SAC agents of several seeds updated together (see the module docstring).

    `update(batches)` takes one `Batch` per seed (leading dimension = replay ratio, as
    `SACAgent.update`) and returns each seed's metrics.  Each update is `sac.sac_update_step`,
    the sequence a single agent runs, over all seeds at once.  Every agent stays usable on its own
    (acting, diagnostics, checkpoints); an agent whose networks a reset rebuilt is bound to
    the stacks again after its update.
    """

    def __init__(self, agents: Sequence[Any], rngs: Sequence[SeedRNG] | None = None):
        super().__init__(agents, rngs)
        first = self.agents[0]
        if not all(a.cfg.fused for a in self.agents):
            raise ValueError("num_seeds > 1 batches the fused SAC update: agent.fused must be true")
        self.num_critics = first.cfg.num_critics
        self._stack()

    # -- stacking -----------------------------------------------------------------------------
    @staticmethod
    def _networks(agent: Any) -> tuple[Any, Any, Any]:
        return agent.actor.net, agent.critic.net, agent.critic_target.net

    def _index(self, kind: int, param: torch.Tensor, i: int) -> Any:
        if kind == 0:  # actor (nn.Linear / nn.LayerNorm)
            return _network_index(param, i)
        C = self.num_critics  # critic and target (ensembles): members of seed i are rows i·C ... (i+1)·C
        return slice(i * C, (i + 1) * C)

    def _stacked_shape(self, kind: int, param: torch.Tensor) -> tuple[int, ...]:
        n = len(self.agents)
        if kind == 0:
            return _network_shape(n, param)
        return (n * param.shape[0], *param.shape[1:])

    def _parameters(self, agent: Any) -> list[torch.Tensor]:
        return [p for net in self._networks(agent) for p in net.parameters()]

    def _stack(self) -> None:
        """Stacks of every seed's parameters, bound, and the batched fused update over them (again
        when a plasticity injection changed the modules: new plans, compiled anew)."""
        agents = self.agents
        self._storage: list[list[torch.Tensor]] = []
        for kind in range(3):
            params0 = list(self._networks(agents[0])[kind].parameters())
            storage = [torch.empty(self._stacked_shape(kind, p), device=p.device, dtype=p.dtype) for p in params0]
            if kind < 2:  # the target network and the frozen heads of an injection have no gradient
                for t, p in zip(storage, params0):
                    if p.requires_grad:
                        t.grad = torch.zeros_like(t)
            self._storage.append(storage)
        dev = agents[0].log_alpha.device
        self._alpha = torch.empty(len(agents), device=dev)
        self._alpha.grad = torch.zeros_like(self._alpha)
        for i in range(len(agents)):
            self._bind_seed(i)
        self._stacked_layout = self._layout(agents[0])
        plans = tuple(network_plan(self._networks(agents[0])[k], self._storage[k]) for k in range(3))
        self._fused = FusedSAC(plans=plans, log_alpha=self._alpha, seeds=len(agents), template=agents[0])
        self._losses_and_grads = accelerate(self._fused.losses_and_grads, agents[0].device, agents[0]._compile,
                                            agents[0]._cudagraphs, "the batched multi-seed SAC update")

    def _bind_seed(self, i: int) -> None:
        agent = self.agents[i]
        for kind, net in enumerate(self._networks(agent)):
            for p, t in zip(net.parameters(), self._storage[kind]):
                _bind(p, t, t.grad, self._index(kind, p, i))
        _bind(agent.log_alpha, self._alpha, self._alpha.grad, i)
        self._mark_bound(i)

    # -- the update ---------------------------------------------------------------------------
    def update(self, batches: Sequence[Batch]) -> list[dict[str, torch.Tensor]]:
        agents = self.agents
        n = len(agents)
        if len(batches) != n:
            raise ValueError(f"{len(batches)} batches for {n} seeds")
        self._sync()
        updates, size = batches[0].obs.shape[0], batches[0].obs.shape[1]
        # Each seed's noise from its own generator, drawn as SACAgent.update draws it.
        noise = torch.stack([update_noise(a, updates, size) for a in agents], 1)
        obs, action, reward, next_obs, terminated = (torch.stack(t, 1) for t in zip(*batches))
        metrics: dict[str, torch.Tensor] = {}
        for u in range(updates):
            metrics = sac_update_step(agents, self._losses_and_grads, True, self._lerp_target, self._seed_after_update,
                                      obs[u], action[u], reward[u], next_obs[u], terminated[u], noise[u])
        return [{k: v[i] for k, v in metrics.items()} for i in range(n)]

    @torch.no_grad()
    def _lerp_target(self) -> None:
        torch._foreach_lerp_(self._storage[2], self._storage[1], self.agents[0].cfg.tau)

    def _seed_after_update(self, i: int, obs: torch.Tensor, action: torch.Tensor, features: Any = None) -> None:
        if features is not None:  # seed i's slice of the stacked features (critics: members i·C ... (i+1)·C)
            C = self.num_critics
            features = {"actor": [f[i:i + 1] for f in features["actor"]],
                        "critic": [f[i * C:(i + 1) * C] for f in features["critic"]]}
        self._after_update(i, (obs[i], action[i]), features)


class PPOSeedGroup(_StackedSeeds):
    """The PPO agents of several seeds updated together: `update(rollouts)` takes one finished
    rollout per seed (the dicts `PPOAgent.update` takes) and returns each seed's metrics.

    Each seed's actor, critic and log-std are stacked along a leading seed dimension (weights
    (N, out, in), vectors (N, 1, n), log-std (N, |A|)) and aliased by the seed's own parameters, as in
    `SACSeedGroup`.  Every minibatch step runs all seeds at once: one batched forward per
    network (`baddbmm` per layer), the seeds' PPO losses summed (their parameters are
    disjoint, so each seed's gradient is its own loss's), one autograd pass into the stacked
    gradients, then `ppo.ppo_optimizer_step`, the step `PPOAgent` takes too (per seed its
    regularizer gradients, the spectral step, gradient clipping; one fused Adam call over every
    seed's tensors) and, after the step, each seed's effective-rank step, continual backprop
    and reset.  The epochs and minibatches are `ppo.ppo_epochs`, as for one agent; each seed
    draws its own minibatch order from its own generator.
    """

    def __init__(self, agents: Sequence[Any], rngs: Sequence[SeedRNG] | None = None):
        super().__init__(agents, rngs)
        first = self.agents[0]
        if any(a.cfg != first.cfg or a.plasticity_cfg != first.plasticity_cfg for a in self.agents):
            raise ValueError("PPOSeedGroup: the seeds' agent and plasticity settings must be the same")
        self._stack()

    def _parameters(self, agent: Any) -> list[torch.Tensor]:
        return [*agent.actor.parameters(), *agent.critic.parameters(), agent.log_std]

    def _stack(self) -> None:
        """Stacks of every seed's parameters, bound, and the plans over them (again when a
        plasticity injection changed the modules; its frozen heads are no autograd leaves)."""
        n = len(self.agents)
        first = self.agents[0]
        self._storage: dict[str, list[torch.Tensor]] = {}
        for name in ("actor", "critic"):
            self._storage[name] = [torch.empty(_network_shape(n, p), device=p.device, dtype=p.dtype)
                                   for p in getattr(first, name).parameters()]
        log_std = first.log_std
        self._storage["log_std"] = [torch.empty((n, *log_std.shape), device=log_std.device, dtype=log_std.dtype)]
        stacked = [t for ts in self._storage.values() for t in ts]
        self._leaves = [t for t, p in zip(stacked, self._parameters(first)) if p.requires_grad]
        for t in self._leaves:
            t.requires_grad_(True)
            t.grad = torch.zeros_like(t)
        self._leaf_grads = [t.grad for t in self._leaves]
        for i in range(n):
            self._bind_seed(i)
        self._stacked_layout = self._layout(first)
        self._plans = {name: network_plan(getattr(first, name), self._storage[name]) for name in ("actor", "critic")}
        self._features: dict[str, list[torch.Tensor]] | None = None  # the last minibatch's, when recorded

    def _bind_seed(self, i: int) -> None:
        agent = self.agents[i]
        for name in ("actor", "critic"):
            for p, t in zip(getattr(agent, name).parameters(), self._storage[name]):
                _bind(p, t, t.grad, _network_index(p, i))
        t = self._storage["log_std"][0]
        _bind(agent.log_std, t, t.grad, i)
        self._mark_bound(i)

    def _forward(self, name: str, x: torch.Tensor, hidden: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Network `name` of every seed on its rows, through autograd: x (N, rows, in) -> (N, rows, out);
        after plasticity injection the trunk, then its three heads combined (`InjectedHead.combine`).
        With `hidden` (continual backprop, which does not compose with injection), each hidden
        layer's post-activation output (N, rows, width) appended, detached."""
        plan = self._plans[name]
        if isinstance(plan, InjectedPlan):
            z = x if plan.trunk is None else self._run(plan.trunk, x)
            return InjectedHead.combine(*(self._run(head, z) for head in plan.heads))
        return self._run(plan, x, hidden)

    @staticmethod
    def _run(plan: MLPPlan, x: torch.Tensor, hidden: list[torch.Tensor] | None = None) -> torch.Tensor:
        for block in plan.blocks:
            x = torch.baddbmm(block.linear.bias, x, block.linear.weight.transpose(1, 2))
            if block.norm is not None:
                norm = block.norm
                x = torch.addcmul(norm.bias, F.layer_norm(x, (norm.weight.shape[-1],), eps=norm.eps), norm.weight)
            if block.relu:
                x = crelu(x) if block.crelu else torch.relu(x)
                if hidden is not None:
                    hidden.append(x.detach())
        return x

    def update(self, rollouts: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, torch.Tensor]]:
        """`PPOAgent.update` of every seed (see there); metrics per seed."""
        agents = self.agents
        n = len(agents)
        if len(rollouts) != n:
            raise ValueError(f"{len(rollouts)} rollouts for {n} seeds")
        self._sync()
        dev = agents[0].device
        data = {k: torch.stack([torch.from_numpy(r[k]) for r in rollouts]).to(dev) for k in rollouts[0]}
        seed_index = torch.arange(n, device=dev).unsqueeze(1)

        def minibatch(index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            mb = {k: v[seed_index, index] for k, v in data.items()}
            return self._update_minibatch(mb), mb

        def after_update(i: int, mb: Mapping[str, torch.Tensor], block: torch.Tensor | None) -> None:
            features = None
            if self._features is not None:  # seed i's slice of the minibatch's training features
                features = {name: [f[i:i + 1] for f in fs] for name, fs in self._features.items()}
            self._after_update(i, mb["obs"][i] if block is None else data["obs"][i][block], features)

        stats = ppo_epochs(agents[0].cfg, agents[0].plasticity_cfg, data["obs"].shape[1],
                           [a.generator for a in agents], dev, minibatch, after_update)  # (N, 5)
        self._features = None  # the last minibatch's activations are not kept between updates
        explained = explained_variance(data["value"], data["return"])
        out = []
        for i, agent in enumerate(agents):
            metrics = dict(zip(STAT_NAMES, stats[i].unbind()))
            metrics["losses/explained_variance"] = explained[i]
            metrics["value/log_std"] = agent.log_std.detach().mean()
            out.append(metrics)
        return out

    def _update_minibatch(self, mb: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One minibatch step of every seed (`PPOAgent._update_minibatch`); stats (N, 5)."""
        obs = mb["obs"]
        # The hidden features of this forward, for continual backprop after the step (when it is due).
        self._features = None
        if any(agent.plasticity_wants_features() for agent in self.agents):
            self._features = {"actor": [], "critic": []}
        hidden = self._features or {}
        loss, stats = ppo_loss(self._forward("actor", obs, hidden.get("actor")),
                               self._forward("critic", obs, hidden.get("critic")).squeeze(-1),
                               self._storage["log_std"][0], mb, self.agents[0].cfg)
        torch._foreach_copy_(self._leaf_grads, torch.autograd.grad(loss.sum(), self._leaves))
        ppo_optimizer_step(self.agents, plasticity_gradients=True)
        return stats


class SequentialGroup:
    """Agents updated one after the other, each under its own global generators: `batch_seeds`
    false, SAC's default on a CPU (there a batched matmul costs what the seeds' matmuls cost one
    by one), and SAC through the autograd path (agent.fused=false)."""

    def __init__(self, agents: Sequence[Any], rngs: Sequence[SeedRNG]):
        self.agents, self.rngs = list(agents), list(rngs)

    def update(self, requests: Sequence[Any]) -> list[dict[str, torch.Tensor]]:
        out = []
        for agent, rng, request in zip(self.agents, self.rngs, requests):
            with rng:
                out.append(agent.update(request))
        return out
