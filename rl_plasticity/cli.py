"""Command-line plumbing shared by the entry points: config registration and override checks.

Hydra reports a bad group name with a long list and a bad value not at all (YAML is untyped),
so overrides are checked here first against the composed defaults, giving one message that names
the key, the close matches and the valid choices.
"""
from __future__ import annotations

import re
import sys
import textwrap
from importlib import resources
from typing import Any, Mapping, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from rl_plasticity.config import ConfigError, check_type
from rl_plasticity.names import did_you_mean

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
    if not OmegaConf.has_resolver("rlp_help_groups"):  # used by hydra.help.template in train.yaml
        OmegaConf.register_new_resolver("rlp_help_groups", _help_groups)
        OmegaConf.register_new_resolver("rlp_help_keys", _help_keys)


def group_choices(group: str) -> list[str]:
    """Names selectable as `group=NAME`: the YAML files of configs/<group>/ plus registered nodes."""
    names = {p.name[:-5] for p in resources.files(CONFIG_MODULE).joinpath(group).iterdir() if p.name.endswith(".yaml")}
    repo = ConfigStore.instance().repo.get(group, {})
    names |= {k[:-5] for k in repo if k.endswith(".yaml")}
    return sorted(names)


def _unknown(what: str, name: str, choices: Sequence[str]) -> ConfigError:
    return ConfigError(f"unknown {what} '{name}'.{did_you_mean(name, choices)} Valid choices: {', '.join(choices)}")


def check_like(key: str, default: Any, value: Any) -> Any:
    """`value` if it may replace `default` (bools stay bools, ints accept no floats, lists stay
    lists, ...; None on either side always may), else ConfigError naming `key`: the type of a YAML
    default, checked by the one type checker (config.check_type)."""
    if default is None or value is None:
        return value
    for kind, annotation in ((bool, bool), (int, int), (float, float), (str, str), ((ListConfig, list, tuple), list),
                             ((DictConfig, dict), dict)):
        if isinstance(default, kind):
            check_type(key, value, annotation)
            break
    return value


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
            check_like(key, default, v)


def fail(message: str, code: int = 2) -> None:
    """Print one clear error line and exit without a traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


# -- --help: every key with its one-line meaning ------------------------------------------------
# A key is documented by the comment after it in the YAML file that defines it (configs/*.yaml),
# so adding a key with a comment documents it; the env nodes registered from code (every DMC task)
# are documented here, beside that code.
HELP_WIDTH = 100
KEY_COLUMN = 36
DMC_ENV_KEYS = {
    "kind": "how the env is built: dmc (dm_control suite via shimmy), gym (any gymnasium id), slippery_ant",
    "name": "the env's name in run dirs, logs and reports",
    "domain": "dm_control suite domain",
    "task": "task of the domain",
    "action_repeat": "repeat each action k times (rewards summed); total_steps counts agent steps",
}
_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*)\s*:(?P<rest>.*)$")


def yaml_comments(text: str) -> tuple[str, dict[str, str]]:
    """(header, {dotted key: comment}) of a YAML config file: the comment block that opens the file
    (without `@package` lines) and the `# comment` after each key (nested keys dotted by indentation)."""
    header: list[str] = []
    lines = text.splitlines()
    for line in lines:
        if not line.startswith("#"):
            break
        body = line.lstrip("#").strip()
        if not body.startswith("@package"):
            header.append(body)
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in lines:
        match = _KEY_LINE.match(line)
        if not match:
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        comment = re.search(r"(?:^|\s)#\s?(.*)$", match["rest"])
        if comment and comment[1].strip():
            comments[".".join(k for _, k in stack)] = comment[1].strip()
    return " ".join(h for h in header if h).strip(), comments


def _config_file(path: str) -> str | None:
    node = resources.files(CONFIG_MODULE).joinpath(path)
    return node.read_text() if node.is_file() else None


def key_meanings(choices: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """({dotted key: meaning}, {group: header of the chosen file}) for a config composed with
    `choices` (group -> option).  A group key's meaning comes from the chosen option's file, else
    from the first other option of the group that comments it (e.g. plasticity/none.yaml, which
    every regularizer builds on)."""
    _, meanings = yaml_comments(_config_file("train.yaml") or "")
    meanings = {k: v for k, v in meanings.items() if not k.startswith(("hydra", "defaults"))}
    headers: dict[str, str] = {}
    for group in GROUPS:
        choice = str(choices.get(group))
        sources: list[dict[str, str]] = []
        text = _config_file(f"{group}/{choice}.yaml")
        if text is not None:
            headers[group], own = yaml_comments(text)
            sources.append(own)
        elif group == "env" and "-" in choice:
            headers[group] = f"dm_control suite task {choice} (through shimmy), episodes of 1000 steps"
            sources.append(DMC_ENV_KEYS)
        sources += [yaml_comments(_config_file(f"{group}/{other}.yaml") or "")[1]
                    for other in group_choices(group) if other != choice]
        for comments in reversed(sources):  # the first source that comments a key wins
            meanings.update({f"{group}.{k}": v for k, v in comments.items()})
    return meanings, headers


def format_value(value: Any) -> str:
    """A default as it is typed on the command line (null, true, [256,256], 0.0003)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def two_columns(left: str, meaning: str, width: int = HELP_WIDTH, column: int = KEY_COLUMN) -> list[str]:
    """`left` then `meaning` wrapped into the column from `column` to `width` (on the next line when
    `left` reaches into it)."""
    wrapped = textwrap.wrap(meaning, width - column) or [""]
    if len(left) > column - 2:
        return [left] + [" " * column + w for w in wrapped if w]
    return [(left.ljust(column) + wrapped[0]).rstrip()] + [" " * column + w for w in wrapped[1:]]


