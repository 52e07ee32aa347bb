"""One seed of a run: its experiment built exactly as a single-seed run of that seed builds it,
restored from its checkpoint, with its logger, its checkpoint writer and its own copy of the
global generators; and what is written when it diverges."""
from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from rl_plasticity.config import from_node
from rl_plasticity.run.experiment import EXPERIMENTS, Experiment
from rl_plasticity.run.layout import seed_runs
from rl_plasticity.run.resume import forget, resume_point
from rl_plasticity.run.rng import rng_state, seed_everything, set_rng_state
from rl_plasticity.run.settings import CheckpointConfig, LogConfig, RunConfig
from rl_plasticity.rundir import has_event_files


def _yaml_block(cfg: dict[str, Any]) -> str:
    # Indented by four spaces so TensorBoard's markdown shows it as a code block.
    return "\n".join("    " + line for line in OmegaConf.to_yaml(cfg).splitlines())


@dataclasses.dataclass
class SeedRun:
    """One seed of a run: its job (the experiment: agent, envs), logger, resume point, checkpoint
    writer and its own copy of the global generators."""

    seed: int
    directory: Path
    run: RunConfig
    job: Experiment
    logger: Any
    resume_path: Optional[Path]
    resume_loop: Optional[dict[str, Any]]  # the loop state of the checkpoint it resumed from
    rng: Any
    last_saved: Optional[Path] = None
    checkpoint: Any = None


def start_seeds(run_dir: Path, container: dict[str, Any], run: RunConfig, agent_name: str, agent_cfg: Any,
                plasticity_cfg: Any, device: torch.device,
                ckpt: CheckpointConfig) -> tuple[list[SeedRun], dict[int, dict[str, float]]]:
    """Every seed's run, restored from its checkpoint; and the last evaluation of each seed whose
    run is already complete.  Checks every seed's resume point before building any, and lets each
    loaded checkpoint (replay buffer included) go once its seed is restored."""
    seeds = seed_runs(run_dir, container)
    points = [resume_point(directory, run.resume, config) for _, directory, config in seeds]
    for _, directory, _ in seeds:
        forget(directory)
    runs: list[SeedRun] = []
    finished: dict[int, dict[str, float]] = {}
    for i, (seed, directory, config) in enumerate(seeds):
        resume_path, resume_state = points[i]
        points[i] = (None, None)
        if resume_state is not None and resume_state["step"] >= run.total_steps:
            print(f"run in {directory} is already complete ({resume_state['step']:,} steps); raise total_steps to "
                  f"continue it", flush=True)
            finished[seed] = dict(resume_state["loop"].get("last_eval", {}))
            continue
        runs.append(start_seed(seed, directory, config, resume_path, resume_state, agent_name, agent_cfg,
                               plasticity_cfg, dataclasses.replace(run, seed=seed), device, ckpt))
    return runs, finished


def start_seed(seed: int, directory: Path, container: dict[str, Any], resume_path: Optional[Path],
               resume_state: Optional[dict[str, Any]], agent_name: str, agent_cfg: Any, plasticity_cfg: Any,
               run: RunConfig, device: torch.device, ckpt: CheckpointConfig) -> SeedRun:
    """Build one seed's job exactly as a single-seed run of that seed builds it, restore its
    checkpoint, open its logger, and keep its global generators (SeedRNG) for the loop."""
    from rl_plasticity.agents.seeds import SeedRNG
    from rl_plasticity.checkpoint import own_storage, save_checkpoint
    from rl_plasticity.logging import Logger

    seed_everything(seed)
    job = EXPERIMENTS[agent_name](container, agent_cfg, plasticity_cfg, run, device)
    resumed_env_exact = True
    if resume_state is not None:
        job.agent.load_state_dict(resume_state["agent"])
        resumed_env_exact = job.restore(resume_state)
        set_rng_state(resume_state["rng"])
    directory.mkdir(parents=True, exist_ok=True)
    start = resume_state["step"] if resume_state is not None else 0
    # purge_step drops what a crashed process logged after its last checkpoint, so the curves
    # continue without duplicated points; a fresh start over event files (an attempt stopped
    # before its first checkpoint) purges from step 0, so that attempt's points are hidden from
    # TensorBoard and the report (its file stays on disk).
    if resume_state is not None:
        purge_step: Optional[int] = start + 1
    else:
        purge_step = 0 if has_event_files(directory) else None
    multi = int(container.get("num_seeds", 1)) > 1
    log = from_node(LogConfig, container["log"], "log")
    mirror = None
    if log.wandb:
        from rl_plasticity.logging import WandbMirror

        top = directory.parent.name if multi else directory.name
        mirror = WandbMirror(directory, container, log.wandb_project, log.wandb_entity,
                             log.wandb_group or (top if multi else None), log.wandb_tags, log.wandb_mode,
                             name=f"{top}/{directory.name}" if multi else top)
    logger = Logger(str(directory), run.total_steps, purge_step=purge_step,
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
          f"actions {job.action_dim} | {job.summary} | plasticity {plasticity_cfg.name} | activation {job.agent.cfg.activation} "
          f"| parameters: " + ", ".join(f"{k} {n:,}" for k, n in job.agent.parameter_counts().items()), flush=True)
    seed_run = SeedRun(seed, directory, run, job, logger, resume_path,
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


def record_divergence(seed_run: SeedRun, e: Exception) -> Exception:
    """Write `diverged.json` into the seed's directory and name the last good checkpoint."""
    good = seed_run.last_saved or seed_run.resume_path
    record = {"step": e.step, "losses": e.losses, "networks": e.networks,  # type: ignore[attr-defined]
              "last_good_checkpoint": str(good) if good else None, "message": str(e)}
    (seed_run.directory / "diverged.json").write_text(json.dumps(record, indent=2))
    e.args = (f"{e}. Last good checkpoint: {good or 'none'}; details in {seed_run.directory / 'diverged.json'}",)
    return e


def seed_summary(per_seed: dict[int, dict[str, float]]) -> dict[str, float]:
    """Each key's mean over the seeds that have it, and every seed's value as seed_<s>/<key>."""
    out: dict[str, float] = {}
    keys = sorted({k for values in per_seed.values() for k in values})
    for k in keys:
        present = [values[k] for values in per_seed.values() if k in values]
        out[k] = float(np.mean(present))
    for seed, values in sorted(per_seed.items()):
        out.update({f"seed_{seed}/{k}": v for k, v in values.items()})
    return out
