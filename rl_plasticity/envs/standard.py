"""The one face every env of the package has: flat float32 observations, a Box action space in
[-1, 1], an optional action repeat.  Each kind of env (envs/registry.py) ends with `standardize`."""
from __future__ import annotations

import gymnasium as gym
import numpy as np


class ActionRepeat(gym.Wrapper):
    """Repeat each action `repeat` times, summing rewards and stopping at an episode end."""

    def __init__(self, env: gym.Env, repeat: int):
        super().__init__(env)
        if repeat < 1:
            raise ValueError(f"env.action_repeat must be >= 1, got {repeat}")
        self.repeat = repeat

    def step(self, action):
        total = 0.0
        for _ in range(self.repeat):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, info


def standardize(env: gym.Env, action_repeat: int = 1) -> gym.Env:
    """Flat float32 observations, actions in [-1, 1], optional action repeat."""
    if isinstance(env.observation_space, gym.spaces.Dict) or len(env.observation_space.shape) != 1:
        env = gym.wrappers.FlattenObservation(env)
    if env.observation_space.dtype != np.float32:
        space = env.observation_space
        big = np.finfo(np.float32).max
        low = np.clip(space.low, -big, big).astype(np.float32)
        high = np.clip(space.high, -big, big).astype(np.float32)
        low[np.isneginf(space.low)], high[np.isposinf(space.high)] = -np.inf, np.inf
        env = gym.wrappers.TransformObservation(
            env, lambda o: np.asarray(o, dtype=np.float32), gym.spaces.Box(low, high, dtype=np.float32)
        )
    space = env.action_space
    if not isinstance(space, gym.spaces.Box):
        raise ValueError(f"only continuous (Box) action spaces are supported, got {space}")
    if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        raise ValueError(f"action space must be bounded to rescale it to [-1, 1], got {space}")
    if not (np.allclose(space.low, -1) and np.allclose(space.high, 1)):
        env = gym.wrappers.RescaleAction(env, np.float32(-1.0), np.float32(1.0))
    if action_repeat != 1:
        env = ActionRepeat(env, action_repeat)
    return env
