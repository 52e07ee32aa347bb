"""Typed experiment builders, one per agent family: the agent, its envs (and replay buffer), the
loop that drives them, and what a checkpoint keeps of them.

`train` builds one `Experiment` per seed (`EXPERIMENTS[agent.name](...)`); `evaluate` builds the
agent alone from a checkpoint's config (`make_agent`), so both construct agents the same way.
Envs and loops are imported when an experiment is built, not with this module: the entry points
choose MuJoCo's OpenGL backend before anything imports dm_control.
"""
from __future__ import annotations

import abc
import sys
from typing import Any, Callable, ClassVar, Generator

import torch

from rl_plasticity.agents.ppo import PPOAgent, PPOConfig
from rl_plasticity.agents.sac import SACAgent, SACConfig
from rl_plasticity.plasticity.mixin import PlasticityConfig
from rl_plasticity.run.settings import CheckpointConfig, EvalConfig, LogConfig, RunConfig


class Experiment(abc.ABC):
    """What `train` needs from an agent family (see the module docstring)."""

    config_type: ClassVar[type]     # the agent's config dataclass (`agent.*` keys)
    agent: Any
    obs_dim: int
    action_dim: int
    summary: str                    # one line for the console: the family's own settings
    dashboard: dict[str, Any]       # keyword arguments of Logger.dashboard (its tags beyond the common ones)

    @staticmethod
    @abc.abstractmethod
    def make_agent(obs_dim: int, action_dim: int, agent_cfg: Any, plasticity_cfg: PlasticityConfig,
                   device: torch.device, seed: int, compile: bool = False, cudagraphs: bool = False) -> Any:
        """The agent, freshly initialised (a checkpoint's state is loaded into it afterwards)."""

    @abc.abstractmethod
    def steps(self, logger: Any, checkpoint: Callable[[int, dict[str, Any]], None], run: RunConfig,
              evaluation: EvalConfig, log: LogConfig, ckpt: CheckpointConfig, control: Any) -> Generator:
        """The interaction loop (loops.py) as a generator of update requests."""

    @abc.abstractmethod
    def env_state(self) -> list[dict[str, Any]]:
        """Each training env's state (envs/state.py), for a checkpoint."""

    @abc.abstractmethod
    def restore(self, state: dict[str, Any]) -> bool:
        """Restore the envs (and buffer) from a checkpoint; whether the env state was restored exactly."""

    def extra_state(self, save_replay: bool) -> dict[str, Any]:
        """What else a checkpoint holds (SAC: the replay buffer)."""
        return {}

    @abc.abstractmethod
    def close(self) -> None:
        """Close the envs."""


class SACExperiment(Experiment):
    """SAC: one env, an evaluation env following it, a replay buffer, the off-policy loop."""

    config_type = SACConfig

    def __init__(self, container: dict[str, Any], agent_cfg: SACConfig, plasticity_cfg: PlasticityConfig,
                 run: RunConfig, device: torch.device):
        from rl_plasticity.buffers import ReplayBuffer
        from rl_plasticity.envs import make_env

        self.agent_cfg, self.plasticity_cfg = agent_cfg, plasticity_cfg
        self.env = make_env(container["env"])
        self.eval_env = make_env(container["env"])
        self.dashboard = _env_dashboard(container, self.env, self.eval_env)
        self.obs_dim, self.action_dim = self.env.observation_space.shape[0], self.env.action_space.shape[0]
        self.agent = self.make_agent(self.obs_dim, self.action_dim, agent_cfg, plasticity_cfg, device, run.seed,
                                     compile=run.compile, cudagraphs=run.cudagraphs)
        self.buffer = ReplayBuffer(self.obs_dim, self.action_dim, agent_cfg.buffer_size, device, seed=run.seed)
        self.summary = f"replay ratio {agent_cfg.replay_ratio} | replay buffer {self.buffer.nbytes / 2**20:.0f} MiB"

    @staticmethod
    def make_agent(obs_dim: int, action_dim: int, agent_cfg: Any, plasticity_cfg: PlasticityConfig,
                   device: torch.device, seed: int, compile: bool = False, cudagraphs: bool = False) -> SACAgent:
        return SACAgent(obs_dim, action_dim, agent_cfg, device, plasticity=plasticity_cfg, seed=seed,
                        compile=compile, cudagraphs=cudagraphs)

    def steps(self, logger, checkpoint, run, evaluation, log, ckpt, control):
        from rl_plasticity.loops import OffPolicySchedule, off_policy_steps

        agent_cfg, env = self.agent_cfg, self.env
        schedule = OffPolicySchedule(
            total_steps=run.total_steps, prefill_steps=agent_cfg.prefill_steps, replay_ratio=agent_cfg.replay_ratio,
            batch_size=agent_cfg.batch_size, eval_every=evaluation.every, eval_episodes=evaluation.episodes,
            log_every=log.every, checkpoint_every=ckpt.every, seed=run.seed, gamma=agent_cfg.gamma,
            diagnostics_every=self.plasticity_cfg.log_every, eval_all_tasks=evaluation.all_tasks,
        )
        # A non-stationary env reports its task and is followed by the evaluation env through the
        # protocol of envs/nonstationary.py, which the loop uses itself.
        return off_policy_steps(self.agent, self.buffer, env, self.eval_env, logger, schedule, checkpoint, control)

    def env_state(self) -> list[dict[str, Any]]:
        from rl_plasticity.envs.state import capture_env

        return [capture_env(self.env)]

    def restore(self, state: dict[str, Any]) -> bool:
        from rl_plasticity.envs.state import restore_env

        if "replay" in state:
            self.buffer.load_state_dict(state["replay"])
        else:
            print("warning: the checkpoint holds no replay buffer (checkpoint.save_replay=false): learning pauses "
                  "until the buffer again holds min(prefill_steps, batch_size) transitions", file=sys.stderr, flush=True)
        return restore_env(self.env, state["env"][0])

    def extra_state(self, save_replay: bool) -> dict[str, Any]:
        return {"replay": self.buffer.state_dict()} if save_replay else {}

    def close(self) -> None:
        self.env.close()
        self.eval_env.close()


