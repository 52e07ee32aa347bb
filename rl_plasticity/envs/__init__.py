"""Environments by name: every DeepMind Control suite task, plain gymnasium ids, Slippery Ant."""
from rl_plasticity.envs.dmc import DMC_TASKS, make_env

__all__ = ["DMC_TASKS", "make_env"]