def wrap_list(label: str, items: Sequence[str], width: int = HELP_WIDTH, column: int = 22) -> list[str]:
    """`label` and the comma-separated `items`, wrapped to `width` columns with a hanging indent."""
    return textwrap.wrap(", ".join(items), width, initial_indent=label.ljust(column), subsequent_indent=" " * column,
                         break_on_hyphens=False, break_long_words=False)


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, Mapping):
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{prefix}{k}.")]
    return [(prefix[:-1], node)]


def keys_help(config: Mapping[str, Any], choices: Mapping[str, Any]) -> str:
    """The --help listing of a composed config: every key, its default and its meaning, grouped."""
    meanings, headers = key_meanings(choices)
    sections: list[list[str]] = []
    presets = choices.get("experiment") or []
    # A preset (+experiment=NAME, or several: +experiment=[A,B]) sets defaults across groups: say which and why.
    for preset in [presets] if isinstance(presets, str) else list(presets):
        header = yaml_comments(_config_file(f"experiment/{preset}.yaml") or "")[0]
        sections.append(textwrap.wrap(f"+experiment={preset}: {header} The defaults below include it.",
                                      HELP_WIDTH, subsequent_indent="    ", break_on_hyphens=False))
    top: list[str] = []
    for key in config:
        if key in GROUPS or key == "hydra":
            continue
        for dotted, value in _leaves({key: config[key]}):
            top += two_columns(f"  {dotted}={format_value(value)}", meanings.get(dotted, ""))
    sections.append(top)
    for group in GROUPS:
        if group not in config:
            continue
        title = f"{group}={choices.get(group)}" + (f": {headers[group]}" if headers.get(group) else "")
        lines = textwrap.wrap(title, HELP_WIDTH, subsequent_indent="    ", break_on_hyphens=False)
        for dotted, value in _leaves({group: config[group]}):
            lines += two_columns(f"  {dotted}={format_value(value)}", meanings.get(dotted, ""))
        sections.append(lines)
    return "\n\n".join("\n".join(lines) for lines in sections)


def groups_help() -> str:
    """The --help listing of the config groups and their choices, wrapped."""
    lines = []
    for group in (*GROUPS, "experiment"):
        label = f"  +{group}=NAME" if group == "experiment" else f"  {group}=NAME"
        lines += wrap_list(label, group_choices(group))
    return "\n".join(lines)


def _escape(text: str) -> str:
    return text.replace("$", "$$")  # Hydra fills its help template with string.Template


def _help_groups(*, _root_: Any) -> str:
    return _escape(groups_help())


def _help_keys(*, _root_: Any) -> str:
    choices = dict(_root_.hydra.runtime.choices) if "hydra" in _root_ else {}
    if "hydra" in _root_ and "experiment" not in choices:  # several presets (+experiment=[A,B]) are no choice
        from hydra.core.override_parser.overrides_parser import OverridesParser

        for o in OverridesParser.create().parse_overrides(list(_root_.hydra.overrides.task)):
            if o.key_or_group == "experiment" and isinstance(o.value(), list):
                choices["experiment"] = [str(v) for v in o.value()]
    config = {str(k): OmegaConf.to_container(_root_[k], resolve=False) if isinstance(_root_[k], (DictConfig, ListConfig))
              else _root_[k] for k in _root_ if k != "hydra"}
    return _escape(keys_help(config, choices))