class PPOExperiment(Experiment):
    """PPO: `num_envs` envs stepped as one vector env, an evaluation env following the first, the
    on-policy loop."""

    config_type = PPOConfig

    def __init__(self, container: dict[str, Any], agent_cfg: PPOConfig, plasticity_cfg: PlasticityConfig,
                 run: RunConfig, device: torch.device):
        from rl_plasticity.envs import make_env, make_vector_env

        self.agent_cfg, self.plasticity_cfg, self.seed = agent_cfg, plasticity_cfg, run.seed
        env_cfg = dict(container["env"])
        n = agent_cfg.num_envs
        self.envs = make_vector_env(env_cfg, n)  # each sub-env's schedule period split by n (envs/registry.py)
        self.eval_env = make_env(env_cfg, num_envs=n)
        self.obs_dim = self.envs.single_observation_space.shape[0]
        self.action_dim = self.envs.single_action_space.shape[0]
        if run.compile or run.cudagraphs:
            import warnings

            warnings.warn("compile/cudagraphs apply to SAC's fused update; PPO (env-bound at its settings) runs "
                          "eagerly", stacklevel=2)
        self.agent = self.make_agent(self.obs_dim, self.action_dim, agent_cfg, plasticity_cfg, device, run.seed)
        batch = agent_cfg.rollout_steps * n
        self.summary = (f"{n} env(s) | rollout {batch} | {agent_cfg.epochs} epochs × {agent_cfg.num_minibatches} "
                        f"minibatches")
        self.dashboard = {"losses": ("policy", "value", "entropy", "approx_kl", "clip_fraction", "plasticity"),
                          "values": ("log_std",), **_env_dashboard(container, self.envs.envs[0], self.eval_env)}

    @staticmethod
    def make_agent(obs_dim: int, action_dim: int, agent_cfg: Any, plasticity_cfg: PlasticityConfig,
                   device: torch.device, seed: int, compile: bool = False, cudagraphs: bool = False) -> PPOAgent:
        return PPOAgent(obs_dim, action_dim, agent_cfg, device, plasticity=plasticity_cfg, seed=seed)

    def steps(self, logger, checkpoint, run, evaluation, log, ckpt, control):
        from rl_plasticity.loops import OnPolicySchedule, on_policy_steps

        agent_cfg, envs = self.agent_cfg, self.envs
        schedule = OnPolicySchedule(
            total_steps=run.total_steps, rollout_steps=agent_cfg.rollout_steps, eval_every=evaluation.every,
            eval_episodes=evaluation.episodes, log_every=log.every, checkpoint_every=ckpt.every, seed=run.seed,
            gamma=agent_cfg.gamma, gae_lambda=agent_cfg.gae_lambda, diagnostics_every=self.plasticity_cfg.log_every,
            eval_all_tasks=evaluation.all_tasks,
        )
        # A non-stationary env: each sub-env reports its task, and evaluation follows the first
        # sub-env's, through envs/nonstationary.py (the loop uses it itself).
        return on_policy_steps(self.agent, envs, self.eval_env, logger, schedule, checkpoint, control=control)

    def env_state(self) -> list[dict[str, Any]]:
        from rl_plasticity.envs.state import capture_env

        return [capture_env(e) for e in self.envs.envs]

    def restore(self, state: dict[str, Any]) -> bool:
        from rl_plasticity.envs.state import restore_env

        self.envs.reset(seed=self.seed)  # the vector env's own bookkeeping, then each env's saved state
        return all([restore_env(e, s) for e, s in zip(self.envs.envs, state["env"])])

    def close(self) -> None:
        self.envs.close()
        self.eval_env.close()


def _env_dashboard(container: dict[str, Any], env: Any, eval_env: Any) -> dict[str, Any]:
    """Logger.dashboard's env charts: the tags `env` reports at episode ends, with their titles,
    and with `eval.all_tasks` each task's evaluation return; ConfigError when `eval.all_tasks` asks
    for tasks the env does not have."""
    from rl_plasticity.config import ConfigError
    from rl_plasticity.envs.nonstationary import episode_tags, task_names
    from rl_plasticity.names import eval_task_tag

    out: dict[str, Any] = {"env_tags": episode_tags(env)}
    if container.get("eval", {}).get("all_tasks"):
        tasks = task_names(eval_env)
        if not tasks:
            raise ConfigError(f"eval.all_tasks=true needs an env with a fixed set of tasks (env=continual-dmc); "
                              f"env {container['env'].get('name')} has none. Use eval.all_tasks=false")
        out["task_returns"] = tuple(eval_task_tag(t) for t in tasks)
    return out


EXPERIMENTS: dict[str, type[Experiment]] = {"sac": SACExperiment, "ppo": PPOExperiment}
"""Experiment builders by `agent.name`."""
