"""Save and restore an environment in the middle of an episode, for exact resumption.

A resumed run must continue the same episode the interrupted run was in, bit for bit.  For the
envs this package builds that means: the MuJoCo integration state (time, positions, velocities,
actuator state, solver warm start, controls) whether it sits in a gymnasium MuJoCo env or a
dm_control suite task; dm_control's step counter and task random state; the time limit's step
count; a non-stationary env's schedule (envs/nonstationary.py: Slippery Ant's frictions, continual
DMC's tasks, each of whose envs is saved too); the env's own random generator (reset noise); and,
for classic gymnasium envs, their `state` array.  Everything is stored as tensors, numbers and strings so it
travels inside a `weights_only` checkpoint.

`capture_env` reports `exact: False` for an env it does not know how to restore; such an env is
reset at resumption instead (the loop says so).
"""
from __future__ import annotations

from typing import Any, Iterator

import gymnasium as gym
import numpy as np
import torch

from rl_plasticity.checkpoint import numpy_rng_from_torch, numpy_rng_to_torch
from rl_plasticity.envs.nonstationary import find_nonstationary, is_task_collection


_DERIVED = ("xpos", "xquat", "xmat", "xipos", "ximat", "cfrc_ext", "cinert", "cvel", "subtree_com", "qfrc_actuator",
            "sensordata", "qacc", "actuator_force")


def _chain(env: gym.Env) -> Iterator[gym.Env]:
    e: Any = env
    while True:
        yield e
        inner = getattr(e, "env", None)
        if inner is None or inner is e:
            return
        e = inner


def _mujoco_handles(unwrapped: Any) -> tuple[Any, Any, Any] | None:
    """(MjModel, MjData, dm_control Environment or None) of a MuJoCo-backed env, else None."""
    dm_env = getattr(unwrapped, "_env", None)
    physics = getattr(dm_env, "physics", None)
    if physics is not None and hasattr(physics, "model") and hasattr(physics.model, "ptr"):
        return physics.model.ptr, physics.data.ptr, dm_env
    model, data = getattr(unwrapped, "model", None), getattr(unwrapped, "data", None)
    if model is not None and data is not None and hasattr(model, "nq"):
        return model, data, None
    return None


def capture_env(env: gym.Env) -> dict[str, Any]:
    """Everything needed to continue `env` from where it is (see the module docstring)."""
    schedule = find_nonstationary(env)
    if is_task_collection(env):  # the schedule, and every task's env (each keeps its own state)
        tasks = [capture_env(e) for e in env.envs]  # type: ignore[attr-defined]
        return {"exact": all(t["exact"] for t in tasks), schedule.state_key: schedule.state_dict(), "tasks": tasks}
    state: dict[str, Any] = {"exact": False}
    for w in _chain(env):
        if isinstance(w, gym.wrappers.TimeLimit):
            state["time_limit"] = int(w._elapsed_steps) if w._elapsed_steps is not None else None
    if schedule is not None:
        state[schedule.state_key] = schedule.state_dict()
    unwrapped = env.unwrapped
    rng = getattr(unwrapped, "_np_random", None)
    if rng is not None:
        state["np_random"] = rng.bit_generator.state
    handles = _mujoco_handles(unwrapped)
    if handles is not None:
        import mujoco

        model, data, dm_env = handles
        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        buf = np.empty(mujoco.mj_stateSize(model, spec), dtype=np.float64)
        mujoco.mj_getState(model, data, buf, spec)
        state["mujoco"] = torch.from_numpy(buf)
        # Quantities MuJoCo derives from positions are left one step stale by mj_step (they are
        # computed before integrating), and reward functions read them (Ant: torso position
        # before the step): keep them as they are rather than recomputing them.
        state["mujoco_derived"] = {k: torch.from_numpy(np.array(getattr(data, k), copy=True)) for k in _DERIVED}
        if dm_env is not None:
            state["dm_control"] = {"step_count": int(dm_env._step_count),
                                   "reset_next_step": bool(dm_env._reset_next_step),
                                   "task_random": numpy_rng_to_torch(dm_env.task.random.get_state())}
        state["exact"] = True
    elif isinstance(getattr(unwrapped, "state", None), np.ndarray):
        state["classic_state"] = torch.from_numpy(np.array(unwrapped.state, copy=True))
        state["exact"] = True
    return state


def restore_env(env: gym.Env, state: dict[str, Any]) -> bool:
    """Put a freshly built `env` into `state`; returns whether the restoration is exact.

    The env is reset first (wrappers that insist on a reset before the first step are then
    satisfied), and everything the reset touched is overwritten from `state`.
    """
    schedule = find_nonstationary(env)
    if is_task_collection(env):
        if schedule.state_key not in state:
            env.reset()
            return False
        schedule.load_state_dict(state[schedule.state_key])
        return all([restore_env(e, s) for e, s in zip(env.envs, state["tasks"])])  # type: ignore[attr-defined]
    env.reset()
    for w in _chain(env):
        if isinstance(w, gym.wrappers.TimeLimit) and "time_limit" in state:
            w._elapsed_steps = state["time_limit"]
    if schedule is not None and schedule.state_key in state:
        schedule.load_state_dict(state[schedule.state_key])
    unwrapped = env.unwrapped
    if "np_random" in state and getattr(unwrapped, "_np_random", None) is not None:
        unwrapped._np_random.bit_generator.state = state["np_random"]
    if not state.get("exact"):
        return False
    if "mujoco" in state:
        import mujoco

        handles = _mujoco_handles(unwrapped)
        if handles is None:
            return False
        model, data, dm_env = handles
        mujoco.mj_setState(model, data, state["mujoco"].numpy(), mujoco.mjtState.mjSTATE_INTEGRATION)
        mujoco.mj_forward(model, data)
        for k, v in state.get("mujoco_derived", {}).items():
            getattr(data, k)[...] = v.numpy()
        if dm_env is not None and "dm_control" in state:
            dm = state["dm_control"]
            dm_env._step_count = dm["step_count"]
            dm_env._reset_next_step = dm["reset_next_step"]
            dm_env.task.random.set_state(numpy_rng_from_torch(dm["task_random"]))
        return True
    if "classic_state" in state:
        unwrapped.state = state["classic_state"].numpy().copy()
        return True
    return False
