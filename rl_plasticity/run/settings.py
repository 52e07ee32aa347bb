"""A run's config, checked and typed: the run-level dataclasses (`RunConfig`, `EvalConfig`,
`LogConfig`, `CheckpointConfig`) and `settings`, which checks every key of a resolved config
before anything is created."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from rl_plasticity.config import ConfigError, from_node, require
from rl_plasticity.run.device import resolve_device


@dataclasses.dataclass
class RunConfig:
    seed: int = 0
    total_steps: int = 1_000_000
    device: str = "auto"
    run_dir: Optional[str] = None
    threads: Optional[int] = 1
    resume: bool = True
    compile: bool = False
    cudagraphs: bool = False
    num_seeds: int = 1
    batch_seeds: Optional[bool] = None


@dataclasses.dataclass
class EvalConfig:
    every: int = 10_000
    episodes: int = 5
    all_tasks: bool = False


@dataclasses.dataclass
class LogConfig:
    every: int = 1_000
    progress_seconds: float = 30.0
    wandb: bool = False
    wandb_project: str = "rl_plasticity"
    wandb_entity: Optional[str] = None
    wandb_group: Optional[str] = None
    wandb_tags: tuple[str, ...] = ()
    wandb_mode: str = "online"


WANDB_MODES = ("online", "offline", "disabled")


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 100_000
    keep: int = 3
    save_replay: bool = True


AGENTS = ("sac", "ppo")


@dataclasses.dataclass
class Settings:
    """A composed config, checked and typed (`settings`); building it has no side effects."""

    run: RunConfig
    evaluation: EvalConfig
    log: LogConfig
    ckpt: CheckpointConfig
    agent_name: str
    agent_cfg: Any
    plasticity_cfg: Any
    device: torch.device


def settings(container: dict[str, Any]) -> Settings:
    """Check every run-level, agent and plasticity key of a resolved config (ConfigError naming
    the key), before anything is created: the entry point calls it before Hydra makes the run
    directory, so a rejected config leaves nothing on disk."""
    from rl_plasticity.agents.ppo import PPOConfig
    from rl_plasticity.agents.sac import SACConfig
    from rl_plasticity.plasticity.mixin import PlasticityConfig

    run = from_node(RunConfig, {f.name: container[f.name] for f in dataclasses.fields(RunConfig) if f.name in container},
                    "")
    evaluation = from_node(EvalConfig, container["eval"], "eval")
    log = from_node(LogConfig, container["log"], "log")
    ckpt = from_node(CheckpointConfig, container["checkpoint"], "checkpoint")
    require(run.total_steps >= 1, f"total_steps must be >= 1, got {run.total_steps}")
    require(evaluation.every >= 1, f"eval.every must be >= 1, got {evaluation.every}")
    require(evaluation.episodes >= 0, f"eval.episodes must be >= 0, got {evaluation.episodes}")
    require(log.every >= 1, f"log.every must be >= 1, got {log.every}")
    require(log.progress_seconds > 0, f"log.progress_seconds must be > 0, got {log.progress_seconds}")
    require(log.wandb_mode in WANDB_MODES,
            f"log.wandb_mode must be one of {', '.join(WANDB_MODES)}, got {log.wandb_mode!r}")
    if log.wandb:
        import importlib.util

        require(importlib.util.find_spec("wandb") is not None,
                "log.wandb=true needs the wandb package: pip install wandb (or log.wandb=false)")
    require(ckpt.every >= 1, f"checkpoint.every must be >= 1, got {ckpt.every}")
    require(ckpt.keep >= 1, f"checkpoint.keep must be >= 1, got {ckpt.keep}")
    require(run.threads is None or run.threads >= 1, f"threads must be >= 1 or null, got {run.threads}")
    require(run.num_seeds >= 1, f"num_seeds must be >= 1, got {run.num_seeds}")
    agent_name = container["agent"].get("name")
    if agent_name not in AGENTS:
        raise ConfigError(f"unknown agent '{agent_name}'. Valid choices: {', '.join(AGENTS)}")
    plasticity_cfg = PlasticityConfig.from_node(container["plasticity"])
    agent_cfg = (SACConfig if agent_name == "sac" else PPOConfig).from_node(container["agent"])
    device = resolve_device(run.device)
    return Settings(run, evaluation, log, ckpt, agent_name, agent_cfg, plasticity_cfg, device)
