"""Interaction loops: step the env, fill the buffer, ask the agent to update, report.

A loop never touches parameters (the agent does) and never opens files (the logger and the
checkpoint callback do); it only decides *when* things happen.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Generator, Mapping, Optional, Protocol

import gymnasium as gym
import numpy as np
import torch

from rl_plasticity import names
from rl_plasticity.buffers import Batch, ReplayBuffer
from rl_plasticity.logging import Logger, RateMeter
from rl_plasticity.plasticity.mixin import DATA_METRICS

PROBE_SIZE = 256  # rows of each diagnostic's probe batch (at most the batch size for SAC)


def probe_seed(seed: int, updates: int) -> int:
    """The seed of the generator that draws a diagnostic's probe rows: a pure function of the run's
    seed and the agent's update count, so drawing never touches a training generator and a resumed
    run draws the same rows (nothing to save)."""
    return (int(seed) * 1_000_003 + int(updates) * 7_919 + 17) % (2**62)


def curvature_config(agent: Any, probe_rows: int) -> Any:
    """The agent's PlasticityConfig when it asks for curvature diagnostics, else None (then the
    loop measures nothing and pays nothing).  More per-sample gradients than a probe holds is a
    ConfigError naming the key, raised before the first step."""
    from rl_plasticity.config import ConfigError

    cfg = getattr(agent, "plasticity_cfg", None)
    if cfg is None or not getattr(cfg, "curvature_enabled", False):
        return None
    if cfg.curvature_samples > probe_rows:
        raise ConfigError(f"plasticity.curvature_samples ({cfg.curvature_samples}) must not exceed the rows of a "
                          f"diagnostic's batch ({probe_rows})")
    return cfg


def log_curvature(agent: Any, logger: Logger, probe: Any, seed: int, step: int, task_start: bool,
                  updates_since_change: int = 0) -> None:
    """Measure `curvature/<network>/<metric>` on `probe` and write it (at a task start also as
    `curvature_task/<network>/<metric>`, with `curvature_task/updates_since_change`: the gradient
    updates between the task change and this measurement), with each network's Hessian eigenvalue
    density as the histogram `curvature/<network>/hessian_density` (SLQ, spectral-collapse-l2-er.md
    App. F.1)."""
    values, spectra = agent.plasticity_curvature(probe, seed)
    if task_start:
        values.update({"curvature_task/" + k[len("curvature/"):]: v for k, v in list(values.items())})
        values[names.TASK_CHANGE] = torch.tensor(1.0)
        values[names.UPDATES_SINCE_CHANGE] = torch.tensor(float(updates_since_change))
    logger.scalars(values, step)
    add_histogram = getattr(getattr(logger, "writer", None), "add_histogram_raw", None)
    if add_histogram is None:
        return
    from rl_plasticity.plasticity.curvature import density_histogram

    for name, spectrum in spectra.items():
        limits, counts = density_histogram(spectrum)
        tag = f"curvature{'_task' if task_start else ''}/{name}/hessian_density"
        add_histogram(tag, min=float(limits[0]), max=float(limits[-1]), num=float(counts.sum()),
                      sum=float((limits * counts).sum()), sum_squares=float((limits.square() * counts).sum()),
                      bucket_limits=limits.tolist(), bucket_counts=counts.tolist(), global_step=step)


def task_of(env_metrics: Callable[[], list[dict[str, float]] | dict[str, float]] | None) -> list[list] | None:
    """The task the first (sub-)env is in, as its episode metrics ([[tag, value], ...], e.g.
    `env/friction` or `env/task`): a change of this value is a task change.  None when stationary."""
    if env_metrics is None:
        return None
    metrics = env_metrics()
    first = metrics[0] if isinstance(metrics, (list, tuple)) else metrics  # a vector env's, or one env's
    return [[tag, float(value)] for tag, value in sorted(first.items())]


def task_changed(agent: Any) -> None:
    """Tell the agent's interventions that the env's task changed (shrink-and-perturb acts then)."""
    hook = getattr(agent, "plasticity_task_change", None)
    if hook is not None:
        hook()


def probe_diagnostics(agent: Any, current: Any, reference: Any = None) -> dict[str, torch.Tensor]:
    """`agent.diagnostics` on `current` (the data the networks train on now: `plasticity/...`)
    and, when given, the data-dependent metrics (`DATA_METRICS`) on the fixed `reference` batch as
    `plasticity_ref/<network>/<metric>` (a curve comparable over the whole run)."""
    values = dict(agent.diagnostics(current))
    if reference is not None:
        for key, value in agent.diagnostics(reference).items():
            if key.startswith("plasticity/") and key.rsplit("/", 1)[-1] in DATA_METRICS:
                values["plasticity_ref/" + key[len("plasticity/"):]] = value
    return values


class OffPolicyAgent(Protocol):
    update_count: int

    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray: ...

    def update(self, batch: Batch) -> dict[str, torch.Tensor]: ...

    def value(self, obs: np.ndarray) -> float: ...

    def diagnostics(self, batch: Batch) -> dict[str, torch.Tensor]: ...


@dataclasses.dataclass
class OffPolicySchedule:
    """When things happen, in environment steps."""

    total_steps: int
    prefill_steps: int
    replay_ratio: int
    batch_size: int
    eval_every: int
    eval_episodes: int
    log_every: int
    checkpoint_every: int
    seed: int
    gamma: float = 0.99              # for the discounted returns of value/overestimation
    diagnostics_every: int = 16_000  # gradient updates between plasticity diagnostics
    eval_all_tasks: bool = False     # also evaluate on every task of the env (evaluate_tasks_and_log)


def evaluate(agent: OffPolicyAgent, env: gym.Env, episodes: int, seed: int,
             gamma: float | None = None) -> dict[str, np.ndarray]:
    """Run `episodes` episodes of the deterministic policy; episode k resets with seed+k, so the
    result depends only on the policy and `seed`.

    Returns per-episode `returns`; with `gamma`, also `overestimation`: the critic's value of
    the first state minus the discounted return actually obtained from it.
    """
    returns = np.zeros(episodes)
    over = np.zeros(episodes)
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + k)
        start_value = agent.value(obs) if gamma is not None else 0.0
        discounted, discount = 0.0, 1.0
        done = False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(agent.act(obs, deterministic=True))
            returns[k] += float(reward)
            if gamma is not None:
                discounted += discount * float(reward)
                discount *= gamma
            done = terminated or truncated
        over[k] = start_value - discounted
    result = {"returns": returns}
    if gamma is not None:
        result["overestimation"] = over
    return result


EVAL_SEED_OFFSET = 1_000_000  # evaluation episode k resets with seed + EVAL_SEED_OFFSET + k


def evaluate_and_log(agent: Any, eval_env: gym.Env, logger: Logger, step: int, episodes: int, seed: int,
                     gamma: float) -> dict[str, float]:
    """`evaluate` with evaluation seeds apart from training's, written as `eval/` and `value/` tags."""
    result = evaluate(agent, eval_env, episodes, seed + EVAL_SEED_OFFSET, gamma)
    returns = result["returns"]
    summary = {names.EVAL_RETURN: float(returns.mean()), names.EVAL_RETURN_STD: float(returns.std()),
               names.OVERESTIMATION: float(result["overestimation"].mean())}
    logger.scalars(summary, step)
    logger.flush()
    return summary


