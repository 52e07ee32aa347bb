"""One env factory: `make_env` builds the env an `env` config node describes, by its `kind`.

Each kind is a builder in `KINDS` taking the config node, the render size, the number of
sub-envs the env is one of (`num_envs`) and `gym.make` keyword arguments.  A new kind -- a new
non-stationary env, say -- is one module with its builder and wrapper (envs/nonstationary.py
says what the wrapper provides) plus one entry here and a YAML in configs/env/.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import gymnasium as gym

from rl_plasticity.envs.continual_dmc import make_continual_dmc
from rl_plasticity.envs.dmc import DMC_TASKS, UnknownEnvError, make_dmc, make_gym, unknown_env_message
from rl_plasticity.envs.slippery_ant import make_slippery_ant


def _dmc(cfg: Mapping[str, Any], render_size: tuple[int, int] | None = None, num_envs: int = 1,
         **make_kwargs: Any) -> gym.Env:
    name = f"{cfg['domain']}-{cfg['task']}"
    if name not in DMC_TASKS:
        raise UnknownEnvError(unknown_env_message(name, DMC_TASKS))
    return make_dmc(cfg["domain"], cfg["task"], int(cfg.get("action_repeat", 1)), render_size=render_size,
                    **make_kwargs)


def _gym(cfg: Mapping[str, Any], render_size: tuple[int, int] | None = None, num_envs: int = 1,
         **make_kwargs: Any) -> gym.Env:
    return make_gym(cfg.get("id"), int(cfg.get("action_repeat", 1)), render_size=render_size, **make_kwargs)


def _slippery_ant(cfg: Mapping[str, Any], render_size: tuple[int, int] | None = None, num_envs: int = 1,
                  **make_kwargs: Any) -> gym.Env:
    if render_size is not None:
        make_kwargs.update(width=render_size[0], height=render_size[1])
    return make_slippery_ant(cfg, num_envs=num_envs, **make_kwargs)


KINDS: dict[str, Callable[..., gym.Env]] = {
    "dmc": _dmc,                        # `domain`, `task`: a dm_control suite task
    "gym": _gym,                        # `id`: any gymnasium id with a bounded Box action space
    "slippery_ant": _slippery_ant,      # MuJoCo Ant with a friction schedule (slippery_ant.py)
    "continual_dmc": make_continual_dmc,  # a cycle of the DMC `tasks` of one domain (continual_dmc.py)
}


def make_env(cfg: Mapping[str, Any], *, num_envs: int = 1, render_mode: str | None = None,
             render_size: tuple[int, int] | None = None, **make_kwargs: Any) -> gym.Env:
    """Build the env described by an `env` config node (`kind` picks the builder in `KINDS`).

    `num_envs` > 1: the env is one of that many sub-envs of a vector env; each counts its own
    steps, so a kind whose schedule is counted in env steps (Slippery Ant's `change_every`,
    continual DMC's `steps_per_task`) divides it by `num_envs`, and changes still come every
    `change_every` env steps in total.  `render_mode` (e.g. `rgb_array`) and `render_size` (width,
    height of the frames: DMC's `render_kwargs`, MuJoCo's `width`/`height`) set up rendering;
    other keyword arguments (e.g. `max_episode_steps`) go to `gym.make`.
    """
    if render_mode is not None:
        make_kwargs["render_mode"] = render_mode
    kind = cfg.get("kind", "dmc")
    if kind not in KINDS:
        raise UnknownEnvError(f"unknown env.kind '{kind}'. Valid choices: {', '.join(KINDS)}")
    return KINDS[kind](cfg, render_size=render_size, num_envs=num_envs, **make_kwargs)


def make_vector_env(cfg: Mapping[str, Any], num_envs: int) -> gym.vector.SyncVectorEnv:
    """`num_envs` copies of the env (`make_env(cfg, num_envs=num_envs)`) stepped as one vector env
    that resets a finished sub-env within the same step (gymnasium's SAME_STEP autoreset)."""
    make_env(cfg, num_envs=num_envs).close()  # surfaces a bad env config as one error before the vector env starts
    return gym.vector.SyncVectorEnv([lambda: make_env(cfg, num_envs=num_envs) for _ in range(num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
