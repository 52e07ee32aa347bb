"""Train an agent: `python -m rl_plasticity.train agent=sac env=cheetah-run`.

Builds env, buffer, agent and logger from the composed config and hands them to a loop; writes
TensorBoard events and checkpoints into the run directory.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rl_plasticity.cli import check_overrides, fail, register_configs
from rl_plasticity.config import ConfigError, from_node, require
from rl_plasticity.rundir import LOCK_NAME, RunLock, check_trainable, run_dir_override, shell_command

register_configs()


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


# Keys that may differ between a run and its resumption (they do not change what is learned).
RESUMABLE_CHANGES = ("total_steps", "device", "threads", "run_dir", "resume", "compile", "cudagraphs", "num_seeds",
                     "batch_seeds", "eval", "log", "checkpoint")


# Dotted keys that choose an implementation of the same algorithm (equal to float tolerance).
RESUMABLE_IMPLEMENTATION = ("agent.fused",)

# Keys added after runs were written, with the value that does what those runs did: a checkpoint
# whose config lacks one resumes when the key holds that value (None: any value, for the
# interventions' own keys, which act only when plasticity.interventions names them).
ADDED_KEYS = {"plasticity.interventions": [], "plasticity.redo": None, "plasticity.shrink_perturb": None,
              "plasticity.partial_reset": None, "plasticity.reset": None, "plasticity.injection": None}


def config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs, ignoring RESUMABLE_CHANGES."""
    out = []
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        if (not prefix and key in RESUMABLE_CHANGES) or dotted in RESUMABLE_IMPLEMENTATION:
            continue
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if a == "<missing>" and dotted in ADDED_KEYS and ADDED_KEYS[dotted] in (None, b):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, dotted + ".")
        elif a != b:
            out.append(f"{dotted} (checkpoint: {a}, now: {b})")
    return out


def run_in_progress(run_dir: Path) -> bool:
    """Whether `run_dir` already holds a run's work: checkpoints or TensorBoard events."""
    from rl_plasticity.checkpoint import list_checkpoints

    return bool(list_checkpoints(run_dir / "checkpoints")) or any(run_dir.glob("events.out.tfevents.*"))


def seed_runs(run_dir: Path, config: dict[str, Any]) -> list[tuple[int, Path, dict[str, Any]]]:
    """(seed, directory, config) of each seed a run trains.

    `num_seeds=1`: the run itself.  `num_seeds=N`: seeds seed, seed+1, ..., seed+N-1, each in
    `run_dir/seed_<s>/` with the config a single-seed run of that seed has (seed=s, its own
    run_dir), so that each seed directory is also a single-seed run in its own right.  A run_dir
    holding runs of the other layout is refused (ConfigError), nothing on disk touched.
    """
    num_seeds, seed = int(config.get("num_seeds", 1)), int(config["seed"])
    multi = sorted(d.name for d in run_dir.glob("seed_*") if d.is_dir() and run_in_progress(d))
    if num_seeds == 1:
        if multi:
            raise ConfigError(f"run_dir {run_dir} holds a multi-seed run ({', '.join(multi)}): continue it with "
                              f"num_seeds={len(multi)}, or continue one seed alone with "
                              f"{run_dir_override(run_dir / multi[0])}")
        return [(seed, run_dir, config)]
    if run_in_progress(run_dir):
        raise ConfigError(f"run_dir {run_dir} holds a single-seed run, and num_seeds={num_seeds} writes one "
                          f"seed_<s>/ directory per seed: choose another run_dir")
    out = []
    for s in range(seed, seed + num_seeds):
        directory = run_dir / f"seed_{s}"
        out.append((s, directory, {**config, "seed": s, "run_dir": str(directory)}))
    return out


_RESUME_CACHE: dict[str, tuple[Optional[Path], Optional[dict[str, Any]]]] = {}


