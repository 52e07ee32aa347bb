"""Resume policy: which checkpoint a run continues from, which config keys may change between a
run and its resumption, and the checks made before Hydra creates anything (`preflight`)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from rl_plasticity.config import ConfigError
from rl_plasticity.names import NOT_LEARNING_KEYS
from rl_plasticity.rundir import RunLock, check_trainable
from rl_plasticity.run.layout import EXISTING_RUN_DIRS, run_in_progress, seed_runs
from rl_plasticity.run.settings import settings


# Keys that may differ between a run and its resumption (they do not change what is learned).
RESUMABLE_CHANGES = NOT_LEARNING_KEYS


# Dotted keys that choose an implementation of the same algorithm (equal to float tolerance).
RESUMABLE_IMPLEMENTATION = ("agent.fused",)

# Keys added after runs were written, with the value that does what those runs did: a checkpoint
# whose config lacks one resumes when the key holds that value (None: any value, for keys that act
# only when another key turns them on, e.g. the interventions' own keys).
ADDED_KEYS = {"plasticity.interventions": [], "plasticity.redo": None, "plasticity.shrink_perturb": None,
              "plasticity.partial_reset": None, "plasticity.reset": None, "plasticity.injection": None,
              "agent.activation": "relu", "plasticity.parseval_s": None, "plasticity.parseval_width": None}


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


def forget(run_dir: Path) -> None:
    """Drop the checkpoint `resume_point` kept for `run_dir` (once its seed is restored)."""
    _RESUME_CACHE.pop(str(run_dir.resolve()), None)


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
        EXISTING_RUN_DIRS.add(str(path.resolve()))
    RunLock.acquire(path)  # after the read-only checks: a refused command leaves the directory as it was
