"""DeepMind Control suite tasks (through shimmy) and plain gymnasium ids as standardised envs.

Every env the package builds has the same face, whatever its source: flat float32
observations, a Box action space in [-1, 1], an optional action repeat, and seeding through
`reset(seed=...)`.  Episodes of DMC tasks end by *truncation* at 1000 steps (a time limit, not
a terminal state), so `terminated` and `truncated` are passed on untouched: only `terminated`
may stop bootstrapping.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any

import gymnasium as gym

from rl_plasticity.envs.standard import standardize
from rl_plasticity.names import did_you_mean


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
    return f"unknown env '{name}'.{did_you_mean(name, choices)} Valid choices: {', '.join(sorted(choices))}"


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
    return standardize(env, action_repeat)


def make_gym(env_id: Any, action_repeat: int = 1, render_size: tuple[int, int] | None = None,
             **make_kwargs: Any) -> gym.Env:
    """A registered gymnasium id as a standardised env; an unknown id is an UnknownEnvError."""
    if env_id not in gym.registry:
        raise UnknownEnvError(unknown_env_message(str(env_id), list(gym.registry.keys())).replace("env", "env.id", 1))
    return standardize(_make_gym(env_id, render_size, **make_kwargs), action_repeat)


def _make_gym(env_id: str, render_size: tuple[int, int] | None, **make_kwargs: Any) -> gym.Env:
    """`gym.make`, passing `render_size` as MuJoCo's `width`/`height` where the env takes them."""
    if render_size is None:
        return gym.make(env_id, **make_kwargs)
    try:
        return gym.make(env_id, width=render_size[0], height=render_size[1], **make_kwargs)
    except TypeError as e:
        if "width" not in str(e) and "height" not in str(e):
            raise
    warnings.warn(f"{env_id} takes no width/height: it renders at its own size", stacklevel=5)
    return gym.make(env_id, **make_kwargs)
