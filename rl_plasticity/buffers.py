"""Experience storage: a replay buffer for off-policy agents, a rollout buffer and GAE for PPO.

The replay buffer is preallocated on the training device, so sampling never copies data between
host and device: one `sample(num_batches, batch_size)` call draws the index tensor for all the
updates of an environment step at once and gathers every field with a single indexing op each.

The rollout buffer holds one on-policy rollout of `steps × num_envs` transitions on the host
(where the environments are) and hands it to the agent's device once per iteration.
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

    def probe(self, batch_size: int, seed: int) -> Batch:
        """A fixed batch for diagnostics, drawn with its own generator so that drawing it never
        changes the training batches."""
        g = torch.Generator(device=self.device).manual_seed(int(seed) + 7919)
        idx = torch.randint(0, self.size, (batch_size,), device=self.device, generator=g)
        return Batch(self.obs[idx], self.action[idx], self.reward[idx], self.next_obs[idx], self.terminated[idx])

    def state_dict(self) -> dict:
        """The filled part of the storage, as *views* (no copy): saving a checkpoint does not need
        a second buffer's worth of memory.  (torch.save writes each field's whole storage, so the
        file holds `capacity` rows; the views must be saved before the buffer changes again.)"""
        n = self.size
        return {
            "obs": self.obs[:n], "next_obs": self.next_obs[:n], "action": self.action[:n],
            "reward": self.reward[:n], "terminated": self.terminated[:n],
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


def compute_gae(rewards: np.ndarray, values: np.ndarray, next_values: np.ndarray, terminated: np.ndarray,
                ended: np.ndarray, gamma: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation over arrays of shape (T, num_envs).

    `next_values[t]` is V of the state after step t: of the next observation while the episode
    goes on, of the *final* observation at a truncation (a time limit is not a terminal state, so
    the value is bootstrapped through it), ignored at a termination.  `ended[t]` (terminated or
    truncated) cuts the recursion, so advantages never leak across episodes:

        δ_t = r_t + γ (1 − terminated_t) V'_t − V_t,      A_t = δ_t + γ λ (1 − ended_t) A_{t+1}.

    Returns (advantages, returns = advantages + values).
    """
    T = rewards.shape[0]
    not_terminal = 1.0 - terminated.astype(np.float64)
    carry = 1.0 - ended.astype(np.float64)
    deltas = rewards + gamma * not_terminal * next_values - values
    advantages = np.zeros(rewards.shape, dtype=np.float64)
    last = np.zeros(rewards.shape[1:], dtype=np.float64)
    for t in range(T - 1, -1, -1):
        last = deltas[t] + gamma * lam * carry[t] * last
        advantages[t] = last
    return advantages.astype(np.float32), (advantages + values).astype(np.float32)


class RolloutBuffer:
    """One rollout of `steps` vector steps of `num_envs` environments, filled step by step."""

    def __init__(self, steps: int, num_envs: int, obs_dim: int, action_dim: int):
        self.steps, self.num_envs = steps, num_envs
        self.obs = np.zeros((steps, num_envs, obs_dim), dtype=np.float32)
        self.action = np.zeros((steps, num_envs, action_dim), dtype=np.float32)
        self.log_prob = np.zeros((steps, num_envs), dtype=np.float32)
        self.value = np.zeros((steps, num_envs), dtype=np.float32)
        self.next_value = np.zeros((steps, num_envs), dtype=np.float32)
        self.reward = np.zeros((steps, num_envs), dtype=np.float32)
        self.terminated = np.zeros((steps, num_envs), dtype=bool)
        self.ended = np.zeros((steps, num_envs), dtype=bool)
        self.pos = 0

    def add(self, obs: np.ndarray, action: np.ndarray, log_prob: np.ndarray, value: np.ndarray,
            reward: np.ndarray, terminated: np.ndarray, truncated: np.ndarray) -> None:
        t = self.pos
        self.obs[t], self.action[t], self.log_prob[t], self.value[t] = obs, action, log_prob, value
        self.reward[t], self.terminated[t] = reward, terminated
        self.ended[t] = np.logical_or(terminated, truncated)
        self.pos += 1

    _FIELDS = ("obs", "action", "log_prob", "value", "next_value", "reward", "terminated", "ended")

    def state_dict(self) -> dict:
        """A partly collected rollout (a checkpoint taken mid-rollout continues it)."""
        return {"pos": self.pos, **{k: torch.from_numpy(getattr(self, k)[: self.pos].copy()) for k in self._FIELDS}}

    def load_state_dict(self, state: dict) -> None:
        self.pos = int(state["pos"])
        for k in self._FIELDS:
            getattr(self, k)[: self.pos] = state[k].numpy()

    def finish(self, last_value: np.ndarray, final_values: dict[tuple[int, int], float], gamma: float,
               lam: float) -> dict[str, np.ndarray]:
        """Advantages and returns of the first `pos` steps, flattened to (pos·num_envs, ...).

        `last_value` is V of the observations after the last step; `final_values[(t, env)]` is V
        of the final observation of an episode truncated at step t.
        """
        T = self.pos
        nv = self.next_value[:T]
        nv[:-1] = self.value[1:T]
        nv[-1] = last_value
        for (t, i), v in final_values.items():
            nv[t, i] = v
        adv, ret = compute_gae(self.reward[:T], self.value[:T], nv, self.terminated[:T], self.ended[:T], gamma, lam)
        flat = lambda a: a.reshape(T * self.num_envs, *a.shape[2:])  # noqa: E731
        out = {"obs": flat(self.obs[:T]), "action": flat(self.action[:T]), "log_prob": flat(self.log_prob[:T]),
               "value": flat(self.value[:T]), "advantage": flat(adv), "return": flat(ret)}
        self.pos = 0
        return out
