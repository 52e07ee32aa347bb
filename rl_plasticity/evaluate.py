"""Evaluate saved checkpoints: `python -m rl_plasticity.evaluate checkpoint=<file|run dir> episodes=10`.

The env and the agent are rebuilt from the config stored inside the checkpoint, the agent's state
is loaded (PPO's observation statistics included) and the deterministic policy runs `episodes`
episodes.  By default the episodes use training's evaluation seeds (run seed + 1,000,000 + k for
episode k) and, on Slippery Ant, the friction the agent was training on when the checkpoint was
written, so evaluating the checkpoint of a step at which training evaluated gives exactly the
logged `eval/return_mean`.

A checkpoint file gives `<step>.eval.json` beside it; a run dir evaluates every checkpoint and
writes the curve to the run's TensorBoard (`eval/checkpoint_return`) and to
`<run_dir>/checkpoint_returns.csv`; a directory of `seed_<k>/` runs does so for each seed.

This module imports nothing that loads MuJoCo at import time: `main` chooses the OpenGL backend
(MUJOCO_GL, rl_plasticity/video.py) before dm_control and mujoco are first imported.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
import re
import sys
import typing
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

from rl_plasticity.cli import check_like
from rl_plasticity.config import ConfigError, check_type
from rl_plasticity.names import CHECKPOINT_RETURN, NOT_LEARNING_KEYS, did_you_mean
from rl_plasticity.video import default_gl_backend, record_episodes, render_options, select_gl_backend

# Keys of the stored config an evaluation may change; `env.<key>` may be any key of the stored env.
STORED_KEYS = ("seed", "device", "threads")
CSV_NAME = "checkpoint_returns.csv"
TB_TAG = CHECKPOINT_RETURN


@dataclasses.dataclass
class EvaluateConfig:
    """The evaluate command's own keys (defaults and comments in configs/evaluate.yaml)."""

    checkpoint: Optional[str] = None
    episodes: int = 10
    max_episode_steps: Optional[int] = None
    video: bool = False
    video_episodes: int = 1
    video_dir: Optional[str] = None
    video_width: int = 480
    video_height: int = 480


# Values taken verbatim (paths: no YAML/Hydra interpretation of commas, colons, `null`-like names).
_PATH_KEYS = ("checkpoint", "video_dir")


def _defaults() -> dict[str, Any]:
    from omegaconf import OmegaConf

    text = resources.files("rl_plasticity.configs").joinpath("evaluate.yaml").read_text()
    return OmegaConf.to_container(OmegaConf.create(text))  # type: ignore[return-value]