def resume_point(run_dir: Path, resume: bool, config: dict[str, Any]) -> tuple[Optional[Path], Optional[dict[str, Any]]]:
    """The checkpoint a run in `run_dir` continues from, (None, None) for a new run.

    Refuses (ConfigError) a directory holding a run when `resume` is false, one whose checkpoints
    all fail to load, one written without resumable state, and one whose config differs from
    `config` (naming the keys).  The loaded checkpoint is kept, so the check made before Hydra
    starts and the one in `train` read it once.
    """
    if not run_in_progress(run_dir):
        return None, None
    if not resume:
        raise ConfigError(f"run_dir {run_dir} already holds a run (checkpoints or TensorBoard events) and "
                          f"resume=false: choose another run_dir, or resume=true to continue it")
    key = str(run_dir.resolve())
    if key not in _RESUME_CACHE:
        _RESUME_CACHE[key] = latest_good_checkpoint(run_dir)
    path, state = _RESUME_CACHE[key]
    if state is None:
        if list((run_dir / "checkpoints").glob("*.pt")):
            raise ConfigError(f"run_dir {run_dir} holds checkpoints but none of them loads; nothing was changed")
        return None, None
    if state.get("format", 1) < 2 or "loop" not in state:
        raise ConfigError(f"{path} was written by an older version without resumable state")
    diff = config_differences(state["config"], config)
    if diff:
        raise ConfigError(f"run_dir {run_dir} holds a run with a different config; differing keys: "
                          f"{'; '.join(diff)}. Use another run_dir for a new experiment")
    return path, state


def latest_good_checkpoint(run_dir: Path) -> tuple[Optional[Path], Optional[dict[str, Any]]]:
    """The newest checkpoint of `run_dir` that loads; a damaged newer one is reported and skipped."""
    from rl_plasticity.checkpoint import CheckpointError, list_checkpoints, load_checkpoint

    for path in reversed(list_checkpoints(run_dir / "checkpoints")):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            print(f"warning: skipping {path.name}: {e}", file=sys.stderr, flush=True)
    return None, None


class StopRequest:
    """Stop signals set a flag the loop checks after every env step; it then checkpoints and returns.

    Handled: SIGTERM, SIGINT and SIGUSR2 (what SLURM's `--signal` and submitit send before a time
    limit and, where the cluster allows, at a preemption; SUBMITIT_PREEMPT_SIGNAL may name
    another, handled too). The same signal twice aborts at once; different ones (SLURM sends
    SIGTERM and the user signal together at a preemption) do not.

    Leaving, once the loop has written its checkpoint, each handler replaced for a received
    signal is called, if it is a Python function: in a submitit job (hydra/launcher=submitit_*)
    that is submitit's, which for the preemption signal pickles the job again and requeues it
    (`scontrol requeue` and exit on SLURM, exit status 144 to the local controller); the requeued
    job runs the same Hydra job in the same directory and `train` resumes from the checkpoint.
    Then, in a multirun or a submitit job, the process exits with status 128 + signal instead of
    returning: an in-process sweep must not start its next job after a stop, and submitit must
    not record an unfinished run as a success (a requeued job writes the real result later).
    """

    def __init__(self) -> None:
        self.signal: Optional[int] = None   # the first stop signal received
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    @staticmethod
    def signals() -> tuple[int, ...]:
        import os
        import signal

        preempt = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)
        return tuple(dict.fromkeys((signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, preempt)))

    @staticmethod
    def _in_multirun() -> bool:
        try:
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        except Exception:  # no Hydra job around (train() called directly)
            return False

    def __enter__(self) -> "StopRequest":
        import signal

        for sig in self.signals():
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if signum in self.received:
            raise KeyboardInterrupt
        self.received.append(signum)
        if self.signal is None:
            self.signal = signum
            print(f"\nsignal {signum} received: finishing the current step, then writing a checkpoint", flush=True)

    def __call__(self) -> bool:
        return self.signal is not None

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        import os
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if exc_type is not None or self.signal is None:
            return
        for sig in self.received:
            previous = self._previous.get(sig)
            if callable(previous) and previous is not signal.default_int_handler:
                print(f"checkpoint written; passing signal {sig} on to the handler it replaced "
                      f"({getattr(previous, '__qualname__', previous)})", flush=True)
                previous(sig, None)  # submitit's requeue exits here
        if os.environ.get("SUBMITIT_EXECUTOR") or self._in_multirun():
            print(f"stopped by signal {self.signal} after writing a checkpoint: this job resumes when it is requeued "
                  f"or when the same multirun command runs again with the same hydra.sweep.dir",
                  file=sys.stderr, flush=True)
            raise SystemExit(128 + self.signal)


