"""The device a run asks for (`device=auto|cpu|cuda|cuda:N`), checked against this machine."""
from __future__ import annotations

import torch

from rl_plasticity.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; an unusable device is a ConfigError naming `device`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device '{name}' is not a device. Valid choices: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' asked for CUDA but this machine has none. Valid choices: auto, cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device '{name}' is not supported. Valid choices: auto, cpu, cuda, cuda:N")
    return device
