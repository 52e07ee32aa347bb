"""The process's global generators (Python, NumPy, torch CPU and CUDA): seeding, and their state
as a checkpoint holds it."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) global generator states, checkpoint-safe."""
    from rl_plasticity.checkpoint import numpy_rng_to_torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": numpy_rng_to_torch(np.random.get_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from rl_plasticity.checkpoint import numpy_rng_from_torch

    random.setstate(state["python"])
    np.random.set_state(numpy_rng_from_torch(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