def evaluate_tasks_and_log(agent: Any, eval_env: gym.Env, logger: Logger, step: int, episodes: int,
                           seed: int, current: Mapping[str, float]) -> dict[str, float]:
    """`eval.all_tasks`: the evaluation of `evaluate_and_log` (same episodes, same seeds) on each
    task of a non-stationary env with a fixed set of tasks (continual DMC's `env.tasks`), held in
    turn, logged as `eval/<task>/return_mean` and `eval/<task>/return_std`.  The task the env holds
    now was just evaluated: its values are `current` (evaluate_and_log's summary), not run again.
    The env is left holding the last task; the loops make it follow the training env again before
    the next evaluation."""
    from rl_plasticity.envs.nonstationary import current_task_name, hold_task_named, task_names

    summary: dict[str, float] = {}
    now = current_task_name(eval_env)
    for task in task_names(eval_env):
        if task == now:
            mean, std = current[names.EVAL_RETURN], current[names.EVAL_RETURN_STD]
        else:
            hold_task_named(eval_env, task)
            returns = evaluate(agent, eval_env, episodes, seed + EVAL_SEED_OFFSET)["returns"]
            mean, std = float(returns.mean()), float(returns.std())
        summary[names.eval_task_tag(task)] = mean
        summary[names.eval_task_tag(task, "return_std")] = std
    logger.scalars(summary, step)
    logger.flush()
    return summary


