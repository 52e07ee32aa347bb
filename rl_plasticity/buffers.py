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
    """A circular buffer of (obs, action, reward, next_obs, terminated), uniformly sampled, that
    stores each observation once.

    Row `i` of `obs` holds the observation of transition `i`.  While an episode goes on, the next
    observation of transition `i` *is* the observation of transition `i + 1`, so it is not stored
    again: `_next[i]` points at obs row `i + 1` (mod capacity).  The observations that have no
    following transition in the same episode (the final observation at a termination or a
    truncation, and the next observation of the newest transition, not yet confirmed) live in a
    small ring `_final_obs`, and `_next[i] = capacity + k` points at its row `k`.  Sampling
    gathers `_next` and then the next observation from both stores with one `where`; no host sync.

    Continuation is detected, not trusted from flags: an `add()` continues the previous one when its
    `obs` is bitwise equal to the previous `next_obs`.  Then the previous transition is re-pointed
    at the new obs row and the pending final row is freed; otherwise it stays a final.  A
    transition's next obs row belongs to a newer transition, which is overwritten after it, so a
    sampleable transition never points at an overwritten row.  Final rows are freed in the order
    they were taken (oldest when their transition is overwritten, newest on continuation), so the
    ring holds at most one row per stored transition: memory stays bounded by `capacity` for any
    episode length, and is about one observation per episode (plus one) for long episodes.

    Only `terminated` is stored: a time-limit truncation is not a terminal state, and the agent
    bootstraps through it from `next_obs` (the true final observation).
    """

    _INITIAL_FINALS = 64  # rows of the final-observation ring at first; it doubles when full

    def __init__(self, obs_dim: int, action_dim: int, capacity: int, device: torch.device | str = "cpu", seed: int = 0):
        if capacity < 1:
            raise ValueError(f"agent.buffer_size must be >= 1, got {capacity}")
        self.capacity = capacity = int(capacity)
        self.obs_dim, self.action_dim = int(obs_dim), int(action_dim)
        self.device = torch.device(device)
        kw = dict(dtype=torch.float32, device=self.device)
        self.obs = torch.zeros((capacity, obs_dim), **kw)
        self.action = torch.zeros((capacity, action_dim), **kw)
        self.reward = torch.zeros((capacity,), **kw)
        self.terminated = torch.zeros((capacity,), **kw)
        # Row of transition i's next observation: < capacity in `obs`, else `capacity + k` in `_final_obs`.
        index_dtype = torch.int32 if 2 * capacity < 2**31 else torch.int64
        self._next = torch.zeros((capacity,), dtype=index_dtype, device=self.device)
        self._set_finals(torch.zeros((min(capacity, self._INITIAL_FINALS), obs_dim), **kw), 0, 0,
                         np.zeros(min(capacity, self._INITIAL_FINALS), dtype=np.int64))
        self._last_next_obs: torch.Tensor | None = None  # host copy of the previous add()'s next_obs
        self.pos = 0
        self.size = 0
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))

    def _set_finals(self, rows: torch.Tensor, head: int, count: int, owner: np.ndarray) -> None:
        """The ring of final observations: `count` rows in use from `head` (oldest first);
        `_final_owner[k]` (host) is the slot of the transition whose next obs is row k."""
        self._final_obs, self._final_head, self._final_count, self._final_owner = rows, head, count, owner

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        """Bytes held by the storage tensors (what the buffer costs in memory now; the ring of
        final observations grows with the number of stored episodes, up to `capacity` rows)."""
        fields = (self.obs, self.action, self.reward, self.terminated, self._next, self._final_obs)
        return sum(t.numel() * t.element_size() for t in fields)

    @staticmethod
    def _host(x: np.ndarray | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(x, dtype=torch.float32).detach().cpu().reshape(-1)

    def _grow_finals(self) -> None:
        """Double the ring (it is full), copying its rows oldest first and re-pointing their owners."""
        old, h, c = self._final_obs.shape[0], self._final_head, self._final_count
        order = (np.arange(c) + h) % old
        rows = torch.zeros((min(self.capacity, 2 * old), self.obs_dim), dtype=torch.float32, device=self.device)
        rows[:c] = self._final_obs[torch.as_tensor(order, device=self.device)]
        owner = np.zeros(rows.shape[0], dtype=np.int64)
        owner[:c] = self._final_owner[order]
        self._next[torch.as_tensor(owner[:c], device=self.device)] = torch.arange(
            self.capacity, self.capacity + c, dtype=self._next.dtype, device=self.device)
        self._set_finals(rows, 0, c, owner)

    def add(self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray, terminated: bool) -> None:
        """Store one transition, overwriting the oldest once the buffer is full."""
        i, cap = self.pos, self.capacity
        obs_t, next_t = self._host(obs), self._host(next_obs)
        continues = self._last_next_obs is not None and torch.equal(obs_t.view(torch.int32),
                                                                    self._last_next_obs.view(torch.int32))
        full = self.size == cap
        ring = self._final_obs.shape[0]
        if full and self._final_count and self._final_owner[self._final_head] == i:
            self._final_head, self._final_count = (self._final_head + 1) % ring, self._final_count - 1
        if continues and not (full and cap == 1):  # the previous transition is still stored
            prev = (i - 1) % cap
            assert self._final_owner[(self._final_head + self._final_count - 1) % ring] == prev
            self._final_count -= 1  # its pending final row is the newest one
            self._next[prev] = i
        self.obs[i] = obs_t
        self.action[i] = torch.as_tensor(action, dtype=torch.float32)
        self.reward[i] = float(reward)
        self.terminated[i] = float(bool(terminated))
        if self._final_count == self._final_obs.shape[0]:
            self._grow_finals()
        k = (self._final_head + self._final_count) % self._final_obs.shape[0]
        self._final_obs[k] = next_t
        self._final_owner[k] = i
        self._final_count += 1
        self._next[i] = cap + k
        self._last_next_obs = next_t.clone()  # the caller may reuse its array
        self.pos = (i + 1) % cap
        self.size = min(self.size + 1, cap)

    def _gather(self, idx: torch.Tensor) -> Batch:
        cap = self.capacity
        j = self._next[idx].long()
        is_final = (j >= cap).unsqueeze(-1)
        next_obs = torch.where(is_final, self._final_obs[(j - cap).clamp_(min=0)], self.obs[j.clamp(max=cap - 1)])
        return Batch(self.obs[idx], self.action[idx], self.reward[idx], next_obs, self.terminated[idx])

    def sample(self, num_batches: int, batch_size: int) -> Batch:
        """Draw `num_batches` independent uniform batches (with replacement) from the filled slots."""
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        idx = torch.randint(0, self.size, (num_batches, batch_size), device=self.device, generator=self.generator)
        return self._gather(idx)

    def probe(self, batch_size: int, seed: int) -> Batch:
        """A fixed batch for diagnostics, drawn with its own generator so that drawing it never
        changes the training batches."""
        g = torch.Generator(device=self.device).manual_seed(int(seed) + 7919)
        idx = torch.randint(0, self.size, (batch_size,), device=self.device, generator=g)
        return self._gather(idx)

    def recent(self, n: int) -> Batch:
        """The `n` newest transitions, oldest first (e.g. the first `n` transitions of a new task,
        for the curvature diagnostics at a task start)."""
        if not 1 <= n <= self.size:
            raise ValueError(f"cannot take the {n} newest transitions of a buffer holding {self.size}")
        idx = (torch.arange(self.pos - n, self.pos, device=self.device) % self.capacity)
        return self._gather(idx)

    def state_dict(self) -> dict:
        """The filled part of the storage, as *views* (no copy): saving a checkpoint does not need
        a second buffer's worth of memory.  The views must be saved before the buffer changes
        again; `checkpoint.own_storage` trims them to their own bytes, so that the file holds the
        filled rows only (torch.save writes a view's whole storage)."""
        n = self.size
        return {
            "layout": "shared_obs", "obs": self.obs[:n], "action": self.action[:n], "reward": self.reward[:n],
            "terminated": self.terminated[:n], "next_index": self._next[:n], "final_obs": self._final_obs,
            "final_head": self._final_head, "final_count": self._final_count,
            "pos": self.pos, "size": self.size, "capacity": self.capacity,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; also reads the previous layout (an `obs` and a `next_obs` row
        per transition), which it converts."""
        if state["capacity"] != self.capacity:
            raise ValueError(f"replay buffer capacity {state['capacity']} in checkpoint != agent.buffer_size {self.capacity}")
        n, dims = state["size"], (tuple(state["obs"].shape[1:]), tuple(state["action"].shape[1:]))
        if dims != ((self.obs_dim,), (self.action_dim,)):
            raise ValueError(f"replay buffer in checkpoint holds (obs, action) dims {dims}, this run "
                             f"({self.obs_dim}, {self.action_dim})")
        for name in ("obs", "action", "reward", "terminated"):
            getattr(self, name)[:n] = state[name].to(self.device)
        self.pos, self.size = state["pos"], n
        if "next_obs" in state:
            self._convert_previous_layout(state["obs"].cpu(), state["next_obs"].cpu())
        else:
            self._next[:n] = state["next_index"].to(self.device)
            rows = state["final_obs"].to(self.device, dtype=torch.float32, copy=True)
            next_index = state["next_index"].cpu().long()
            owners = torch.nonzero(next_index >= self.capacity).squeeze(1)
            owner = np.zeros(rows.shape[0], dtype=np.int64)
            owner[(next_index[owners] - self.capacity).numpy()] = owners.numpy()
            self._set_finals(rows, int(state["final_head"]), int(state["final_count"]), owner)
        self._last_next_obs = None
        if n:
            newest = int(self._next[(self.pos - 1) % self.capacity]) - self.capacity
            self._last_next_obs = self._final_obs[newest].cpu().clone()
        self.generator.set_state(state["generator"].cpu())

    def _convert_previous_layout(self, obs: torch.Tensor, next_obs: torch.Tensor) -> None:
        """Build the pointers and final rows from per-transition (obs, next_obs) rows: a transition
        continues into its successor when its next_obs is bitwise equal to the successor's obs."""
        n, cap = self.size, self.capacity
        order = (torch.arange(n) + (self.pos - n)) % cap  # slots, oldest first
        cur, succ = order[:-1], order[1:]
        continues = torch.zeros(n, dtype=torch.bool)
        continues[:-1] = (next_obs[cur].view(torch.int32) == obs[succ].view(torch.int32)).all(dim=1)
        ends = order[~continues]  # oldest first, so ring rows 0.. in order
        c = len(ends)
        size = min(cap, max(self._INITIAL_FINALS, 1 << max(c - 1, 0).bit_length()))
        rows = torch.zeros((size, self.obs_dim), dtype=torch.float32)
        rows[:c] = next_obs[ends]
        next_index = torch.zeros(n, dtype=torch.int64)
        next_index[cur[continues[:-1]]] = succ[continues[:-1]]
        next_index[ends] = torch.arange(cap, cap + c)
        self._next[:n] = next_index.to(self.device, self._next.dtype)
        owner = np.zeros(size, dtype=np.int64)
        owner[:c] = ends.numpy()
        self._set_finals(rows.to(self.device), 0, c, owner)


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
