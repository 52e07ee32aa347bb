"""Many seeds in one process (`num_seeds=N`): N independent runs whose updates are batched.

Each seed is a complete single-seed run (its own env, buffer, agent, optimizer state,
regularizer state, resets, logger, checkpoints and global random state), built exactly as
`num_seeds=1` builds it with that seed.  What the seeds share is the work of the update: a
`SACSeedGroup` stacks the seeds' parameters along a leading seed dimension and runs one fused
forward/backward for all of them (agents/fused.py, every matmul a batched one over
seeds × critics), one fused Adam call over every seed's tensors and one target-network lerp.
Each seed's `nn.Parameter`s stay its own objects but alias slices of the stacked storage, so
everything written per seed (regularizer gradients, the effective-rank step, continual backprop,
diagnostics, checkpoints) acts on the stacked tensors directly.

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
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from rl_plasticity.agents.accelerate import accelerate
from rl_plasticity.agents.fused import FusedSAC, MLPPlan, adam_step_many
from rl_plasticity.buffers import Batch


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


class SACSeedGroup:
    """The SAC agents of several seeds updated together (see the module docstring).

    `update(batches)` takes one `Batch` per seed (leading dimension = replay ratio, as
    `SACAgent.update`) and returns each seed's metrics.  Every agent stays usable on its own
    (acting, diagnostics, checkpoints); an agent whose networks a reset rebuilt is bound to
    the stacks again after its update.
    """

    def __init__(self, agents: Sequence[Any], rngs: Sequence[SeedRNG] | None = None):
        if len(agents) < 1:
            raise ValueError("SACSeedGroup needs at least one agent")
        self.agents = list(agents)
        self.rngs = list(rngs) if rngs is not None else [None] * len(self.agents)
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
        if kind == 0:  # actor (nn.Linear / nn.LayerNorm): matrices (N, out, in), vectors (N, 1, n)
            return i if param.dim() == 2 else (i, 0)
        C = self.num_critics  # critic and target (ensembles): members of seed i are rows i·C ... (i+1)·C
        return slice(i * C, (i + 1) * C)

    def _stacked_shape(self, kind: int, param: torch.Tensor) -> tuple[int, ...]:
        n = len(self.agents)
        if kind == 0:
            return (n, *param.shape) if param.dim() == 2 else (n, 1, param.shape[0])
        return (n * param.shape[0], *param.shape[1:])

    def _stack(self) -> None:
        agents = self.agents
        self._storage: list[list[torch.Tensor]] = []
        self._grads: list[list[torch.Tensor | None]] = []
        for kind in range(3):
            params0 = list(self._networks(agents[0])[kind].parameters())
            storage = [torch.empty(self._stacked_shape(kind, p), device=p.device, dtype=p.dtype) for p in params0]
            grads = [torch.zeros_like(s) if kind < 2 else None for s in storage]
            for s, g in zip(storage, grads):
                if g is not None:
                    s.grad = g
            self._storage.append(storage)
            self._grads.append(grads)
        dev = agents[0].log_alpha.device
        self._alpha = torch.empty(len(agents), device=dev)
        self._alpha.grad = torch.zeros_like(self._alpha)
        self._bound_actor: list[Any] = [None] * len(agents)  # to notice a reset's new networks
        for i in range(len(agents)):
            self._bind_seed(i)
        plans = tuple(MLPPlan.stacked_blocks([self._networks(agents[0])[k]], self._storage[k]) for k in range(3))
        self._fused = FusedSAC(plans=plans, log_alpha=self._alpha, seeds=len(agents), template=agents[0])
        self._losses_and_grads = accelerate(self._fused.losses_and_grads, agents[0].device, agents[0]._compile,
                                            agents[0]._cudagraphs, "the batched multi-seed SAC update")

    def _bind_seed(self, i: int) -> None:
        agent = self.agents[i]
        for kind, net in enumerate(self._networks(agent)):
            for p, s, g in zip(net.parameters(), self._storage[kind], self._grads[kind]):
                _bind(p, s, g, self._index(kind, p, i))
        _bind(agent.log_alpha, self._alpha, self._alpha.grad, i)
        self._bound_actor[i] = agent.actor

    # -- the update ---------------------------------------------------------------------------
    def _needs_rng(self, agent: Any) -> bool:
        """Whether this update's after-step work may draw from the global generators."""
        due = agent.reset_interval is not None and (agent.plasticity_updates + 1) % agent.reset_interval == 0
        return bool(agent._cbp) or due

    def update(self, batches: Sequence[Batch]) -> list[dict[str, torch.Tensor]]:
        agents = self.agents
        n = len(agents)
        if len(batches) != n:
            raise ValueError(f"{len(batches)} batches for {n} seeds")
        updates, size = batches[0].obs.shape[0], batches[0].obs.shape[1]
        action_dim = agents[0].action_dim
        # Each seed's noise from its own generator, drawn as SACAgent.update draws it.
        noise = torch.stack([torch.randn((updates, 2, size, action_dim), device=a.device, generator=a.generator)
                             for a in agents], 1)
        obs, action, reward, next_obs, terminated = (torch.stack(t, 1) for t in zip(*batches))
        tau = agents[0].cfg.tau
        metrics: dict[str, torch.Tensor] = {}
        for u in range(updates):
            metrics = self._losses_and_grads(obs[u], action[u], reward[u], next_obs[u], terminated[u], noise[u])
            for agent in agents:
                agent.add_plasticity_gradients(("critic", "actor"))
                agent.plasticity_before_step()
            adam_step_many([a.optimizer for a in agents])
            with torch.no_grad():
                torch._foreach_lerp_(self._storage[2], self._storage[1], tau)
            for i, agent in enumerate(agents):
                agent.update_count += 1
                rng = self.rngs[i]
                if rng is not None and self._needs_rng(agent):
                    with rng.torch_only():
                        agent.plasticity_after_update((obs[u, i], action[u, i]))
                else:
                    agent.plasticity_after_update((obs[u, i], action[u, i]))
                if agent.actor is not self._bound_actor[i]:  # a reset built new networks
                    self._bind_seed(i)
        return [{k: v[i] for k, v in metrics.items()} for i in range(n)]


class SequentialGroup:
    """Agents updated one after the other, each under its own global generators (PPO: its
    update is a few large minibatch steps per rollout, and its collection is env-bound)."""

    def __init__(self, agents: Sequence[Any], rngs: Sequence[SeedRNG]):
        self.agents, self.rngs = list(agents), list(rngs)

    def update(self, requests: Sequence[Any]) -> list[dict[str, torch.Tensor]]:
        out = []
        for agent, rng, request in zip(self.agents, self.rngs, requests):
            with rng:
                out.append(agent.update(request))
        return out
