"""Continual DMC: a cycle of DeepMind Control tasks of one domain, switched during training.

A non-stationary setting for SAC and PPO in the spirit of Slippery Ant (Dohare et al. 2024;
spectral-collapse-l2-er.md App. J), with the task instead of the friction changing: e.g.
`env.tasks=[walker-stand,walker-walk,walker-run]`, each held for `env.steps_per_task` agent steps,
then the next, cycling.  The tasks of one domain share the body, so observation and action
spaces are equal (checked at construction); only the reward changes, which is what forces the
networks to keep learning.

As for Slippery Ant, a switch happens only at an episode end (the first one at or after step
k * steps_per_task), so no episode mixes two tasks, and the schedule is a pure function of the
step count, so a checkpoint needs only the step count and the task index (`state_dict`).  Each
task's env is seeded from the run's seed (task j with seed + j) at the first seeded reset, and
each keeps its own random state from then on (saved by `envs/state.py`).
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import gymnasium as gym
from rl_plasticity.config import ConfigError

DEFAULT_STEPS_PER_TASK = 100_000


class ContinualTasks(gym.Env):
    """One standardised env per task; steps go to the current task's env (see the module doc)."""

    def __init__(self, names: Sequence[str], envs: Sequence[gym.Env], steps_per_task: int):
        if not envs:
            raise ConfigError("env.tasks must name at least one task")
        if isinstance(steps_per_task, bool) or not isinstance(steps_per_task, int) or steps_per_task < 1:
            raise ConfigError(f"env.steps_per_task must be an integer >= 1, got {steps_per_task!r}")
        first = envs[0]
        for name, env in zip(names[1:], envs[1:]):
            if env.observation_space.shape != first.observation_space.shape or env.action_space != first.action_space:
                raise ConfigError(f"env.tasks must share observation and action spaces (one domain): {names[0]} has "
                                  f"{first.observation_space.shape}/{first.action_space.shape}, {name} has "
                                  f"{env.observation_space.shape}/{env.action_space.shape}")
        self.names, self.envs = list(names), list(envs)
        self.observation_space, self.action_space = first.observation_space, first.action_space
        self.metadata = getattr(first, "metadata", {})
        self.render_mode = getattr(first, "render_mode", None)
        self.steps_per_task = steps_per_task
        self._total_steps = 0
        self._period = 0         # steps_per_task periods begun so far (the task is period % len(tasks))
        self._held: int | None = None  # a task fixed by `hold_task` (evaluation follows training)
        self._seeded = False

    @property
    def task_index(self) -> int:
        return self._held if self._held is not None else self._period % len(self.envs)

    @property
    def task(self) -> str:
        return self.names[self.task_index]

    @property
    def current(self) -> gym.Env:
        return self.envs[self.task_index]

    @property
    def total_steps(self) -> int:
        return self._total_steps

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is not None:
            for j, env in enumerate(self.envs):
                if env is not self.current:
                    env.reset(seed=seed + j)
            self._seeded = True
            return self.current.reset(seed=seed + self.task_index, options=options)
        return self.current.reset(options=options)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.current.step(action)
        self._total_steps += 1
        if (terminated or truncated) and self._held is None:
            self._period = self._total_steps // self.steps_per_task
        return obs, reward, terminated, truncated, info

    def render(self):
        return self.current.render()

    def close(self) -> None:
        for env in self.envs:
            env.close()

    # What generic code asks of a non-stationary env (envs/nonstationary.py).
    state_key = "continual"  # where envs/state.py saves `state_dict()`, beside each task's env state
    episode_tags = {"env/task": "task index (continual DMC)"}  # episode_metrics' tags, chart titles

    def episode_metrics(self) -> dict[str, float]:
        return {"env/task": float(self.task_index)}

    def follow(self, other: "ContinualTasks") -> None:
        """Hold the task `other` (the training env) is in now."""
        self.hold_task(other.task_index)

    def hold_saved(self, state: Mapping[str, Any]) -> None:
        """Hold the task of a saved `state_dict` (the training env's when a checkpoint was written)."""
        self.hold_task(state["held"] if state["held"] is not None else state["period"] % len(self.envs))

    def describe(self) -> dict[str, Any]:
        return {"task": self.task}

    def task_names(self) -> list[str]:
        """Each task once, in the order of `env.tasks` (`eval.all_tasks` evaluates on each)."""
        return list(dict.fromkeys(self.names))

    def hold_task_named(self, name: str) -> None:
        if name not in self.names:
            raise ConfigError(f"unknown task '{name}'. Valid choices: {', '.join(self.task_names())}")
        self.hold_task(self.names.index(name))

    def hold_task(self, index: int) -> None:
        if not 0 <= int(index) < len(self.envs):
            raise ConfigError(f"task index {index} out of range for env.tasks {self.names}")
        self._held = int(index)

    def state_dict(self) -> dict[str, Any]:
        """The schedule (plain numbers and strings); the tasks' env states are saved by envs/state.py."""
        return {"tasks": list(self.names), "steps_per_task": self.steps_per_task, "total_steps": self._total_steps,
                "period": self._period, "held": self._held}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, saved, mine in (("tasks", list(state["tasks"]), self.names),
                                 ("steps_per_task", state["steps_per_task"], self.steps_per_task)):
            if saved != mine:
                raise ConfigError(f"env.{key} of the saved state is {saved}, but this env has {mine}")
        self._total_steps, self._period, self._held = int(state["total_steps"]), int(state["period"]), state["held"]


def make_continual_dmc(cfg: Mapping[str, Any], render_size: tuple[int, int] | None = None, num_envs: int = 1,
                       **make_kwargs: Any) -> ContinualTasks:
    """Continual DMC from an `env` config node (`tasks`, `steps_per_task`, `action_repeat`).

    One of `num_envs` sub-envs counts only its own steps: its period is `steps_per_task //
    num_envs`, so that the task switches every `steps_per_task` agent steps in total."""
    from rl_plasticity.envs.dmc import DMC_TASKS, UnknownEnvError, make_dmc, unknown_env_message

    tasks = cfg.get("tasks")
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks:
        raise ConfigError(f"env.tasks must be a non-empty list of DMC tasks of one domain, got {tasks!r}")
    for name in tasks:
        if name not in DMC_TASKS:
            raise UnknownEnvError(unknown_env_message(str(name), DMC_TASKS).replace("env", "env.tasks entry", 1))
    repeat = int(cfg.get("action_repeat", 1))
    steps = cfg.get("steps_per_task", DEFAULT_STEPS_PER_TASK)
    if num_envs > 1 and "steps_per_task" in cfg:
        steps = max(1, int(steps) // num_envs)
    episode = -(-1000 // repeat)  # agent steps of a DMC episode (1000 physics-control steps)
    if isinstance(steps, int) and 1 <= steps < episode:
        warnings.warn(f"env.steps_per_task={steps} is shorter than an episode ({episode} agent steps): a switch "
                      f"comes only at an episode end, so some tasks of the cycle are skipped", stacklevel=2)
    envs = [make_dmc(*name.split("-", 1), repeat, render_size=render_size, **make_kwargs) for name in tasks]
    return ContinualTasks(list(tasks), envs, steps)

