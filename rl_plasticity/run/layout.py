"""The directories of a run: where each seed of it lives (`seed_runs`), whether a directory holds a
run's work, and removing a directory this process created for a refused config."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rl_plasticity.config import ConfigError
from rl_plasticity.rundir import LOCK_NAME, RunLock, has_event_files, run_dir_override


def run_in_progress(run_dir: Path) -> bool:
    """Whether `run_dir` already holds a run's work: checkpoints or TensorBoard events."""
    from rl_plasticity.checkpoint import list_checkpoints

    return bool(list_checkpoints(run_dir / "checkpoints")) or has_event_files(run_dir)


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


# Run directories given on the command line that existed before this process (never removed).
EXISTING_RUN_DIRS: set[str] = set()
_HYDRA_FILES = {".hydra", "train.log", LOCK_NAME}


def discard_if_unused(run_dir: Path) -> bool:
    """Remove a run directory this process created that holds nothing but Hydra's record and the
    log (a config refused after Hydra made the directory); True if it was removed."""
    import shutil

    if str(run_dir.resolve()) in EXISTING_RUN_DIRS or not run_dir.is_dir():
        return False
    if {p.name for p in run_dir.iterdir()} - _HYDRA_FILES:
        return False
    RunLock.release(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    return True