def _yaml_block(cfg: dict[str, Any]) -> str:
    # Indented by four spaces so TensorBoard's markdown shows it as a code block.
    return "\n".join("    " + line for line in OmegaConf.to_yaml(cfg).splitlines())


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


def train(cfg: DictConfig, run_dir: str) -> dict[str, float]:
    """Run one training job described by `cfg` in `run_dir`; returns the last evaluation summary."""
    container: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    container["run_dir"] = run_dir
    st = settings(container)
    run, evaluation, log, ckpt = st.run, st.evaluation, st.log, st.ckpt
    agent_name, agent_cfg, plasticity_cfg, device = st.agent_name, st.agent_cfg, st.plasticity_cfg, st.device
    if run.threads is not None:
        torch.set_num_threads(run.threads)
    RunLock.acquire(Path(run_dir))

    runs, finished = _start_seeds(Path(run_dir), container, run, agent_name, agent_cfg, plasticity_cfg, device, ckpt)

    from rl_plasticity.checkpoint import CheckpointError
    from rl_plasticity.loops import DivergenceError, LoopControl, drive

    results: dict[int, Any] = {}
    diverged: dict[int, DivergenceError] = {}
    try:
        with StopRequest() as stop:
            seeds_stop = _RoundStop(stop)
            steps = [r.job.run(r.logger, r.checkpoint, r.run, evaluation, log, ckpt, plasticity_cfg,
                               LoopControl(resume=r.resume_loop,
                                           should_stop=stop if run.num_seeds == 1 else seeds_stop))
                     for r in runs]
            if run.num_seeds == 1 and runs:
                try:
                    results[runs[0].seed] = drive(steps[0], runs[0].job.agent.update)
                except DivergenceError as e:
                    raise _record_divergence(runs[0], e)
            elif runs:
                results, diverged = _lockstep(runs, steps, seeds_stop, run.batch_seeds)
    except CheckpointError as e:  # a checkpoint could not be written (disk full): stop, losing nothing
        raise CheckpointError(f"{e}. Free space, then resume with: {shell_command(sys.argv[1:], run_dir=run_dir)}")
    finally:
        for r in runs:
            r.logger.close()
            r.job.close()
    summary = {**finished, **{seed: result.last_eval for seed, result in results.items()}}
    preempted = [r for r in runs if r.seed in results and results[r.seed].preempted]
    if preempted:
        command = shell_command(sys.argv[1:], run_dir=run_dir)
        for r in preempted:
            print(f"stopped at step {results[r.seed].step:,}; checkpoint {r.last_saved or '-'} "
                  f"written{'' if run.num_seeds == 1 else f' (seed {r.seed})'}.", flush=True)
        print(f"Resume with: {command}", flush=True)
    else:
        for r in runs:
            if r.seed in results:
                print(f"done{'' if run.num_seeds == 1 else f' (seed {r.seed})'}: {run.total_steps:,} env steps, "
                      f"{r.job.agent.update_count:,} updates; checkpoints in {r.directory / 'checkpoints'}", flush=True)
    if diverged:
        first = diverged[min(diverged)]
        others = [s for s in sorted(diverged) if s != min(diverged)]
        if others:
            first.args = (f"{first} (seeds {', '.join(map(str, others))} diverged too; the other seeds finished)",)
        raise first
    if run.num_seeds == 1:
        return next(iter(summary.values()), {})
    return _seed_summary(summary)