class DivergenceError(RuntimeError):
    """A non-finite loss or parameter: the run stops rather than train (and checkpoint) garbage."""

    def __init__(self, step: int, losses: dict[str, float], networks: list[str]):
        self.step, self.losses, self.networks = step, losses, networks
        parts = [f"{k} = {v}" for k, v in losses.items()]
        if networks:
            parts.append(f"non-finite parameters in network(s) {', '.join(networks)}")
        super().__init__(f"training diverged at env step {step}: {'; '.join(parts)}")

    def __str__(self) -> str:
        return str(self.args[0])


def check_finite(agent: Any, metrics: dict[str, torch.Tensor], step: int) -> None:
    """Raise DivergenceError naming the losses and networks that are not finite (one host sync)."""
    names = [k for k in metrics if k.startswith("losses/")]
    nets = list(agent.networks.items())
    flags = [torch.isfinite(metrics[k]).all() for k in names]
    flags += [torch.stack([torch.isfinite(p).all() for p in net.parameters()]).all() for _, net in nets]
    if not flags:
        return
    ok = torch.stack([f.to(flags[0].device) for f in flags]).cpu().tolist()
    if all(ok):
        return
    bad_losses = {n: float(metrics[n]) for n, f in zip(names, ok) if not f}
    bad_nets = [n for (n, _), f in zip(nets, ok[len(names):]) if not f]
    raise DivergenceError(step, bad_losses, bad_nets)


@dataclasses.dataclass
class LoopControl:
    """What a loop gets besides its pieces: a saved loop state to continue from (resumption) and
    a flag that asks it to checkpoint and return after the current step (preemption)."""

    resume: Optional[dict[str, Any]] = None
    should_stop: Callable[[], bool] = lambda: False


@dataclasses.dataclass
class LoopResult:
    last_eval: dict[str, float]
    step: int
    preempted: bool = False


def _np_state(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(x, copy=True))


# A loop written as a generator: it yields what the agent should learn from (a replay batch, a
# rollout) and is sent back the update's metrics; it returns its LoopResult.  `drive` runs one
# loop with its agent; train's multi-seed driver runs several in lockstep and batches their
# updates (agents/seeds.py).
LoopSteps = Generator[Any, dict[str, torch.Tensor], LoopResult]


def drive(steps: LoopSteps, update: Callable[[Any], dict[str, torch.Tensor]]) -> LoopResult:
    """Run a loop generator to its end, answering each request with `update(request)`."""
    try:
        request = next(steps)
        while True:
            request = steps.send(update(request))
    except StopIteration as stop:
        return stop.value


def run_off_policy(agent: OffPolicyAgent, buffer: ReplayBuffer, env: gym.Env, eval_env: gym.Env, logger: Logger,
                   schedule: OffPolicySchedule, save_checkpoint: Callable[[int, dict[str, Any]], None],
                   control: LoopControl | None = None,
                   env_metrics: Callable[[], dict[str, float]] | None = None) -> LoopResult:
    """Prefill with uniform random actions, then act and run `replay_ratio` updates per env step
    (see `off_policy_steps`)."""
    return drive(off_policy_steps(agent, buffer, env, eval_env, logger, schedule, save_checkpoint, control,
                                  env_metrics), agent.update)


