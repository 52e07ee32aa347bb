"""Train an agent: `python -m rl_plasticity.train agent=sac env=cheetah-run`.

Builds env, buffer, agent and logger from the composed config and hands them to a loop; writes
TensorBoard events and checkpoints into the run directory.
"""
from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rl_plasticity.cli import check_overrides, fail, register_configs
from rl_plasticity.config import ConfigError, from_node, require

register_configs()


@dataclasses.dataclass
class RunConfig:
    seed: int = 0
    total_steps: int = 1_000_000
    device: str = "auto"
    run_dir: Optional[str] = None
    threads: Optional[int] = None


@dataclasses.dataclass
class EvalConfig:
    every: int = 10_000
    episodes: int = 5


@dataclasses.dataclass
class LogConfig:
    every: int = 1_000


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 100_000
    keep: int = 3


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _yaml_block(cfg: dict[str, Any]) -> str:
    # Indented by four spaces so TensorBoard's markdown shows it as a code block.
    return "\n".join("    " + line for line in OmegaConf.to_yaml(cfg).splitlines())


AGENTS = ("sac", "ppo")


def train(cfg: DictConfig, run_dir: str) -> dict[str, float]:
    """Run one training job described by `cfg` in `run_dir`; returns the last evaluation summary."""
    from rl_plasticity.agents.ppo import PPOConfig
    from rl_plasticity.agents.sac import SACConfig
    from rl_plasticity.checkpoint import save_checkpoint
    from rl_plasticity.logging import Logger
    from rl_plasticity.plasticity.mixin import PlasticityConfig

    container: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    container["run_dir"] = run_dir
    run = from_node(RunConfig, {k: container[k] for k in ("seed", "total_steps", "device", "run_dir", "threads")}, "")
    evaluation = from_node(EvalConfig, container["eval"], "eval")
    log = from_node(LogConfig, container["log"], "log")
    ckpt = from_node(CheckpointConfig, container["checkpoint"], "checkpoint")
    require(run.total_steps >= 1, f"total_steps must be >= 1, got {run.total_steps}")
    require(evaluation.every >= 1, f"eval.every must be >= 1, got {evaluation.every}")
    require(evaluation.episodes >= 0, f"eval.episodes must be >= 0, got {evaluation.episodes}")
    require(log.every >= 1, f"log.every must be >= 1, got {log.every}")
    require(ckpt.every >= 1, f"checkpoint.every must be >= 1, got {ckpt.every}")
    require(ckpt.keep >= 1, f"checkpoint.keep must be >= 1, got {ckpt.keep}")
    agent_name = container["agent"].get("name")
    if agent_name not in AGENTS:
        raise ConfigError(f"unknown agent '{agent_name}'. Valid choices: {', '.join(AGENTS)}")
    plasticity_cfg = PlasticityConfig.from_node(container["plasticity"])
    agent_cfg = (SACConfig if agent_name == "sac" else PPOConfig).from_node(container["agent"])
    device = resolve_device(run.device)
    if run.threads is not None:
        require(run.threads >= 1, f"threads must be >= 1, got {run.threads}")
        torch.set_num_threads(run.threads)

    seed_everything(run.seed)
    builder = _build_sac if agent_name == "sac" else _build_ppo
    job = builder(container, agent_cfg, plasticity_cfg, run, device)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    logger = Logger(run_dir, run.total_steps)
    logger.text("config", _yaml_block(container))
    logger.dashboard(list(job.agent.networks), **job.dashboard)
    print(f"run dir: {run_dir}  (tensorboard --logdir {run_dir})\n"
          f"agent {agent_name} on {container['env']['name']} | device {device} | obs {job.obs_dim} | "
          f"actions {job.action_dim} | {job.summary} | plasticity {plasticity_cfg.name}", flush=True)

    def checkpoint(step: int) -> None:
        state = {
            "format": 1,
            "config": container,
            "step": step,
            "agent_name": agent_name,
            "obs_dim": job.obs_dim,
            "action_dim": job.action_dim,
            "agent": job.agent.state_dict(),
            "env": job.env_state(),
        }
        save_checkpoint(state, Path(run_dir) / "checkpoints", step, keep=ckpt.keep)

    try:
        result = job.run(logger, checkpoint, run, evaluation, log, ckpt, plasticity_cfg)
    finally:
        logger.close()
        job.close()
    print(f"done: {run.total_steps:,} env steps, {job.agent.update_count:,} updates; checkpoints in "
          f"{Path(run_dir) / 'checkpoints'}", flush=True)
    return result


@dataclasses.dataclass
class _Job:
    """What `train` needs from an agent family: the agent, its envs, and how to run the loop."""

    agent: Any
    obs_dim: int
    action_dim: int
    summary: str
    run: Any
    env_state: Any
    close: Any
    dashboard: dict[str, Any] = dataclasses.field(default_factory=dict)