def _parse_value(raw: str) -> Any:
    """A command-line value as Hydra reads it (0.05 → float, null → None, [1,2] → list)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        override = OverridesParser.create().parse_override(f"key={raw}")
    except HydraException:
        return raw
    return raw if override.is_sweep_override() else override.value()


def _valid_keys_text() -> str:
    own = ", ".join(f.name for f in dataclasses.fields(EvaluateConfig))
    return f"{own}; and of the checkpoint's config: {', '.join(STORED_KEYS)}, env.<key>"


def _unknown_key(key: str, choices: Sequence[str], valid_text: str) -> ConfigError:
    return ConfigError(f"unknown key '{key}'.{did_you_mean(key, choices, n=3, cutoff=0.75)} Valid keys: {valid_text}")


USAGE = ("python -m rl_plasticity.evaluate checkpoint=<file or run dir> [episodes=N] [key=value ...] "
         "(--help lists the keys)")


def _not_key_value(arg: str, keys: Sequence[str]) -> str:
    """The one-line answer to an argument that is not `key=value`: a flag spelling of a key
    (`--episodes 3`, `--video-dir=x`) gets its key=value spelling, a bare path `checkpoint=`."""
    name, has_value, value = arg.lstrip("-").partition("=")
    key = name.replace("-", "_")
    if arg.startswith("-") and key in keys:
        return (f"options are key=value, as for rl_plasticity.train: write {key}={value if has_value else '<value>'} "
                f"instead of '{arg}'. Usage: {USAGE}")
    if not arg.startswith("-") and Path(arg).expanduser().exists():
        return f"write checkpoint={arg} (options are key=value, as for rl_plasticity.train). Usage: {USAGE}"
    return f"expected key=value, got '{arg}'. Usage: {USAGE}"


def parse_args(args: Sequence[str]) -> tuple[EvaluateConfig, dict[str, Any]]:
    """Split `key=value` arguments into the command's own config and overrides of the stored config.

    Unknown keys and wrongly typed values raise ConfigError; `env.<key>` is checked against each
    checkpoint's env config later (`apply_overrides`), when it is known.
    """
    defaults = _defaults()
    own: dict[str, Any] = dict(defaults)
    stored: dict[str, Any] = {}
    hints = typing.get_type_hints(EvaluateConfig)
    for arg in args:
        if "=" not in arg or arg.startswith("-"):
            raise ConfigError(_not_key_value(arg, [*defaults, *STORED_KEYS]))
        key, raw = arg.split("=", 1)
        key = key.strip().lstrip("+")
        if key in defaults:
            value = raw if key in _PATH_KEYS else _parse_value(raw)
            if key in _PATH_KEYS and raw in ("", "null", "None"):
                value = None
            own[key] = check_type(key, value, hints[key])
        elif key in STORED_KEYS or (key.startswith("env.") and len(key) > 4):
            stored[key] = _parse_value(raw)
        else:
            raise _unknown_key(key, [*defaults, *STORED_KEYS], _valid_keys_text())
    cfg = EvaluateConfig(**own)
    if cfg.episodes < 1:
        raise ConfigError(f"episodes must be >= 1, got {cfg.episodes}")
    if cfg.max_episode_steps is not None and cfg.max_episode_steps < 1:
        raise ConfigError(f"max_episode_steps must be >= 1 or null, got {cfg.max_episode_steps}")
    if cfg.video:
        if cfg.video_episodes < 1:
            raise ConfigError(f"video_episodes must be >= 1, got {cfg.video_episodes}")
        for key in ("video_width", "video_height"):
            value = getattr(cfg, key)
            if value < 16 or value % 2:
                raise ConfigError(f"{key} must be an even number >= 16 (the H.264 encoder needs even sizes), "
                                  f"got {value}")
    if cfg.checkpoint is None:
        raise ConfigError("checkpoint=<file or run dir> is required, e.g. "
                          "python -m rl_plasticity.evaluate checkpoint=runs/<run>/checkpoints/step_000100000.pt")
    return cfg, stored


def apply_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of a checkpoint's stored `config` with `overrides` (dotted keys) applied; a key the
    stored config lacks, or a value of another type, raises ConfigError naming the valid keys."""
    out = copy.deepcopy(config)
    for key, value in overrides.items():
        parent, _, leaf = key.rpartition(".")
        node = out.get(parent) if parent else out
        if not isinstance(node, dict) or leaf not in node:
            env_keys = [f"env.{k}" for k in sorted(out.get("env", {}))]
            raise _unknown_key(key, [*STORED_KEYS, *env_keys],
                               f"{', '.join(f.name for f in dataclasses.fields(EvaluateConfig))}; "
                               f"and of this checkpoint's config: {', '.join([*STORED_KEYS, *env_keys])}")
        try:
            check_like(key, node[leaf], value)
        except ConfigError:
            raise ConfigError(f"{key} must be like the checkpoint's value {node[leaf]!r}, got {value!r}") from None
        node[leaf] = float(value) if isinstance(node[leaf], float) and isinstance(value, int) else value
    return out


# -- which checkpoints ------------------------------------------------------------------------
@dataclasses.dataclass
class Target:
    """What `checkpoint=` names: one file, or the checkpoints of one or more run dirs."""

    file: Optional[Path] = None
    runs: list[tuple[Path, list[Path]]] = dataclasses.field(default_factory=list)


def _seed_index(path: Path) -> tuple[int, str]:
    m = re.fullmatch(r"seed_(\d+)", path.name)
    return (int(m.group(1)) if m else sys.maxsize, path.name)


