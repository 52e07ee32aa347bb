"""Interaction loops: step the env, fill the buffer, ask the agent to update, report.

A loop never touches parameters (the agent does) and never opens files (the logger and the
checkpoint callback do); it only decides *when* things happen.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import gymnasium as gym
import numpy as np
import torch

from rl_plasticity.buffers import Batch, ReplayBuffer
from rl_plasticity.logging import Logger, RateMeter


class OffPolicyAgent(Protocol):
    update_count: int

    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray: ...

    def update(self, batch: Batch) -> dict[str, torch.Tensor]: ...


@dataclasses.dataclass
class OffPolicySchedule:
    """When things happen, in environment steps."""

    total_steps: int
    prefill_steps: int
    replay_ratio: int
    batch_size: int
    eval_every: int
    eval_episodes: int
    log_every: int
    checkpoint_every: int
    seed: int


def evaluate(agent: OffPolicyAgent, env: gym.Env, episodes: int, seed: int) -> np.ndarray:
    """Returns of `episodes` episodes of the deterministic policy; episode k resets with seed+k,
    so the result depends only on the policy and `seed`."""
    returns = np.zeros(episodes)
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + k)
        done = False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(agent.act(obs, deterministic=True))
            returns[k] += float(reward)
            done = terminated or truncated
    return returns


def run_off_policy(agent: OffPolicyAgent, buffer: ReplayBuffer, env: gym.Env, eval_env: gym.Env, logger: Logger,
                   schedule: OffPolicySchedule, save_checkpoint: Callable[[int], None]) -> dict[str, float]:
    """Prefill with uniform random actions, then act and run `replay_ratio` updates per env step.

    Returns the last evaluation's summary (empty if none ran).
    """
    s = schedule
    env.action_space.seed(s.seed)
    obs, _ = env.reset(seed=s.seed)
    episode_return, episode_length = 0.0, 0
    metrics: dict[str, torch.Tensor] = {}
    last_eval: dict[str, float] = {}
    meter = RateMeter(0, agent.update_count)
    for step in range(1, s.total_steps + 1):
        if step <= s.prefill_steps:
            action = env.action_space.sample()
        else:
            action = agent.act(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        # `next_obs` is the true next observation also at a truncation, so bootstrapping from it
        # is right; only `terminated` is stored as a terminal flag.
        buffer.add(obs, action, reward, next_obs, terminated)
        episode_return += float(reward)
        episode_length += 1
        if terminated or truncated:
            logger.episode(episode_return, episode_length, step)
            obs, _ = env.reset()
            episode_return, episode_length = 0.0, 0
        else:
            obs = next_obs

        if step >= s.prefill_steps:
            metrics = agent.update(buffer.sample(s.replay_ratio, s.batch_size))

        if step % s.log_every == 0 or step == s.total_steps:
            sps, ups = meter.rates(step, agent.update_count)
            logger.scalars(metrics, step)  # the only host sync of the update metrics
            logger.scalar("charts/sps", sps, step)
            logger.scalar("charts/updates_per_s", ups, step)
            logger.progress(step, sps, ups, meter.elapsed, 0)
        if s.eval_episodes > 0 and (step % s.eval_every == 0 or step == s.total_steps):
            returns = evaluate(agent, eval_env, s.eval_episodes, s.seed + 1_000_000)
            last_eval = {"eval/return_mean": float(returns.mean()), "eval/return_std": float(returns.std())}
            logger.scalars(last_eval, step)
            logger.flush()
        if step % s.checkpoint_every == 0 or step == s.total_steps:
            save_checkpoint(step)
    return last_eval
