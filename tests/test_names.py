"""The names the package's parts share are written once (rl_plasticity/names.py): the close-match
helper, the keys that do not change learning, the metric tags; and one type checker
(config.check_type) answers both a dataclass field and a YAML default."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import rl_plasticity
from rl_plasticity import names
from rl_plasticity.cli import check_like
from rl_plasticity.config import ConfigError, check_type

ROOT = Path(rl_plasticity.__file__).parent


def test_did_you_mean_lists_close_names_or_nothing():
    assert names.did_you_mean("cheeta-run", ["cheetah-run", "walker-run", "hopper-hop"]) == \
        " Did you mean: cheetah-run, walker-run?"
    assert names.did_you_mean("episods", ["episodes", "video_episodes", "seed"], n=3, cutoff=0.75) == \
        " Did you mean: episodes?"
    assert names.did_you_mean("zzz", ["cheetah-run"]) == ""


def test_only_names_matches_close_names():
    users = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if "difflib" in p.read_text())
    assert users == ["names.py"]


def test_resume_ignores_exactly_the_keys_that_do_not_change_learning():
    from rl_plasticity.run.resume import RESUMABLE_CHANGES, config_differences

    assert RESUMABLE_CHANGES is names.NOT_LEARNING_KEYS
    saved = {"seed": 0, "threads": 1, "eval": {"every": 10}, "agent": {"lr": 1.0}}
    now = {"seed": 1, "threads": 4, "eval": {"every": 20}, "agent": {"lr": 2.0}}
    assert config_differences(saved, now) == ["agent.lr (checkpoint: 1.0, now: 2.0)", "seed (checkpoint: 0, now: 1)"]


@pytest.mark.parametrize("default, annotation, bad, message", [
    (True, bool, 1, "k must be true or false, got 1"),
    (3, int, 2.5, "k must be an integer, got 2.5"),
    (0.1, float, "x", "k must be a number, got 'x'"),
    ("a", str, 3, "k must be a string, got 3"),
    ([1, 2], list, 3, "k must be a list, got 3"),
    ({"a": 1}, dict, [1], "k must be a mapping, got [1]"),
])
def test_a_yaml_default_and_a_dataclass_field_are_checked_alike(default, annotation, bad, message):
    for d in (default, OmegaConf.create({"v": default})["v"]):  # plain and as Hydra composes it
        with pytest.raises(ConfigError) as from_default:
            check_like("k", d, bad)
        assert str(from_default.value) == message
    with pytest.raises(ConfigError) as from_field:
        check_type("k", bad, annotation)
    assert str(from_field.value) == message
    assert check_like("k", default, default) == default and check_like("k", default, None) is None
    assert check_like("k", None, bad) == bad
