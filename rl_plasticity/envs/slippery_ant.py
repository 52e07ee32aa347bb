"""Slippery Ant (Dohare et al. 2024): MuJoCo Ant whose ground friction changes now and then.

A continual-learning task for PPO.  The sliding friction of every geom is drawn log-uniformly
from [0.02, 2] and redrawn about every `change_every` environment steps (2M in the paper).  The
agent must re-learn to walk after each change, which is what exposes loss of plasticity.

Two choices keep runs reproducible and resumable:

* A change happens only at an episode end (the first one at or after step k * change_every), so
  one episode never mixes two frictions.
* Value i of the schedule is a pure function of (friction_seed, i), so a checkpoint needs only
  the step count and the schedule index (`state_dict`) to continue the very same schedule.

`friction=<float>` disables the schedule and fixes the friction, e.g. to evaluate a policy under
one friction.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import gymnasium as gym
import numpy as np

from rl_plasticity.config import ConfigError
from rl_plasticity.envs.standard import standardize

FRICTION_LOW = 0.02
FRICTION_HIGH = 2.0
DEFAULT_CHANGE_EVERY = 2_000_000


def friction_schedule(friction_seed: int, n: int) -> np.ndarray:
    """The first `n` frictions of the schedule for `friction_seed`: exp(U(log 0.02, log 2))."""
    rng = np.random.default_rng(friction_seed)
    logs = rng.uniform(math.log(FRICTION_LOW), math.log(FRICTION_HIGH), size=n)
    # exp(log(x)) may land one ulp outside the range.
    return np.clip(np.exp(logs), FRICTION_LOW, FRICTION_HIGH)


class _Schedule:
    """`friction_schedule(friction_seed, ...)` grown on demand.

    The cache is always rebuilt by `friction_schedule` itself (doubling its length), so value i
    is bit-for-bit the same however far the schedule has been drawn.
    """

    def __init__(self, friction_seed: int):
        self._seed = friction_seed
        self._values: list[float] = []

    def __getitem__(self, index: int) -> float:
        if index < 0:
            raise IndexError(f"schedule index must be >= 0, got {index}")
        if index >= len(self._values):
            n = max(index + 1, 2 * len(self._values), 64)
            self._values = friction_schedule(self._seed, n).tolist()
        return self._values[index]


def _as_int(value: Any) -> int | None:
    """`value` as an int if it is a whole number (not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        as_int = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return as_int if as_int == value else None


def _check_change_every(change_every: Any) -> int:
    value = _as_int(change_every)
    if value is None or value < 1:
        raise ConfigError(f"env.change_every must be >= 1, got {change_every}")
    return value


def _check_seed(friction_seed: Any) -> int:
    value = _as_int(friction_seed)
    if value is None or value < 0:
        raise ConfigError(f"env.friction_seed must be an integer >= 0, got {friction_seed}")
    return value


def _check_friction(friction: Any) -> float | None:
    if friction is None:
        return None
    try:
        value = float(friction)
    except (TypeError, ValueError):
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"env.friction must be > 0 or null, got {friction}")
    return value