def find_checkpoints(path: str | Path) -> Target:
    """Resolve `checkpoint=`: a file; a run dir (`<dir>/checkpoints/step_<N>.pt`); its checkpoints
    folder; or a multi-seed dir (`<dir>/seed_<k>/checkpoints/`).  ConfigError when none is there."""
    from rl_plasticity.checkpoint import list_checkpoints

    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"checkpoint file not found: {p}")
    if p.is_file():
        return Target(file=p)
    if (p / "checkpoints").is_dir():
        found = list_checkpoints(p / "checkpoints")
        if not found:
            raise ConfigError(f"no checkpoints (step_<N>.pt) in {p / 'checkpoints'}")
        return Target(runs=[(p, found)])
    if list_checkpoints(p):  # the checkpoints folder itself: the run dir is its parent
        return Target(runs=[(p.parent if p.name == "checkpoints" else p, list_checkpoints(p))])
    seeds = sorted((d for d in p.glob("seed_*") if (d / "checkpoints").is_dir()), key=_seed_index)
    runs = [(d, list_checkpoints(d / "checkpoints")) for d in seeds]
    for d, found in runs:
        if not found:
            print(f"warning: no checkpoints in {d / 'checkpoints'}; skipping {d.name}", file=sys.stderr, flush=True)
    runs = [(d, found) for d, found in runs if found]
    if not runs:
        raise ConfigError(f"no checkpoints in {p}: expected a step_<N>.pt file, a run dir holding "
                          f"checkpoints/step_<N>.pt, or seed_<k>/checkpoints/ folders")
    return Target(runs=runs)