def _seed_summary(per_seed: dict[int, dict[str, float]]) -> dict[str, float]:
    """Each key's mean over the seeds that have it, and every seed's value as seed_<s>/<key>."""
    out: dict[str, float] = {}
    keys = sorted({k for values in per_seed.values() for k in values})
    for k in keys:
        present = [values[k] for values in per_seed.values() if k in values]
        out[k] = float(np.mean(present))
    for seed, values in sorted(per_seed.items()):
        out.update({f"seed_{seed}/{k}": v for k, v in values.items()})
    return out


@dataclasses.dataclass
class _SeedRun:
    """One seed of a run: its job (agent, envs), logger, resume point, checkpoint writer and its
    own copy of the global generators."""

    seed: int
    directory: Path
    run: Any
    job: Any
    logger: Any
    resume_path: Optional[Path]
    resume_loop: Optional[dict[str, Any]]  # the loop state of the checkpoint it resumed from
    rng: Any
    last_saved: Optional[Path] = None
    checkpoint: Any = None


def _start_seeds(run_dir: Path, container: dict[str, Any], run: RunConfig, agent_name: str, agent_cfg: Any,
                 plasticity_cfg: Any, device: torch.device,
                 ckpt: CheckpointConfig) -> tuple[list[_SeedRun], dict[int, dict[str, float]]]:
    """Every seed's run, restored from its checkpoint; and the last evaluation of each seed whose
    run is already complete.  Checks every seed's resume point before building any, and lets each
    loaded checkpoint (replay buffer included) go once its seed is restored."""
    seeds = seed_runs(run_dir, container)
    points = [resume_point(directory, run.resume, config) for _, directory, config in seeds]
    for _, directory, _ in seeds:
        _RESUME_CACHE.pop(str(directory.resolve()), None)
    runs: list[_SeedRun] = []
    finished: dict[int, dict[str, float]] = {}
    for i, (seed, directory, config) in enumerate(seeds):
        resume_path, resume_state = points[i]
        points[i] = (None, None)
        if resume_state is not None and resume_state["step"] >= run.total_steps:
            print(f"run in {directory} is already complete ({resume_state['step']:,} steps); raise total_steps to "
                  f"continue it", flush=True)
            finished[seed] = dict(resume_state["loop"].get("last_eval", {}))
            continue
        runs.append(_start_seed(seed, directory, config, resume_path, resume_state, agent_name, agent_cfg,
                                plasticity_cfg, dataclasses.replace(run, seed=seed), device, ckpt))
    return runs, finished