class SlipperyAnt(gym.Wrapper):
    """Sets the sliding friction of every geom of a MuJoCo env, following a log-uniform schedule.

    Wrap it right around the MuJoCo env (time limit included, so that it sees truncations) and
    below any action repeat, so that `total_steps` counts raw environment steps.  Observations,
    rewards and infos pass through untouched.
    """

    def __init__(
        self,
        env: gym.Env,
        change_every: int = DEFAULT_CHANGE_EVERY,
        friction_seed: int = 0,
        friction: float | None = None,
    ):
        super().__init__(env)
        model = getattr(env.unwrapped, "model", None)
        if model is None or not hasattr(model, "geom_friction"):
            raise TypeError(f"SlipperyAnt needs a MuJoCo env with model.geom_friction, got {env.unwrapped}")
        self._change_every = _check_change_every(change_every)
        self._friction_seed = _check_seed(friction_seed)
        self._fixed = _check_friction(friction)
        self._schedule = _Schedule(self._friction_seed)
        self._total_steps = 0
        self._index = 0
        self._set_friction(self._fixed if self._fixed is not None else self._schedule[0])

    @property
    def friction(self) -> float:
        """The sliding friction now in force."""
        return self._friction

    @property
    def schedule_index(self) -> int:
        """Index of the schedule value in force (stays 0 under a fixed friction)."""
        return self._index

    @property
    def total_steps(self) -> int:
        """Environment steps taken through this wrapper, across episodes."""
        return self._total_steps

    @property
    def change_every(self) -> int:
        return self._change_every

    @property
    def friction_seed(self) -> int:
        return self._friction_seed

    def schedule_value(self, index: int) -> float:
        """Value `index` of this wrapper's friction schedule."""
        return self._schedule[index]

    # What generic code asks of a non-stationary env (envs/nonstationary.py).
    state_key = "slippery_ant"  # where envs/state.py saves `state_dict()` in a checkpoint's env state
    episode_tags = {"env/friction": "ground friction (Slippery Ant)"}  # episode_metrics' tags, chart titles

    def episode_metrics(self) -> dict[str, float]:
        return {"env/friction": self._friction}

    def follow(self, other: "SlipperyAnt") -> None:
        """Hold the friction `other` (the training env) has now."""
        self.hold_friction(other.friction)

    def hold_saved(self, state: Mapping[str, Any]) -> None:
        """Hold the friction of a saved `state_dict` (the training env's when a checkpoint was
        written), unless this env's config fixes its own friction (`env.friction`)."""
        if self._fixed is None:
            self.hold_friction(float(state["friction"]))

    def describe(self) -> dict[str, Any]:
        return {"friction": self._friction}

    def hold_friction(self, value: float) -> None:
        """Fix the friction at `value` from now on (the schedule stops): an evaluation env follows
        the training env's current friction this way."""
        self._fixed = _check_friction(value)
        self._set_friction(self._fixed)

    def _set_friction(self, value: float) -> None:
        self._friction = float(value)
        self.env.unwrapped.model.geom_friction[:, 0] = self._friction

    def reset(self, **kwargs):
        # The model outlives resets; re-writing is cheap and guards against anything that reloads it.
        self._set_friction(self._friction)
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._total_steps += 1
        if (terminated or truncated) and self._fixed is None:
            index = self._total_steps // self._change_every
            if index != self._index:
                self._index = index
                self._set_friction(self._schedule[index])
        return obs, reward, terminated, truncated, info

    def state_dict(self) -> dict[str, int | float | None]:
        """Plain ints/floats/None, safe for `torch.load(weights_only=True)`."""
        return {
            "total_steps": self._total_steps,
            "schedule_index": self._index,
            "friction_seed": self._friction_seed,
            "change_every": self._change_every,
            "fixed_friction": self._fixed,
            "friction": self._friction,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume a schedule saved by `state_dict`; the friction is applied to the model at once."""
        for key, mine in (
            ("friction_seed", self._friction_seed),
            ("change_every", self._change_every),
            ("fixed_friction", self._fixed),
        ):
            if state[key] != mine:
                name = "friction" if key == "fixed_friction" else key
                raise ConfigError(f"env.{name} of the saved state is {state[key]}, but this env has {mine}")
        self._total_steps = int(state["total_steps"])
        self._index = int(state["schedule_index"])
        self._set_friction(float(state["friction"]))


def find_slippery_ant(env: gym.Env) -> SlipperyAnt | None:
    """The SlipperyAnt wrapper inside a wrapped env (following `.env`), or None."""
    while env is not None:
        if isinstance(env, SlipperyAnt):
            return env
        env = getattr(env, "env", None)
    return None


def make_slippery_ant(cfg: Mapping[str, Any], num_envs: int = 1, **make_kwargs: Any) -> gym.Env:
    """Slippery Ant from an `env` config node (`id`, `change_every`, `friction_seed`, `friction`,
    `action_repeat`), standardised like every other env.  Extra keyword arguments go to `gym.make`.

    One of `num_envs` sub-envs counts only its own steps: its period is `change_every // num_envs`,
    so that the friction changes every `change_every` env steps in total."""
    change_every = cfg.get("change_every", DEFAULT_CHANGE_EVERY)
    if num_envs > 1 and "change_every" in cfg:
        change_every = max(1, int(change_every) // num_envs)
    env = SlipperyAnt(
        gym.make(cfg.get("id", "Ant-v5"), **make_kwargs),
        change_every=change_every,
        friction_seed=cfg.get("friction_seed", 0),
        friction=cfg.get("friction", None),
    )
    return standardize(env, int(cfg.get("action_repeat", 1)))
