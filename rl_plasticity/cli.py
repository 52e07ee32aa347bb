"""Command-line plumbing shared by the entry points: config registration and override checks.

Hydra reports a bad group name with a long list and a bad value not at all (YAML is untyped),
so overrides are checked here first against the composed defaults, giving one message that names
the key, the close matches and the valid choices.
"""
from __future__ import annotations

import difflib
import sys
from importlib import resources
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from rl_plasticity.config import ConfigError

CONFIG_MODULE = "rl_plasticity.configs"
GROUPS = ("agent", "env", "plasticity")


def _run_dir(run_dir: Any, root: str, stamp: str, overrides: str) -> str:
    from rl_plasticity.rundir import default_name

    if run_dir not in (None, "", "None", "null"):
        return str(run_dir)
    return default_name(root, stamp, overrides)


def register_configs() -> None:
    """Register every DMC task as an `env` choice and the run-directory resolver (idempotent)."""
    from rl_plasticity.envs import DMC_TASKS

    cs = ConfigStore.instance()
    for name in DMC_TASKS:
        domain, task = name.split("-", 1)
        cs.store(group="env", name=name,
                 node={"kind": "dmc", "name": name, "domain": domain, "task": task, "action_repeat": 1})
    if not OmegaConf.has_resolver("rlp_run_dir"):
        OmegaConf.register_new_resolver("rlp_run_dir", _run_dir)


def group_choices(group: str) -> list[str]:
    """Names selectable as `group=NAME`: the YAML files of configs/<group>/ plus registered nodes."""
    names = {p.name[:-5] for p in resources.files(CONFIG_MODULE).joinpath(group).iterdir() if p.name.endswith(".yaml")}
    repo = ConfigStore.instance().repo.get(group, {})
    names |= {k[:-5] for k in repo if k.endswith(".yaml")}
    return sorted(names)


def _unknown(what: str, name: str, choices: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown {what} '{name}'.{hint} Valid choices: {', '.join(choices)}")


def type_ok(default: Any, value: Any) -> bool:
    """Whether `value` may replace `default` (bools stay bools, ints accept no floats, ...)."""
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (ListConfig, list)):
        return isinstance(value, (ListConfig, list))
    if isinstance(default, (DictConfig, dict)):
        return isinstance(value, (DictConfig, dict))
    return True


def _type_name(default: Any) -> str:
    for t, name in ((bool, "true or false"), (int, "an integer"), (float, "a number"), (str, "a string"),
                    (ListConfig, "a list"), (DictConfig, "a mapping")):
        if isinstance(default, t):
            return name
    return type(default).__name__


def check_overrides(args: Sequence[str], config_name: str = "train") -> None:
    """Raise ConfigError for an unknown group choice, unknown key or wrongly typed value in `args`."""
    from hydra import compose, initialize_config_module
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    candidates = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except HydraException:
        return  # malformed syntax: Hydra's own parser error is the clearer message
    first_choice: list[str] = []
    keys = []
    for o in overrides:
        key = o.key_or_group
        if o.is_delete() or key.startswith("hydra") or o.package:
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        if key in GROUPS:
            choices = group_choices(key)
            for v in values:
                if v not in choices:
                    raise _unknown(key, v, choices)
            first_choice.append(f"{key}={values[0]}")
        elif key.startswith("experiment"):
            # Presets switch groups (e.g. agent=ppo): check the other keys against the first preset.
            first_choice.append(f"{'+' if o.is_add() else ''}{key}={values[0]}")
        elif not (o.is_add() or o.is_force_add()):
            keys.append(o)
    if not keys:
        return
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        cfg = compose(config_name, overrides=first_choice)
    for o in keys:
        key = o.key_or_group
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig):
            raise ConfigError(f"unknown key {key}: '{parent}' is not a config section")
        if leaf not in node:
            valid = sorted(str(k) for k in node.keys() if not (not parent and str(k) in GROUPS))
            raise _unknown("key", key, [f"{parent}.{k}" if parent else k for k in valid])
        if OmegaConf.is_interpolation(node, leaf):
            continue
        default = node[leaf]
        values = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
        for v in values:
            if not type_ok(default, v):
                raise ConfigError(f"{key} must be {_type_name(default)}, got {v!r}")


def fail(message: str, code: int = 2) -> None:
    """Print one clear error line and exit without a traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
