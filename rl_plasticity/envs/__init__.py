"""Environments by name: every DeepMind Control suite task, plain gymnasium ids, Slippery Ant,
continual DMC; one factory (`make_env`, envs/registry.py) and one face (`standardize`)."""
from rl_plasticity.envs.dmc import DMC_TASKS, UnknownEnvError
from rl_plasticity.envs.registry import KINDS, make_env, make_vector_env
from rl_plasticity.envs.standard import standardize

__all__ = ["DMC_TASKS", "KINDS", "UnknownEnvError", "make_env", "make_vector_env", "standardize"]
