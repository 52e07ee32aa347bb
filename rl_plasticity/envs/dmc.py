"""DeepMind Control suite (through shimmy) and plain gymnasium ids, behind one `make_env`.

Every env the package builds has the same face, whatever its source: flat float32
observations, a Box action space in [-1, 1], an optional action repeat, and seeding through
`reset(seed=...)`.  Episodes of DMC tasks end by *truncation* at 1000 steps (a time limit, not
a terminal state), so `terminated` and `truncated` are passed on untouched: only `terminated`
may stop bootstrapping.
"""
from __future__ import annotations

import difflib
import logging
import os
import warnings
from typing import Any, Mapping

import gymnasium as gym
import numpy as np

# dm_control picks a renderer at import time; with no display GLFW only warns and fails.
# EGL works headless (and is never touched unless something renders).
if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
    os.environ["MUJOCO_GL"] = "egl"


class _DropMjcfDeprecation(logging.Filter):
    """dm_control's own XML trips a MuJoCo deprecation notice at every env build; hide only that."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is deprecated and will be removed" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropMjcfDeprecation())


def _dmc_task_names() -> tuple[str, ...]:
    from dm_control import suite

    return tuple(f"{domain}-{task}" for domain, task in suite.ALL_TASKS)


DMC_TASKS: tuple[str, ...] = _dmc_task_names()
"""Every dm_control suite task as `<domain>-<task>`, e.g. `cheetah-run`, `finger-turn_hard`."""


class UnknownEnvError(ValueError):
    """An env name that is neither a DMC task nor a known kind; the message lists close matches."""


def unknown_env_message(name: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"unknown env '{name}'.{hint} Valid choices: {', '.join(sorted(choices))}"


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


def _standardise(env: gym.Env, action_repeat: int) -> gym.Env:
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


def make_dmc(domain: str, task: str, action_repeat: int = 1, render_size: tuple[int, int] | None = None,
             **make_kwargs: Any) -> gym.Env:
    """A dm_control suite task as a standardised gymnasium env (episode: 1000 physics steps).

    `render_size` (width, height) sets the size of `render()`'s frames; the model's offscreen
    buffer (640x480 in most suite XMLs) is enlarged first when the frames would not fit in it.
    """
    import shimmy  # noqa: F401  (registers the dm_control/* ids)

    gym.register_envs(shimmy)
    if render_size is not None:
        width, height = render_size
        make_kwargs["render_kwargs"] = {**(make_kwargs.get("render_kwargs") or {}), "width": width, "height": height}
    env = gym.make(f"dm_control/{domain}-{task}-v0", **make_kwargs)
    if render_size is not None:
        # dm_control sizes its rendering context from these on the first render.
        visual = env.unwrapped._env.physics.model.vis.global_
        visual.offwidth, visual.offheight = max(visual.offwidth, width), max(visual.offheight, height)
    return _standardise(env, action_repeat)


def _make_gym(env_id: str, render_size: tuple[int, int] | None, **make_kwargs: Any) -> gym.Env:
    """`gym.make`, passing `render_size` as MuJoCo's `width`/`height` where the env takes them."""
    if render_size is None:
        return gym.make(env_id, **make_kwargs)
    try:
        return gym.make(env_id, width=render_size[0], height=render_size[1], **make_kwargs)
    except TypeError as e:
        if "width" not in str(e) and "height" not in str(e):
            raise
    warnings.warn(f"{env_id} takes no width/height: it renders at its own size", stacklevel=3)
    return gym.make(env_id, **make_kwargs)


def make_env(cfg: Mapping[str, Any], *, render_mode: str | None = None, render_size: tuple[int, int] | None = None,
             **make_kwargs: Any) -> gym.Env:
    """Build the env described by an `env` config node (`kind` picks the source).

    `kind: dmc` needs `domain` and `task`; `kind: gym` needs a gymnasium `id`; `kind:
    slippery_ant` is MuJoCo Ant with a friction schedule (see `slippery_ant.py`); `kind:
    continual_dmc` cycles the DMC `tasks` of one domain (see `continual_dmc.py`).  `render_mode`
    (e.g. `rgb_array`) and `render_size` (width, height of the frames: DMC's `render_kwargs`,
    MuJoCo's `width`/`height`) set up rendering; other keyword arguments (e.g.
    `max_episode_steps`) go to `gym.make`.
    """
    if render_mode is not None:
        make_kwargs["render_mode"] = render_mode
    kind = cfg.get("kind", "dmc")
    repeat = int(cfg.get("action_repeat", 1))
    if kind == "dmc":
        name = f"{cfg['domain']}-{cfg['task']}"
        if name not in DMC_TASKS:
            raise UnknownEnvError(unknown_env_message(name, DMC_TASKS))
        return make_dmc(cfg["domain"], cfg["task"], repeat, render_size=render_size, **make_kwargs)
    if kind == "gym":
        env_id = cfg.get("id")
        if env_id not in gym.registry:
            raise UnknownEnvError(
                unknown_env_message(str(env_id), list(gym.registry.keys())).replace("env", "env.id", 1)
            )
        return _standardise(_make_gym(env_id, render_size, **make_kwargs), repeat)
    if kind == "slippery_ant":
        from rl_plasticity.envs.slippery_ant import make_slippery_ant

        if render_size is not None:
            make_kwargs.update(width=render_size[0], height=render_size[1])
        return make_slippery_ant(cfg, **make_kwargs)
    if kind == "continual_dmc":
        from rl_plasticity.envs.continual_dmc import make_continual_dmc

        return make_continual_dmc(cfg, render_size=render_size, **make_kwargs)
    raise UnknownEnvError(f"unknown env.kind '{kind}'. Valid choices: dmc, gym, slippery_ant, continual_dmc")