def _start_seed(seed: int, directory: Path, container: dict[str, Any], resume_path: Optional[Path],
                resume_state: Optional[dict[str, Any]], agent_name: str, agent_cfg: Any, plasticity_cfg: Any,
                run: RunConfig, device: torch.device, ckpt: CheckpointConfig) -> _SeedRun:
    """Build one seed's job exactly as a single-seed run of that seed builds it, restore its
    checkpoint, open its logger, and keep its global generators (SeedRNG) for the loop."""
    from rl_plasticity.agents.seeds import SeedRNG
    from rl_plasticity.checkpoint import own_storage, save_checkpoint
    from rl_plasticity.logging import Logger

    seed_everything(seed)
    builder = _build_sac if agent_name == "sac" else _build_ppo
    job = builder(container, agent_cfg, plasticity_cfg, run, device)
    resumed_env_exact = True
    if resume_state is not None:
        job.agent.load_state_dict(resume_state["agent"])
        resumed_env_exact = job.restore(resume_state)
        set_rng_state(resume_state["rng"])
    directory.mkdir(parents=True, exist_ok=True)
    start = resume_state["step"] if resume_state is not None else 0
    # purge_step drops what a crashed process logged after its last checkpoint, so the curves
    # continue without duplicated points.
    multi = int(container.get("num_seeds", 1)) > 1
    log = from_node(LogConfig, container["log"], "log")
    mirror = None
    if log.wandb:
        from rl_plasticity.logging import WandbMirror

        top = directory.parent.name if multi else directory.name
        mirror = WandbMirror(directory, container, log.wandb_project, log.wandb_entity,
                             log.wandb_group or (top if multi else None), log.wandb_tags, log.wandb_mode,
                             name=f"{top}/{directory.name}" if multi else top)
    logger = Logger(str(directory), run.total_steps, purge_step=start + 1 if resume_state is not None else None,
                    label=f"seed {seed}" if multi else "", progress_every_s=log.progress_seconds,
                    start_step=start, start_updates=job.agent.update_count, mirror=mirror)
    if resume_state is None:
        logger.text("config", _yaml_block(container))
        logger.dashboard(list(job.agent.networks), **job.dashboard)
    else:
        print(f"resuming from {resume_path} at step {start:,}"
              + ("" if resumed_env_exact else " (this env's state cannot be restored: its episode restarts)"), flush=True)
    print(f"run dir: {directory}  (tensorboard --logdir {shlex.quote(str(directory))})\n"
          f"agent {agent_name} on {container['env']['name']} | seed {seed} | device {device} | obs {job.obs_dim} | "
          f"actions {job.action_dim} | {job.summary} | plasticity {plasticity_cfg.name}", flush=True)
    seed_run = _SeedRun(seed, directory, run, job, logger, resume_path,
                        resume_state["loop"] if resume_state is not None else None, SeedRNG())

    def checkpoint(step: int, loop_state: dict[str, Any]) -> None:
        state = {
            "format": 2,
            "config": container,
            "step": step,
            "agent_name": agent_name,
            "obs_dim": job.obs_dim,
            "action_dim": job.action_dim,
            "agent": job.agent.state_dict(),
            "env": job.env_state(),
            "loop": loop_state,
            "rng": rng_state(),
            **job.extra_state(ckpt.save_replay),
        }
        logger.flush()
        # Each tensor saved as its own bytes only: the replay buffer's filled rows (not its capacity),
        # a batched seed's parameters (not the stacks of all seeds they view).
        seed_run.last_saved = save_checkpoint(own_storage(state), directory / "checkpoints", step, keep=ckpt.keep)

    seed_run.checkpoint = checkpoint
    return seed_run


def _record_divergence(seed_run: _SeedRun, e: Exception) -> Exception:
    """Write `diverged.json` into the seed's directory and name the last good checkpoint."""
    good = seed_run.last_saved or seed_run.resume_path
    record = {"step": e.step, "losses": e.losses, "networks": e.networks,  # type: ignore[attr-defined]
              "last_good_checkpoint": str(good) if good else None, "message": str(e)}
    (seed_run.directory / "diverged.json").write_text(json.dumps(record, indent=2))
    e.args = (f"{e}. Last good checkpoint: {good or 'none'}; details in {seed_run.directory / 'diverged.json'}",)
    return e


class _RoundStop:
    """The stop flag as the seeds of a lockstep run see it: live until the first batched update
    (prefill runs many steps per seed at a time), then read once per round, so that all seeds stop
    after the same update and the resumed run batches them exactly as the uninterrupted one."""

    def __init__(self, stop: Any):
        self.stop = stop
        self.snapshot: Optional[bool] = None

    def new_round(self) -> None:
        self.snapshot = bool(self.stop())

    def __call__(self) -> bool:
        return bool(self.stop()) if self.snapshot is None else self.snapshot


def _seed_group(agents: list[Any], rngs: list[Any], batch_seeds: Optional[bool]) -> Any:
    """How the seeds' updates are served: batched along a seed dimension (`SACSeedGroup` for the
    fused SAC update, `PPOSeedGroup`), or each agent's own update in turn.

    `batch_seeds=None` chooses what measured faster (benchmarks/seed_scaling.py): PPO batched
    everywhere (its 16-row minibatch steps are bound by per-op overhead, which batching shares:
    about 2x with 4-8 seeds on 2 CPU cores); SAC batched on CUDA only (on a CPU its 256-row
    update is bound by the matmuls, which cost the same batched or one by one).
    """
    from rl_plasticity.agents.ppo import PPOAgent
    from rl_plasticity.agents.sac import SACAgent
    from rl_plasticity.agents.seeds import PPOSeedGroup, SACSeedGroup, SequentialGroup

    first = agents[0]
    if isinstance(first, PPOAgent):
        return PPOSeedGroup(agents, rngs) if batch_seeds is not False else SequentialGroup(agents, rngs)
    batched = batch_seeds if batch_seeds is not None else first.device.type == "cuda"
    if batched and isinstance(first, SACAgent) and first.cfg.fused:
        return SACSeedGroup(agents, rngs)
    return SequentialGroup(agents, rngs)