# -- one checkpoint ---------------------------------------------------------------------------
def _build_agent(state: dict[str, Any], config: dict[str, Any], device: Any) -> Any:
    """The checkpoint's agent, built as train builds it (run/experiment.py), its state loaded."""
    from rl_plasticity.plasticity.mixin import PlasticityConfig
    from rl_plasticity.run.experiment import EXPERIMENTS

    name = state["agent_name"]
    plasticity = PlasticityConfig.from_node(config["plasticity"])
    obs_dim, action_dim = int(state["obs_dim"]), int(state["action_dim"])
    if name not in EXPERIMENTS:
        raise ConfigError(f"checkpoint holds an agent named '{name}'; this version evaluates: {', '.join(EXPERIMENTS)}")
    experiment = EXPERIMENTS[name]
    agent = experiment.make_agent(obs_dim, action_dim, experiment.config_type.from_node(config["agent"]), plasticity,
                                  device, seed=int(config["seed"]))
    try:
        agent.load_state_dict(state["agent"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise ConfigError(f"the checkpoint's agent state does not fit the agent its config describes "
                          f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return agent


_REQUIRED = ("config", "step", "agent_name", "obs_dim", "action_dim", "agent")


def evaluate_checkpoint(path: str | Path, cfg: EvaluateConfig, overrides: Optional[dict[str, Any]] = None,
                        write_json: bool = True) -> dict[str, Any]:
    """Evaluate one checkpoint file; returns (and writes beside it as `.eval.json`) the summary."""
    import numpy as np
    import torch

    from rl_plasticity.checkpoint import load_checkpoint
    from rl_plasticity.envs import make_env
    from rl_plasticity.envs.nonstationary import hold_saved_task
    from rl_plasticity.loops import EVAL_SEED_OFFSET, evaluate
    from rl_plasticity.run.device import resolve_device

    path = Path(path)
    state = load_checkpoint(path)
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ConfigError(f"{path} lacks {', '.join(missing)}: not a training checkpoint of this package")
    overrides = dict(overrides or {})
    config = apply_overrides(state["config"], overrides)
    device = resolve_device(str(config.get("device", "auto")))
    seed = int(config["seed"]) + EVAL_SEED_OFFSET
    threads, previous_threads = config.get("threads"), torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))  # same kernels as training: results match to the bit
    env_cfg = dict(config["env"])
    render = render_options(env_cfg, cfg.video_width, cfg.video_height) if cfg.video else {}
    limit = {"max_episode_steps": cfg.max_episode_steps} if cfg.max_episode_steps is not None else {}
    try:
        agent = _build_agent(state, config, device)
        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always", UserWarning)
            env = make_env(env_cfg, **render, **limit)
        for note in notes:
            if "width/height" in str(note.message):  # e.g. a classic-control env rendering at its own size
                print(f"note: {note.message}", file=sys.stderr, flush=True)
        obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
        if (obs_dim, action_dim) != (int(state["obs_dim"]), int(state["action_dim"])):
            env.close()
            raise ConfigError(f"env {env_cfg.get('name')} has {obs_dim} observations and {action_dim} actions, but "
                              f"the checkpoint's agent was trained with {state['obs_dim']} and {state['action_dim']}")
        # A non-stationary env: training evaluates on the task it trains on (Slippery Ant's friction,
        # continual DMC's task), so the checkpoint is evaluated on the one it was training on.
        nonstationary = hold_saved_task(env, state.get("env"))
        videos: list[Path] = []
        if cfg.video:
            env, videos = record_episodes(env, path, cfg, int(env_cfg.get("action_repeat", 1)))
        try:
            returns = evaluate(agent, env, cfg.episodes, seed)["returns"]
        finally:
            env.close()  # RecordVideo writes the last video here
    finally:
        torch.set_num_threads(previous_threads)
    result = {
        "checkpoint": str(path),
        "step": int(state["step"]),
        "agent": state["agent_name"],
        "env": env_cfg.get("id") if env_cfg.get("kind") == "gym" else env_cfg.get("name"),
        "episodes": cfg.episodes,
        "seeds": [seed, seed + cfg.episodes - 1],
        "return_mean": float(np.mean(returns)),
        "return_std": float(np.std(returns)),  # population std, as training's eval/return_std
        "return_min": float(np.min(returns)),
        "return_max": float(np.max(returns)),
        "returns": [float(r) for r in returns],
        "overrides": overrides,
    }
    if cfg.max_episode_steps is not None:
        result["max_episode_steps"] = cfg.max_episode_steps
    if nonstationary is not None:
        result.update(nonstationary.describe())  # e.g. friction, task
    if videos:
        result["videos"] = [str(v) for v in videos if v.is_file()]
    if write_json:
        stem = path.name[:-3] if path.name.endswith(".pt") else path.name
        out = path.with_name(f"{stem}.eval{_suffix(overrides, cfg.max_episode_steps)}.json")
        out.write_text(json.dumps(result, indent=2) + "\n")
        result["json"] = str(out)
    return result


def _suffix(overrides: dict[str, Any], max_episode_steps: Optional[int] = None) -> str:
    """`_env.friction=0.05` for settings that change results (not device/threads/episodes), so that
    evaluations under different settings are written side by side instead of over each other."""
    parts = [f"{k}={v}" for k, v in sorted(overrides.items()) if k not in NOT_LEARNING_KEYS]
    if max_episode_steps is not None:
        parts.append(f"max_episode_steps={max_episode_steps}")
    return re.sub(r"[^\w.=,+-]", "-", "_" + ",".join(parts)) if parts else ""


# -- a run dir --------------------------------------------------------------------------------
def evaluate_run(run_dir: Path, checkpoints: list[Path], cfg: EvaluateConfig,
                 overrides: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """Evaluate each checkpoint of a run (a damaged one is reported and skipped); the curve goes to
    `<run_dir>/checkpoint_returns.csv` and to the run's TensorBoard as `eval/checkpoint_return`."""
    from torch.utils.tensorboard import SummaryWriter

    from rl_plasticity.checkpoint import CheckpointError

    results = []
    for path in checkpoints:
        try:
            result = evaluate_checkpoint(path, cfg, overrides)
        except CheckpointError as e:
            print(f"warning: skipping {path.name}: {e}", file=sys.stderr, flush=True)
            continue
        _print_result(result)
        results.append(result)
    if not results:
        raise ConfigError(f"none of the {len(checkpoints)} checkpoints in {run_dir / 'checkpoints'} loads")
    suffix = _suffix(dict(overrides or {}), cfg.max_episode_steps)
    csv_path, tag = run_dir / f"{Path(CSV_NAME).stem}{suffix}.csv", TB_TAG + suffix.replace("_", "/", 1)
    columns = ["step", "return_mean", "return_std", "return_min", "return_max", "episodes", "checkpoint"]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    tb = SummaryWriter(log_dir=str(run_dir))
    try:
        for r in results:
            tb.add_scalar(tag, r["return_mean"], r["step"])
    finally:
        tb.close()
    print(f"curve of {len(results)} checkpoint(s): {csv_path} and TensorBoard tag {tag} in {run_dir}", flush=True)
    return results


# The keys of an evaluation summary that evaluate writes itself; any other is an env's `describe()`.
_SUMMARY_KEYS = {"checkpoint", "step", "agent", "env", "episodes", "seeds", "return_mean", "return_std", "return_min",
                 "return_max", "returns", "overrides", "max_episode_steps", "videos", "json"}


def _print_result(r: dict[str, Any]) -> None:
    extra = "".join(f", {k} {v:.4g}" if isinstance(v, float) else f", {k} {v}"
                    for k, v in r.items() if k not in _SUMMARY_KEYS)
    print(f"{Path(r['checkpoint']).name} (step {r['step']:,}, {r['agent']} on {r['env']}{extra}): return mean "
          f"{r['return_mean']:.2f}  std {r['return_std']:.2f}  min {r['return_min']:.2f}  max {r['return_max']:.2f}  "
          f"over {r['episodes']} episode(s)", flush=True)
    for v in r.get("videos", []):
        print(f"  video: {v}", flush=True)


def run(cfg: EvaluateConfig, overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """Evaluate what `cfg.checkpoint` names; returns one summary per evaluated checkpoint."""
    target = find_checkpoints(str(cfg.checkpoint))
    if target.file is not None:
        result = evaluate_checkpoint(target.file, cfg, overrides)
        _print_result(result)
        print(f"wrote {result['json']}", flush=True)
        return [result]
    results = []
    for run_dir, checkpoints in target.runs:
        if len(target.runs) > 1:
            print(f"== {run_dir}", flush=True)
        results += evaluate_run(run_dir, checkpoints, cfg, overrides)
    return results


HELP = """\
python -m rl_plasticity.evaluate checkpoint=<file or run dir> [key=value ...]

Options are key=value, as for rl_plasticity.train: values in Hydra's syntax (null, true, 0.05,
[a,b]); checkpoint= and video_dir= are taken verbatim (Hydra multirun dirs hold '=' and ',').

Rebuilds env and agent from the config stored in each checkpoint and runs the deterministic
policy.  A file writes <file>.eval.json beside it (step_000100000.pt -> step_000100000.eval.json);
a run dir evaluates every checkpoint and writes checkpoint_returns.csv and the TensorBoard tag
eval/checkpoint_return into the run dir; a dir of seed_<k>/ runs does so for each seed.

Overrides of the stored config: seed=N (episode k resets with N + 1000000 + k; default: the run's
seed, as training's evaluation), device=cpu|cuda|auto, threads=N, env.<key>=value
(e.g. env.friction=0.05: Slippery Ant under one fixed friction; default there: the friction the
agent trained on when the checkpoint was written).

Keys of the command, KEY=DEFAULT and meaning (configs/evaluate.yaml):
"""


def help_text() -> str:
    """--help: the usage above, then every key of configs/evaluate.yaml with its default and the
    comment after it there (one source for both)."""
    from rl_plasticity.cli import format_value, two_columns, yaml_comments

    _, meanings = yaml_comments(resources.files("rl_plasticity.configs").joinpath("evaluate.yaml").read_text())
    lines = [line for key, value in _defaults().items()
             for line in two_columns(f"  {key}={format_value(value)}", meanings.get(key, ""), column=28)]
    return HELP + "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command-line entry point; any bad input ends with one `error:` line and exit status 2."""
    from rl_plasticity.cli import fail

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(help_text())
        return
    try:
        cfg, overrides = parse_args(args)
        if cfg.video:
            backend = select_gl_backend()
            if backend:
                print(f"rendering with MUJOCO_GL={backend}", flush=True)
        else:
            default_gl_backend()
        from rl_plasticity.checkpoint import CheckpointError

        try:
            from rl_plasticity.envs import UnknownEnvError
        except (ImportError, AttributeError, RuntimeError) as e:  # dm_control loads MUJOCO_GL's library on import
            raise ConfigError(f"dm_control cannot load its renderer MUJOCO_GL={os.environ.get('MUJOCO_GL', '')} "
                              f"({type(e).__name__}: {e}); unset MUJOCO_GL or set it to egl") from None
        try:
            run(cfg, overrides)
        except (CheckpointError, UnknownEnvError) as e:
            raise ConfigError(str(e)) from None
    except ConfigError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
