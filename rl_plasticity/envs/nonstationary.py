"""What generic code (loops, logging, train, evaluate, envs/state.py) may ask of a non-stationary
env, without naming it.

A wrapper anywhere in an env's chain (`.env` links) that changes the task during training --
`SlipperyAnt` (friction), `ContinualTasks` (continual DMC) -- defines:

- `episode_metrics() -> dict[str, float]`: scalars logged at every episode end (`env/friction`,
  `env/task`), so that task changes are visible as steps in TensorBoard;
- `episode_tags`: those tags, each with its dashboard chart's title (a class attribute, so the
  dashboard is laid out before any episode ends);
- `follow(other)`: make this env (an evaluation env) hold the task that `other`, its training
  twin of the same class, is in now, so that evaluation measures the current task;
- `hold_saved(state)`: hold the task of a saved `state_dict()` (evaluating a checkpoint on the
  task training was in when it was written);
- `describe() -> dict`: what an evaluation records about the task it ran on (`friction`, `task`);
- `state_dict()` / `load_state_dict()` and `state_key`: its schedule, saved under `state_key` in
  a checkpoint's env state (`envs/state.py`).  An env made of one env per task (`ContinualTasks`)
  lists them in `envs`; envs/state.py saves each of them too, under `tasks`.

A wrapper whose tasks are a fixed set it can name (continual DMC's `env.tasks`; not Slippery Ant's
endless friction schedule) also defines `task_names() -> list[str]`, `hold_task_named(name)` and
`task` (the name of the task held now), so that an evaluation can run on every task
(`eval.all_tasks`).

The loops call `follow_training` before each evaluation and log `episode_metrics`; the dashboard
charts `episode_tags`; none of them names an env.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import gymnasium as gym


def _chain(env: Any) -> Iterator[Any]:
    while env is not None:
        yield env
        inner = getattr(env, "env", None)
        env = None if inner is env else inner


def find_nonstationary(env: gym.Env) -> Any | None:
    """The first wrapper in `env`'s chain that has `episode_metrics` and `follow`, or None."""
    for e in _chain(env):
        if hasattr(e, "episode_metrics") and hasattr(e, "follow"):
            return e
    return None


def episode_metrics(env: gym.Env) -> dict[str, float]:
    """The scalars `env` reports at an episode end ({} for a stationary env)."""
    w = find_nonstationary(env)
    return dict(w.episode_metrics()) if w is not None else {}


def metrics_source(env: gym.Env) -> Optional[Callable[[], dict[str, float]]]:
    """A callable giving `env`'s episode-end scalars, or None for a stationary env (the loops log
    nothing then and see no task changes)."""
    return (lambda: episode_metrics(env)) if find_nonstationary(env) is not None else None


def episode_tags(env: gym.Env) -> dict[str, str]:
    """{tag: chart title} of the scalars `env` reports at episode ends ({} for a stationary env)."""
    w = find_nonstationary(env)
    if w is None:
        return {}
    return dict(getattr(w, "episode_tags", None) or {tag: tag for tag in w.episode_metrics()})


def follow_training(eval_env: gym.Env, train_env: gym.Env) -> None:
    """Make `eval_env` hold the task `train_env` is in now; nothing for a stationary env, or when
    both are the same env."""
    target, source = find_nonstationary(eval_env), find_nonstationary(train_env)
    if target is not None and source is not None and target is not source:
        target.follow(source)


def task_names(env: gym.Env) -> list[str]:
    """The names of the tasks `env` can be held in for an evaluation (`eval.all_tasks`); [] for a
    stationary env or one whose tasks are not a fixed set (Slippery Ant's frictions)."""
    w = find_nonstationary(env)
    return list(w.task_names()) if w is not None and hasattr(w, "task_names") else []


def current_task_name(env: gym.Env) -> str | None:
    """The name of the task `env` holds now (one of `task_names(env)`), or None without such names."""
    return find_nonstationary(env).task if task_names(env) else None


def hold_task_named(env: gym.Env, name: str) -> None:
    """Make `env` hold the task called `name` (one of `task_names(env)`)."""
    find_nonstationary(env).hold_task_named(name)


def hold_saved_task(env: gym.Env, saved_envs: Optional[Sequence[Any]]) -> Any | None:
    """Make `env` hold the task of the first saved training env state (a checkpoint's `env`) that
    holds its schedule; returns its non-stationary wrapper (None for a stationary env)."""
    w = find_nonstationary(env)
    if w is None:
        return None
    for saved in saved_envs or []:
        if isinstance(saved, Mapping) and w.state_key in saved:
            w.hold_saved(saved[w.state_key])
            break
    return w


def is_task_collection(env: gym.Env) -> bool:
    """Whether `env` is a non-stationary env made of one env per task (each saved on its own)."""
    return find_nonstationary(env) is env and isinstance(getattr(env, "envs", None), list)