def _lockstep(runs: list[_SeedRun], steps: list[Any], stop: _RoundStop,
              batch_seeds: Optional[bool]) -> tuple[dict[int, Any], dict[int, Any]]:
    """Run the seeds' loops side by side: each advances (under its own global generators) to its
    next update request, then the requests are served together (`_seed_group`): by one batched
    update of all seeds (agents/seeds.py), or by each agent's own update in turn.
    A seed that diverges stops with its diverged.json; the others go on."""
    from rl_plasticity.loops import DivergenceError

    results: dict[int, Any] = {}
    diverged: dict[int, Any] = {}
    pending: dict[int, Any] = {}

    def advance(i: int, value: Any, first: bool = False) -> None:
        with runs[i].rng:
            try:
                pending[i] = next(steps[i]) if first else steps[i].send(value)
            except StopIteration as stop:
                results[runs[i].seed] = stop.value
            except DivergenceError as e:
                diverged[runs[i].seed] = _record_divergence(runs[i], e)
                print(f"seed {runs[i].seed}: {diverged[runs[i].seed]}", file=sys.stderr, flush=True)

    group: Any = None
    members: tuple[int, ...] = ()
    for i in range(len(runs)):
        advance(i, None, first=True)
    while pending:
        stop.new_round()
        order = tuple(sorted(pending))
        if order != members:  # the first round, or a seed finished or diverged before the others
            agents, rngs = [runs[i].job.agent for i in order], [runs[i].rng for i in order]
            group = _seed_group(agents, rngs, batch_seeds)
            members = order
        metrics = group.update([pending.pop(i) for i in order])
        for i, m in zip(order, metrics):
            advance(i, m)
    return results, diverged



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
    restore: Any              # (checkpoint state) -> whether the env state was restored exactly
    extra_state: Any = lambda save_replay: {}
    dashboard: dict[str, Any] = dataclasses.field(default_factory=dict)


def _build_sac(container: dict[str, Any], agent_cfg: Any, plasticity_cfg: Any, run: RunConfig,
               device: torch.device) -> _Job:
    from rl_plasticity.agents.sac import SACAgent
    from rl_plasticity.buffers import ReplayBuffer
    from rl_plasticity.envs import make_env
    from rl_plasticity.envs.nonstationary import episode_metrics, find_nonstationary, follower
    from rl_plasticity.envs.state import capture_env, restore_env
    from rl_plasticity.loops import OffPolicySchedule, off_policy_steps

    env = make_env(container["env"])
    eval_env = make_env(container["env"])
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    agent = SACAgent(obs_dim, action_dim, agent_cfg, device, plasticity=plasticity_cfg, seed=run.seed,
                     compile=run.compile, cudagraphs=run.cudagraphs)
    buffer = ReplayBuffer(obs_dim, action_dim, agent_cfg.buffer_size, device, seed=run.seed)
    nonstationary = find_nonstationary(env) is not None

    def run_loop(logger, checkpoint, run, evaluation, log, ckpt, plasticity_cfg, control):
        schedule = OffPolicySchedule(
            total_steps=run.total_steps, prefill_steps=agent_cfg.prefill_steps, replay_ratio=agent_cfg.replay_ratio,
            batch_size=agent_cfg.batch_size, eval_every=evaluation.every, eval_episodes=evaluation.episodes,
            log_every=log.every, checkpoint_every=ckpt.every, seed=run.seed, gamma=agent_cfg.gamma,
            diagnostics_every=plasticity_cfg.log_every,
        )
        # A non-stationary env: evaluation runs on the task (friction) the agent currently trains on.
        return off_policy_steps(agent, buffer, env, eval_env, logger, schedule, checkpoint, control,
                                before_eval=follower(eval_env, env),
                                env_metrics=(lambda: episode_metrics(env)) if nonstationary else None)

    def close() -> None:
        env.close()
        eval_env.close()

    def restore(state: dict[str, Any]) -> bool:
        if "replay" in state:
            buffer.load_state_dict(state["replay"])
        else:
            print("warning: the checkpoint holds no replay buffer (checkpoint.save_replay=false): learning pauses "
                  "until the buffer again holds min(prefill_steps, batch_size) transitions", file=sys.stderr, flush=True)
        return restore_env(env, state["env"][0])

    return _Job(agent, obs_dim, action_dim,
                f"replay ratio {agent_cfg.replay_ratio} | replay buffer {buffer.nbytes / 2**20:.0f} MiB", run_loop,
                lambda: [capture_env(env)], close, dashboard={"env_tags": tuple(episode_metrics(env))}, restore=restore,
                extra_state=lambda save_replay: {"replay": buffer.state_dict()} if save_replay else {})