def off_policy_steps(agent: OffPolicyAgent, buffer: ReplayBuffer, env: gym.Env, eval_env: gym.Env, logger: Logger,
                     schedule: OffPolicySchedule, save_checkpoint: Callable[[int, dict[str, Any]], None],
                     control: LoopControl | None = None,
                     env_metrics: Callable[[], dict[str, float]] | None = None) -> LoopSteps:
    """Prefill with uniform random actions, then act and ask for `replay_ratio` updates per env
    step: yields the step's batches (leading dimension `replay_ratio`), is sent the metrics.
    `env_metrics()` (a non-stationary env's `env/friction`, `env/task`; by default what `env`
    reports through envs/nonstationary.py) is logged at every episode end.  Before each evaluation
    the evaluation env follows the training env's task (`follow_training`); with
    `schedule.eval_all_tasks` it is then evaluated on every task too.

    Checkpoints may fall in the middle of an episode: the caller saves and restores the env's
    state, and the loop state passed to `save_checkpoint` holds the rest (current observation,
    episode counters, reference probe batch, the prefill action generator), so a resumed run
    continues exactly.  Non-finite losses or parameters raise DivergenceError at log and checkpoint
    times.

    Diagnostics (`plasticity/...`) are measured on a fresh batch drawn uniformly from the whole
    replay buffer, i.e. from the distribution the updates sample from at that moment, by a
    generator seeded from (seed, update count) (`probe_seed`); the fixed reference batch drawn at
    the first diagnostic (after prefill: random-policy data) gives `plasticity_ref/...`.

    Curvature at a task start (`plasticity.curvature_task_start`): after a reset, on a fresh
    buffer batch, before the next update (the buffer holds the data the new networks will train
    on).  At a task change of a non-stationary env (its `env_metrics()` value changes at an episode
    end), the buffer holds no data of the new task yet, and the Hessian of the new task's loss is
    what the papers measure at a task start; so the loop waits for the first `probe_rows` (the
    rows of every other curvature measurement, min(batch size, PROBE_SIZE)) transitions of the new
    task and measures on exactly those (`ReplayBuffer.recent`), before the updates of the step that
    completes them.  The networks have then made probe_rows · replay_ratio updates since the change
    (those of the step that ended the old task's episode included), logged as
    `curvature_task/updates_since_change`; with uniform replay from a buffer of
    ≥ 10⁵ transitions almost none of their samples were new-task data, so the parameters are
    still essentially those the old task left.  Another change before the rows are complete
    restarts the wait; the wait survives a checkpoint.
    """
    from rl_plasticity.envs.nonstationary import follow_training, metrics_source  # no MuJoCo import with loops

    s = schedule
    control = control or LoopControl()
    r = control.resume
    metrics: dict[str, torch.Tensor] = {}
    if env_metrics is None:
        env_metrics = metrics_source(env)
    if r is None:
        env.action_space.seed(s.seed)
        obs, _ = env.reset(seed=s.seed)
        episode_return, episode_length, first = 0.0, 0, 1
        probe: Batch | None = None  # fixed reference batch (plasticity_ref/ tags), drawn once
        last_diagnostics: int | None = None
        last_curvature: int | None = None
        last_eval: dict[str, float] = {}
        task = task_of(env_metrics)  # the env's task (None: stationary)
        task_wait: dict[str, int] | None = None  # a task change waiting for its first probe_rows transitions
    else:
        env.action_space.np_random.bit_generator.state = r["action_rng"]
        last_curvature = r.get("last_curvature")
        task = r["task"] if "task" in r else task_of(env_metrics)
        task_wait = dict(r["task_wait"]) if r.get("task_wait") is not None else None
        obs = r["obs"].numpy()
        episode_return, episode_length, first = r["episode_return"], r["episode_length"], r["step"] + 1
        probe = Batch(*r["probe"]) if r["probe"] is not None else None
        last_diagnostics, last_eval = r["last_diagnostics"], dict(r["last_eval"])
    meter = RateMeter(first - 1, agent.update_count)
    probe_rows = min(s.batch_size, PROBE_SIZE)
    curvature = curvature_config(agent, probe_rows)
    resets_seen = getattr(agent, "reset_count", 0)

    def loop_state(step: int) -> dict[str, Any]:
        return {"step": step, "obs": _np_state(obs), "episode_return": episode_return,
                "episode_length": episode_length, "probe": tuple(probe) if probe is not None else None,
                "last_diagnostics": last_diagnostics, "last_curvature": last_curvature, "last_eval": dict(last_eval),
                "action_rng": env.action_space.np_random.bit_generator.state, "task": task,
                "task_wait": dict(task_wait) if task_wait is not None else None}

    for step in range(first, s.total_steps + 1):
        if step <= s.prefill_steps or len(buffer) < min(s.prefill_steps, s.batch_size):
            action = env.action_space.sample()
        else:
            action = agent.act(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        # `next_obs` is the true next observation also at a truncation, so bootstrapping from it
        # is right; only `terminated` is stored as a terminal flag.
        buffer.add(obs, action, reward, next_obs, terminated)
        episode_return += float(reward)
        episode_length += 1
        if task_wait is not None:
            task_wait["rows"] += 1
            if task_wait["rows"] >= probe_rows:  # the first probe_rows transitions of the new task
                seed = probe_seed(s.seed, agent.update_count) + 1
                log_curvature(agent, logger, buffer.recent(min(probe_rows, len(buffer))), seed, step, task_start=True,
                              updates_since_change=agent.update_count - task_wait["updates"])
                task_wait = None
        if terminated or truncated:
            logger.episode(episode_return, episode_length, step)
            if env_metrics is not None:
                logger.scalars(env_metrics(), step)
                new_task = task_of(env_metrics)
                if new_task != task and curvature is not None and curvature.curvature_task_start:
                    task_wait = {"rows": 0, "updates": agent.update_count}  # the next transition is the new task's
                if new_task != task:
                    task_changed(agent)  # interventions that act at a task change
                task = new_task
            obs, _ = env.reset()
            episode_return, episode_length = 0.0, 0
        else:
            obs = next_obs

        if step >= s.prefill_steps and len(buffer) >= min(max(s.prefill_steps, 1), s.batch_size):
            metrics = yield buffer.sample(s.replay_ratio, s.batch_size)
            if curvature is not None and agent.reset_count != resets_seen:
                resets_seen = agent.reset_count  # a reset starts a new task: measure at its start
                if curvature.curvature_task_start:
                    seed = probe_seed(s.seed, agent.update_count) + 1
                    log_curvature(agent, logger, buffer.probe(probe_rows, seed), seed, step, task_start=True)

        stop = control.should_stop()
        if step % s.log_every == 0 or step == s.total_steps:
            check_finite(agent, metrics, step)
            sps, ups = meter.rates(step, agent.update_count)
            values = dict(metrics)
            if agent.update_count > 0 and (last_diagnostics is None
                                           or agent.update_count - last_diagnostics >= s.diagnostics_every):
                size = min(s.batch_size, PROBE_SIZE)
                if probe is None:
                    probe = buffer.probe(size, s.seed)
                current = buffer.probe(size, probe_seed(s.seed, agent.update_count))
                values.update(probe_diagnostics(agent, current, probe))
                last_diagnostics = agent.update_count
            if (curvature is not None and curvature.curvature_every is not None and agent.update_count > 0
                    and (last_curvature is None or agent.update_count - last_curvature >= curvature.curvature_every)):
                seed = probe_seed(s.seed, agent.update_count) + 1
                log_curvature(agent, logger, buffer.probe(probe_rows, seed), seed, step, task_start=False)
                last_curvature = agent.update_count
            logger.scalars(values, step)  # the only host sync of the update metrics
            logger.scalar(names.ENV_STEPS_PER_S, sps, step)
            logger.scalar(names.UPDATES_PER_S, ups, step)
            logger.progress(step, agent.update_count, s.prefill_steps)
        else:
            logger.tick(step, agent.update_count, s.prefill_steps)
        if s.eval_episodes > 0 and (step % s.eval_every == 0 or step == s.total_steps):
            follow_training(eval_env, env)
            last_eval = evaluate_and_log(agent, eval_env, logger, step, s.eval_episodes, s.seed, s.gamma)
            if s.eval_all_tasks:
                evaluate_tasks_and_log(agent, eval_env, logger, step, s.eval_episodes, s.seed, last_eval)
        if step % s.checkpoint_every == 0 or step == s.total_steps or stop:
            check_finite(agent, metrics, step)
            save_checkpoint(step, loop_state(step))
        if stop and step < s.total_steps:
            return LoopResult(last_eval, step, preempted=True)
    return LoopResult(last_eval, s.total_steps)


class OnPolicyAgent(Protocol):
    update_count: int

    def explore(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...

    def values(self, obs: np.ndarray) -> np.ndarray: ...

    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray: ...

    def value(self, obs: np.ndarray) -> float: ...

    def update(self, rollout: dict[str, np.ndarray]) -> dict[str, torch.Tensor]: ...

    def diagnostics(self, obs: torch.Tensor) -> dict[str, torch.Tensor]: ...


@dataclasses.dataclass
class OnPolicySchedule:
    """When things happen, in environment steps summed over the vector envs."""

    total_steps: int
    rollout_steps: int               # vector steps per rollout
    eval_every: int
    eval_episodes: int
    log_every: int
    checkpoint_every: int
    seed: int
    gamma: float = 0.99
    gae_lambda: float = 0.95
    diagnostics_every: int = 16_000  # gradient updates between plasticity diagnostics
    eval_all_tasks: bool = False     # also evaluate on every task of the env (evaluate_tasks_and_log)


def _crossed(before: int, after: int, every: int) -> bool:
    return after // every > before // every


def run_on_policy(agent: OnPolicyAgent, envs: gym.vector.VectorEnv, eval_env: gym.Env, logger: Logger,
                  schedule: OnPolicySchedule, save_checkpoint: Callable[[int, dict[str, Any]], None],
                  env_metrics: Callable[[], list[dict[str, float]]] | None = None,
                  control: LoopControl | None = None) -> LoopResult:
    """Collect rollouts and update after each (see `on_policy_steps`)."""
    return drive(on_policy_steps(agent, envs, eval_env, logger, schedule, save_checkpoint, env_metrics,
                                 control), agent.update)


def on_policy_steps(agent: OnPolicyAgent, envs: gym.vector.VectorEnv, eval_env: gym.Env, logger: Logger,
                    schedule: OnPolicySchedule, save_checkpoint: Callable[[int, dict[str, Any]], None],
                    env_metrics: Callable[[], list[dict[str, float]]] | None = None,
                    control: LoopControl | None = None) -> LoopSteps:
    """Collect rollouts of `rollout_steps` vector steps, update after each, until `total_steps`.

    `envs` must auto-reset in the same step (gymnasium's SAME_STEP mode), so that a truncated
    episode's final observation is at hand for bootstrapping.  `env_metrics()` (a non-stationary
    env's `env/friction`, `env/task`; by default what each sub-env reports through
    envs/nonstationary.py) gives each sub-env's scalars, logged at every episode end.  Before each
    evaluation the evaluation env follows the first sub-env's task (`follow_training`); with
    `schedule.eval_all_tasks` it is then evaluated on every task too.
    A stop request checkpoints after the current vector step, partial rollout included.
    Diagnostics (`plasticity/...`) are measured on `PROBE_SIZE` rows drawn (`probe_seed`) from the
    rollout just trained on, its raw observations normalised with the current statistics; the
    first rollout's raw observations, normalised likewise, are the fixed reference
    (`plasticity_ref/...`).  Checkpoints written before this kept the first rollout's normalised
    observations (`probe`); a run resumed from one uses those as its reference.
    """
    from rl_plasticity.buffers import RolloutBuffer
    from rl_plasticity.envs.nonstationary import episode_metrics, find_nonstationary, follow_training

    s = schedule
    control = control or LoopControl()
    r = control.resume
    n_envs = envs.num_envs
    subenvs = list(getattr(envs, "envs", []))  # a SyncVectorEnv's own envs: their tasks and metrics
    if env_metrics is None and subenvs and find_nonstationary(subenvs[0]) is not None:
        env_metrics = lambda: [episode_metrics(e) for e in subenvs]  # noqa: E731
    obs_dim, action_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    rollout = RolloutBuffer(s.rollout_steps, n_envs, obs_dim, action_dim)
    raw_obs = np.zeros((s.rollout_steps, n_envs, obs_dim), dtype=np.float32)  # the rollout's raw observations
    usable = (s.total_steps // n_envs) * n_envs
    normalize = getattr(agent, "normalize", None)
    if r is None:
        obs, _ = envs.reset(seed=s.seed)
        episode_return = np.zeros(n_envs)
        episode_length = np.zeros(n_envs, dtype=np.int64)
        last_eval: dict[str, float] = {}
        reference: torch.Tensor | None = None  # the first rollout's raw observations
        reference_normalised = False  # True: `reference` is an old checkpoint's normalised probe
        last_diagnostics: int | None = None
        last_curvature: int | None = None
        rollout_task = task_of(env_metrics)  # the task (friction, task index) the rollout began in
        step = before = length = 0
        stale_raw = False
        final_values: dict[tuple[int, int], float] = {}
        if env_metrics is not None:
            logger.scalars(env_metrics()[0], 0)
    else:
        obs = r["obs"].numpy().copy()
        episode_return, episode_length = r["episode_return"].numpy().copy(), r["episode_length"].numpy().copy()
        last_eval, last_diagnostics = dict(r["last_eval"]), r["last_diagnostics"]
        last_curvature, rollout_task = r.get("last_curvature"), r.get("rollout_task")
        reference = r.get("reference_raw", r.get("probe"))
        reference_normalised = "reference_raw" not in r and reference is not None
        if "raw_obs" in r:
            raw_obs[: r["raw_obs"].shape[0]] = r["raw_obs"].numpy()
        stale_raw = "raw_obs" not in r and rollout.pos > 0  # older checkpoint: only normalised rows kept
        step, before, length = r["step"], r["before"], r["length"]
        final_values = {(int(t), int(i)): float(v) for t, i, v in r["final_values"]}
        rollout.load_state_dict(r["rollout"])
    meter = RateMeter(step, agent.update_count)
    curvature = curvature_config(agent, min(s.rollout_steps * n_envs, PROBE_SIZE))
    resets_seen = getattr(agent, "reset_count", 0)

    def curvature_rows(data: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
        idx = torch.randperm(data["obs"].shape[0], generator=torch.Generator().manual_seed(seed))[:PROBE_SIZE]
        idx = idx.sort().values.numpy()
        return {k: v[idx] for k, v in data.items()}

    def loop_state() -> dict[str, Any]:
        return {"step": step, "before": before, "length": length, "obs": _np_state(obs),
                "episode_return": _np_state(episode_return), "episode_length": _np_state(episode_length),
                "last_eval": dict(last_eval), "reference_raw": reference, "last_diagnostics": last_diagnostics,
                "raw_obs": _np_state(raw_obs[: rollout.pos]), "last_curvature": last_curvature,
                "rollout_task": rollout_task,
                "final_values": [[t, i, v] for (t, i), v in final_values.items()], "rollout": rollout.state_dict()}

    metrics: dict[str, torch.Tensor] = {}
    while step < usable:
        if rollout.pos == 0:
            before, final_values, stale_raw = step, {}, False
            length = min(s.rollout_steps, (usable - step) // n_envs)
        while rollout.pos < length:
            t = rollout.pos
            raw_obs[t] = obs
            norm_obs, action, log_prob, value = agent.explore(obs)
            next_obs, reward, terminated, truncated, info = envs.step(np.clip(action, -1.0, 1.0))
            rollout.add(norm_obs, action, log_prob, value, reward, terminated, truncated)
            step += n_envs
            episode_return += reward
            episode_length += 1
            ended = np.logical_or(terminated, truncated)
            if ended.any():
                cut = np.flatnonzero(np.logical_and(truncated, np.logical_not(terminated)))
                if len(cut):  # bootstrap through the time limit from the true final observation
                    finals = np.stack([info["final_obs"][i] for i in cut])
                    for i, v in zip(cut, agent.values(finals)):
                        final_values[(t, int(i))] = float(v)
                current = env_metrics() if env_metrics is not None else None
                for i in np.flatnonzero(ended):
                    logger.episode(float(episode_return[i]), int(episode_length[i]), step)
                    if current is not None:
                        logger.scalars(current[i], step)
                    episode_return[i], episode_length[i] = 0.0, 0
            obs = next_obs
            logger.tick(step, agent.update_count)
            if control.should_stop():
                check_finite(agent, metrics, step)
                save_checkpoint(step, loop_state())  # which flushes the logger first
                return LoopResult(last_eval, step, preempted=True)
        if reference is None:
            reference = torch.from_numpy(raw_obs[: rollout.pos].reshape(-1, obs_dim)[:PROBE_SIZE].copy())
        data = rollout.finish(agent.values(obs), final_values, s.gamma, s.gae_lambda)
        if env_metrics is not None:
            task = task_of(env_metrics)
            if rollout_task is not None and task != rollout_task:
                task_changed(agent)
                if curvature is not None and curvature.curvature_task_start:
                    # the task (friction) switched during this rollout: the new task's curvature at
                    # the parameters that ended the previous one, before any update on it
                    seed = probe_seed(s.seed, agent.update_count) + 1
                    log_curvature(agent, logger, curvature_rows(data, seed), seed, step, task_start=True)
            rollout_task = task
        metrics = yield data  # the agent's update on the finished rollout
        if curvature is not None and agent.reset_count != resets_seen:
            resets_seen = agent.reset_count
            if curvature.curvature_task_start:
                seed = probe_seed(s.seed, agent.update_count) + 1
                log_curvature(agent, logger, curvature_rows(data, seed), seed, step, task_start=True)

        if _crossed(before, step, s.log_every) or step == usable:
            check_finite(agent, metrics, step)
            sps, ups = meter.rates(step, agent.update_count)
            values = dict(metrics)
            if last_diagnostics is None or agent.update_count - last_diagnostics >= s.diagnostics_every:
                rows = length * n_envs
                g = torch.Generator().manual_seed(probe_seed(s.seed, agent.update_count))
                idx = torch.randperm(rows, generator=g)[:PROBE_SIZE].sort().values.numpy()
                current = (rollout.obs if stale_raw else raw_obs)[:length].reshape(rows, obs_dim)[idx]
                ref = reference.numpy()
                if normalize is not None:
                    current = current if stale_raw else normalize(current)
                    ref = ref if reference_normalised else normalize(ref)
                values.update(probe_diagnostics(agent, torch.from_numpy(np.asarray(current, dtype=np.float32)),
                                                torch.from_numpy(np.asarray(ref, dtype=np.float32))))
                last_diagnostics = agent.update_count
            if (curvature is not None and curvature.curvature_every is not None
                    and (last_curvature is None or agent.update_count - last_curvature >= curvature.curvature_every)):
                seed = probe_seed(s.seed, agent.update_count) + 1
                log_curvature(agent, logger, curvature_rows(data, seed), seed, step, task_start=False)
                last_curvature = agent.update_count
            logger.scalars(values, step)
            logger.scalar(names.ENV_STEPS_PER_S, sps, step)
            logger.scalar(names.UPDATES_PER_S, ups, step)
            logger.progress(step, agent.update_count)
        if s.eval_episodes > 0 and (_crossed(before, step, s.eval_every) or step == usable):
            if subenvs:
                follow_training(eval_env, subenvs[0])
            last_eval = evaluate_and_log(agent, eval_env, logger, step, s.eval_episodes, s.seed, s.gamma)
            if s.eval_all_tasks:
                evaluate_tasks_and_log(agent, eval_env, logger, step, s.eval_episodes, s.seed, last_eval)
        if _crossed(before, step, s.checkpoint_every) or step == usable:
            check_finite(agent, metrics, step)
            save_checkpoint(step, loop_state())
    return LoopResult(last_eval, step)