def _build_sac(container: dict[str, Any], agent_cfg: Any, plasticity_cfg: Any, run: RunConfig,
               device: torch.device) -> _Job:
    from rl_plasticity.agents.sac import SACAgent
    from rl_plasticity.buffers import ReplayBuffer
    from rl_plasticity.envs import make_env
    from rl_plasticity.envs.slippery_ant import find_slippery_ant
    from rl_plasticity.loops import OffPolicySchedule, run_off_policy

    env = make_env(container["env"])
    eval_env = make_env(container["env"])
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    agent = SACAgent(obs_dim, action_dim, agent_cfg, device, plasticity=plasticity_cfg)
    buffer = ReplayBuffer(obs_dim, action_dim, agent_cfg.buffer_size, device, seed=run.seed)
    slippery = find_slippery_ant(env)

    def run_loop(logger, checkpoint, run, evaluation, log, ckpt, plasticity_cfg) -> dict[str, float]:
        schedule = OffPolicySchedule(
            total_steps=run.total_steps, prefill_steps=agent_cfg.prefill_steps, replay_ratio=agent_cfg.replay_ratio,
            batch_size=agent_cfg.batch_size, eval_every=evaluation.every, eval_episodes=evaluation.episodes,
            log_every=log.every, checkpoint_every=ckpt.every, seed=run.seed, gamma=agent_cfg.gamma,
            diagnostics_every=plasticity_cfg.log_every,
        )
        return run_off_policy(agent, buffer, env, eval_env, logger, schedule, checkpoint)

    def close() -> None:
        env.close()
        eval_env.close()

    return _Job(agent, obs_dim, action_dim,
                f"replay ratio {agent_cfg.replay_ratio} | replay buffer {buffer.nbytes / 2**20:.0f} MiB", run_loop,
                lambda: [slippery.state_dict()] if slippery is not None else [], close,
                dashboard={"friction": slippery is not None})


def _build_ppo(container: dict[str, Any], agent_cfg: Any, plasticity_cfg: Any, run: RunConfig,
               device: torch.device) -> _Job:
    import gymnasium as gym

    from rl_plasticity.agents.ppo import PPOAgent
    from rl_plasticity.envs import make_env
    from rl_plasticity.envs.slippery_ant import find_slippery_ant
    from rl_plasticity.loops import OnPolicySchedule, run_on_policy

    env_cfg = dict(container["env"])
    n = agent_cfg.num_envs
    if n > 1 and "change_every" in env_cfg:
        # Each sub-env counts its own steps: split the period so that changes come every
        # `change_every` env steps in total.
        env_cfg["change_every"] = max(1, int(env_cfg["change_every"]) // n)
    make_env(env_cfg).close()  # surfaces a bad env config as one error before the vector env starts
    envs = gym.vector.SyncVectorEnv([lambda: make_env(env_cfg) for _ in range(n)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    eval_env = make_env(env_cfg)
    obs_dim, action_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    agent = PPOAgent(obs_dim, action_dim, agent_cfg, device, plasticity=plasticity_cfg, seed=run.seed)
    wrappers = [find_slippery_ant(e) for e in envs.envs]
    slippery = [w for w in wrappers if w is not None]
    eval_slippery = find_slippery_ant(eval_env)
    frictions = (lambda: [w.friction for w in slippery]) if slippery else None

    def run_loop(logger, checkpoint, run, evaluation, log, ckpt, plasticity_cfg) -> dict[str, float]:
        schedule = OnPolicySchedule(
            total_steps=run.total_steps, rollout_steps=agent_cfg.rollout_steps, eval_every=evaluation.every,
            eval_episodes=evaluation.episodes, log_every=log.every, checkpoint_every=ckpt.every, seed=run.seed,
            gamma=agent_cfg.gamma, gae_lambda=agent_cfg.gae_lambda, diagnostics_every=plasticity_cfg.log_every,
        )
        # Evaluation runs under the friction the agent is currently trained on.
        follow = (lambda: eval_slippery.hold_friction(slippery[0].friction)) if eval_slippery and slippery else None
        return run_on_policy(agent, envs, eval_env, logger, schedule, checkpoint, frictions, before_eval=follow)

    def close() -> None:
        envs.close()
        eval_env.close()

    batch = agent_cfg.rollout_steps * n
    return _Job(agent, obs_dim, action_dim,
                f"{n} env(s) | rollout {batch} | {agent_cfg.epochs} epochs × {agent_cfg.num_minibatches} minibatches",
                run_loop, lambda: [w.state_dict() for w in slippery], close,
                dashboard={"losses": ("policy", "value", "entropy", "approx_kl", "clip_fraction", "plasticity"),
                           "values": ("log_std",), "friction": bool(slippery)})


@hydra.main(version_base=None, config_path="pkg://rl_plasticity.configs", config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from rl_plasticity.checkpoint import CheckpointError
    from rl_plasticity.envs.dmc import UnknownEnvError

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        train(cfg, run_dir)
    except (ConfigError, CheckpointError, UnknownEnvError) as e:
        fail(str(e))


def main() -> None:
    try:
        check_overrides(sys.argv[1:])
    except ConfigError as e:
        fail(str(e))
    _hydra_main()


if __name__ == "__main__":
    main()