def _build_ppo(container: dict[str, Any], agent_cfg: Any, plasticity_cfg: Any, run: RunConfig,
               device: torch.device) -> _Job:
    import gymnasium as gym

    from rl_plasticity.agents.ppo import PPOAgent
    from rl_plasticity.envs import make_env
    from rl_plasticity.envs.nonstationary import episode_metrics, find_nonstationary, follower
    from rl_plasticity.envs.state import capture_env, restore_env
    from rl_plasticity.loops import OnPolicySchedule, on_policy_steps

    env_cfg = dict(container["env"])
    n = agent_cfg.num_envs
    for key in ("change_every", "steps_per_task"):
        if n > 1 and key in env_cfg:
            # Each sub-env counts its own steps: split the period so that changes come every
            # `change_every` (`steps_per_task`) env steps in total.
            env_cfg[key] = max(1, int(env_cfg[key]) // n)
    make_env(env_cfg).close()  # surfaces a bad env config as one error before the vector env starts
    envs = gym.vector.SyncVectorEnv([lambda: make_env(env_cfg) for _ in range(n)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    eval_env = make_env(env_cfg)
    obs_dim, action_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    if run.compile or run.cudagraphs:
        import warnings

        warnings.warn("compile/cudagraphs apply to SAC's fused update; PPO (env-bound at its settings) runs "
                      "eagerly", stacklevel=2)
    agent = PPOAgent(obs_dim, action_dim, agent_cfg, device, plasticity=plasticity_cfg, seed=run.seed)
    nonstationary = find_nonstationary(envs.envs[0]) is not None
    env_metrics = (lambda: [episode_metrics(e) for e in envs.envs]) if nonstationary else None

    def run_loop(logger, checkpoint, run, evaluation, log, ckpt, plasticity_cfg, control):
        schedule = OnPolicySchedule(
            total_steps=run.total_steps, rollout_steps=agent_cfg.rollout_steps, eval_every=evaluation.every,
            eval_episodes=evaluation.episodes, log_every=log.every, checkpoint_every=ckpt.every, seed=run.seed,
            gamma=agent_cfg.gamma, gae_lambda=agent_cfg.gae_lambda, diagnostics_every=plasticity_cfg.log_every,
        )
        # A non-stationary env: evaluation runs on the task (friction) the first sub-env is in.
        return on_policy_steps(agent, envs, eval_env, logger, schedule, checkpoint, env_metrics,
                               before_eval=follower(eval_env, envs.envs[0]), control=control)

    def close() -> None:
        envs.close()
        eval_env.close()

    def restore(state: dict[str, Any]) -> bool:
        envs.reset(seed=run.seed)  # the vector env's own bookkeeping, then each env's saved state
        return all([restore_env(e, s) for e, s in zip(envs.envs, state["env"])])

    batch = agent_cfg.rollout_steps * n
    return _Job(agent, obs_dim, action_dim,
                f"{n} env(s) | rollout {batch} | {agent_cfg.epochs} epochs × {agent_cfg.num_minibatches} minibatches",
                run_loop, lambda: [capture_env(e) for e in envs.envs], close, restore=restore,
                dashboard={"losses": ("policy", "value", "entropy", "approx_kl", "clip_fraction", "plasticity"),
                           "values": ("log_std",), "env_tags": tuple(episode_metrics(envs.envs[0]))})


# Run directories given on the command line that existed before this process (never removed).
_EXISTING_RUN_DIRS: set[str] = set()
_HYDRA_FILES = {".hydra", "train.log", LOCK_NAME}


def _discard_if_unused(run_dir: Path) -> bool:
    """Remove a run directory this process created that holds nothing but Hydra's record and the
    log (a config refused after Hydra made the directory); True if it was removed."""
    import shutil

    if str(run_dir.resolve()) in _EXISTING_RUN_DIRS or not run_dir.is_dir():
        return False
    if {p.name for p in run_dir.iterdir()} - _HYDRA_FILES:
        return False
    RunLock.release(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


@hydra.main(version_base=None, config_path="pkg://rl_plasticity.configs", config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from rl_plasticity.checkpoint import CheckpointError
    from rl_plasticity.envs.dmc import UnknownEnvError
    from rl_plasticity.logging import tee_console
    from rl_plasticity.loops import DivergenceError

    run_dir = HydraConfig.get().runtime.output_dir
    log_file = Path(run_dir) / "train.log"
    try:
        with tee_console(log_file):
            train(cfg, run_dir)
    except (ConfigError, CheckpointError, UnknownEnvError) as e:
        if not _discard_if_unused(Path(run_dir)):
            with open(log_file, "a", encoding="utf-8") as f:
                f.write(f"error: {e}\n")
        fail(str(e))
    except DivergenceError as e:
        with open(log_file, "a", encoding="utf-8") as f:
            f.write(f"error: {e}\n")
        fail(str(e), code=3)


def preflight(args: list[str]) -> None:
    """Before Hydra creates or writes anything: check the whole config (`settings`); for a given
    run_dir, refuse a non-empty directory that holds no run, a run_dir holding a run when
    resume=false or whose checkpoint has a different config, and then take the directory's
    writer lock (`RunLock`).  A refused command creates and changes nothing on disk."""
    if any(a.startswith("-") for a in args):  # a multirun (its jobs check themselves), --help, --cfg, ...
        return
    from hydra import compose, initialize_config_module

    from rl_plasticity.cli import CONFIG_MODULE

    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        cfg = compose("train", overrides=[a for a in args if not a.startswith("hydra")])
    container: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    settings(container)
    run_dir = container.get("run_dir")
    if run_dir in (None, "", "null", "None"):
        return
    path = Path(str(run_dir))
    check_trainable(path)
    if run_in_progress(path) or any(run_in_progress(d) for d in path.glob("seed_*") if d.is_dir()):
        for _, directory, config in seed_runs(path, container):
            resume_point(directory, bool(cfg.resume), config)
    if path.exists():
        _EXISTING_RUN_DIRS.add(str(path.resolve()))
    RunLock.acquire(path)  # after the read-only checks: a refused command leaves the directory as it was


def main() -> None:
    if __name__ == "__main__":
        # `python -m rl_plasticity.train` runs this file as __main__, and cloudpickle (the submitit
        # launcher) pickles __main__'s functions by value without the module's globals, so the
        # job would fail to rebuild them. Run the importable module instead: the job then imports
        # rl_plasticity.train by name.
        import importlib

        importlib.import_module("rl_plasticity.train").main()
        return
    try:
        check_overrides(sys.argv[1:])
        preflight(sys.argv[1:])
    except ConfigError as e:
        fail(str(e))
    _hydra_main()


if __name__ == "__main__":
    main()
