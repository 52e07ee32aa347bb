"""Train an agent: `python -m rl_plasticity.train agent=sac env=cheetah-run`.

Builds each seed's experiment (env, buffer, agent: run/experiment.py) and logger from the
composed config (run/settings.py), restores it from its checkpoint (run/resume.py, run/seed.py),
and runs its loop -- one seed alone, or several in lockstep (run/lockstep.py) -- until the end
or a stop signal (run/stop.py); writes TensorBoard events and checkpoints into the run directory.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from rl_plasticity.cli import check_overrides, fail, register_configs
from rl_plasticity.config import ConfigError
from rl_plasticity.rundir import RunLock, shell_command
from rl_plasticity.run.layout import discard_if_unused
from rl_plasticity.run.lockstep import RoundStop, lockstep
from rl_plasticity.run.resume import preflight
from rl_plasticity.run.seed import record_divergence, seed_summary, start_seeds
from rl_plasticity.run.settings import settings
from rl_plasticity.run.stop import StopRequest
from rl_plasticity.video import default_gl_backend


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

    runs, finished = start_seeds(Path(run_dir), container, run, agent_name, agent_cfg, plasticity_cfg, device, ckpt)

    from rl_plasticity.checkpoint import CheckpointError
    from rl_plasticity.loops import DivergenceError, LoopControl, drive

    results: dict[int, Any] = {}
    diverged: dict[int, DivergenceError] = {}
    try:
        with StopRequest() as stop:
            seeds_stop = RoundStop(stop)
            steps = [r.job.steps(r.logger, r.checkpoint, r.run, evaluation, log, ckpt,
                                 LoopControl(resume=r.resume_loop,
                                             should_stop=stop if run.num_seeds == 1 else seeds_stop))
                     for r in runs]
            if run.num_seeds == 1 and runs:
                try:
                    results[runs[0].seed] = drive(steps[0], runs[0].job.agent.update)
                except DivergenceError as e:
                    raise record_divergence(runs[0], e)
            elif runs:
                results, diverged = lockstep(runs, steps, seeds_stop, run.batch_seeds)
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
    return seed_summary(summary)


@hydra.main(version_base=None, config_path="pkg://rl_plasticity.configs", config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from rl_plasticity.checkpoint import CheckpointError
    from rl_plasticity.envs import UnknownEnvError
    from rl_plasticity.logging import tee_console
    from rl_plasticity.loops import DivergenceError

    run_dir = HydraConfig.get().runtime.output_dir
    log_file = Path(run_dir) / "train.log"
    try:
        with tee_console(log_file):
            train(cfg, run_dir)
    except (ConfigError, CheckpointError, UnknownEnvError) as e:
        if not discard_if_unused(Path(run_dir)):
            with open(log_file, "a", encoding="utf-8") as f:
                f.write(f"error: {e}\n")
        fail(str(e))
    except DivergenceError as e:
        with open(log_file, "a", encoding="utf-8") as f:
            f.write(f"error: {e}\n")
        fail(str(e), code=3)


def main() -> None:
    if __name__ == "__main__":
        # `python -m rl_plasticity.train` runs this file as __main__, and cloudpickle (the submitit
        # launcher) pickles __main__'s functions by value without the module's globals, so the
        # job would fail to rebuild them. Run the importable module instead: the job then imports
        # rl_plasticity.train by name.
        import importlib

        importlib.import_module("rl_plasticity.train").main()
        return
    default_gl_backend()  # before anything imports dm_control (register_configs lists its tasks)
    register_configs()
    try:
        check_overrides(sys.argv[1:])
        preflight(sys.argv[1:])
    except ConfigError as e:
        fail(str(e))
    _hydra_main()


if __name__ == "__main__":
    main()
