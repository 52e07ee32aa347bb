"""Replay storage for off-policy agents.

The buffer is preallocated on the training device, so sampling never copies data between host
and device: one `sample(num_batches, batch_size)` call draws the index tensor for all the
updates of an environment step at once and gathers every field with a single indexing op each.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class Batch(NamedTuple):
    """Transitions, with leading dimensions (num_batches, batch_size) when drawn by `sample`."""

    obs: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    next_obs: torch.Tensor
    terminated: torch.Tensor  # float 1.0 where the episode truly ended (no bootstrap), else 0.0


class ReplayBuffer:
    """A circular buffer of (obs, action, reward, next_obs, terminated), uniformly sampled.

    Only `terminated` is stored: a time-limit truncation is not a terminal state, and the agent
    bootstraps through it from the stored `next_obs` (the true final observation).
    """

    def __init__(self, obs_dim: int, action_dim: int, capacity: int, device: torch.device | str = "cpu", seed: int = 0):
        if capacity < 1:
            raise ValueError(f"agent.buffer_size must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.device = torch.device(device)
        kw = dict(dtype=torch.float32, device=self.device)
        self.obs = torch.zeros((capacity, obs_dim), **kw)
        self.next_obs = torch.zeros((capacity, obs_dim), **kw)
        self.action = torch.zeros((capacity, action_dim), **kw)
        self.reward = torch.zeros((capacity,), **kw)
        self.terminated = torch.zeros((capacity,), **kw)
        self.pos = 0
        self.size = 0
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        """Bytes held by the storage tensors (what a full buffer costs in memory)."""
        fields = (self.obs, self.next_obs, self.action, self.reward, self.terminated)
        return sum(t.numel() * t.element_size() for t in fields)

    def add(self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray, terminated: bool) -> None:
        """Store one transition, overwriting the oldest once the buffer is full."""
        i = self.pos
        self.obs[i] = torch.as_tensor(obs, dtype=torch.float32)
        self.next_obs[i] = torch.as_tensor(next_obs, dtype=torch.float32)
        self.action[i] = torch.as_tensor(action, dtype=torch.float32)
        self.reward[i] = float(reward)
        self.terminated[i] = float(bool(terminated))
        self.pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, num_batches: int, batch_size: int) -> Batch:
        """Draw `num_batches` independent uniform batches (with replacement) from the filled slots."""
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        idx = torch.randint(0, self.size, (num_batches, batch_size), device=self.device, generator=self.generator)
        return Batch(self.obs[idx], self.action[idx], self.reward[idx], self.next_obs[idx], self.terminated[idx])

    def state_dict(self) -> dict:
        n = self.size
        return {
            "obs": self.obs[:n].clone(), "next_obs": self.next_obs[:n].clone(), "action": self.action[:n].clone(),
            "reward": self.reward[:n].clone(), "terminated": self.terminated[:n].clone(),
            "pos": self.pos, "size": self.size, "capacity": self.capacity,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"replay buffer capacity {state['capacity']} in checkpoint != agent.buffer_size {self.capacity}")
        n = state["size"]
        for name in ("obs", "next_obs", "action", "reward", "terminated"):
            getattr(self, name)[:n] = state[name].to(self.device)
        self.pos, self.size = state["pos"], n
        self.generator.set_state(state["generator"].cpu())
