import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from rl_plasticity.envs import make_env
from rl_plasticity.envs.dmc import UnknownEnvError
from rl_plasticity.envs.slippery_ant import (
    FRICTION_HIGH,
    FRICTION_LOW,
    SlipperyAnt,
    find_slippery_ant,
    friction_schedule,
)

LOG_LOW, LOG_HIGH = math.log(FRICTION_LOW), math.log(FRICTION_HIGH)


def ant(max_episode_steps=1000, terminate_when_unhealthy=True, **kwargs):
    base = gym.make("Ant-v5", max_episode_steps=max_episode_steps, terminate_when_unhealthy=terminate_when_unhealthy)
    return SlipperyAnt(base, **kwargs)


def run(env, n_steps, seed=0, action_seed=0):
    """Step `env` with random actions, resetting at episode ends; one record per step."""
    actions = np.random.default_rng(action_seed).uniform(-1, 1, size=(n_steps, 8))
    env.reset(seed=seed)
    records = []
    for action in actions:
        _, _, terminated, truncated, _ = env.step(action)
        done = bool(terminated or truncated)
        records.append((env.total_steps, done, env.friction, env.schedule_index))
        if done:
            env.reset()
    return records


def test_friction_changes_only_at_the_first_episode_end_after_each_multiple():
    change_every = 100
    env = ant(max_episode_steps=60, change_every=change_every, friction_seed=3)
    schedule = friction_schedule(3, 50)
    assert env.friction == schedule[0] and env.schedule_index == 0
    records = run(env, 1500)
    assert sum(done for _, done, _, _ in records) > 20  # random actions: many terminations and truncations

    previous_friction, previous_index = schedule[0], 0
    changes = []
    for total, done, friction, index in records:
        if friction != previous_friction or index != previous_index:
            assert done, f"friction changed mid-episode at step {total}"
            changes.append(total)
        previous_friction, previous_index = friction, index
        assert friction == schedule[index]

    # The k-th change is at the first episode end with total_steps >= k * change_every.
    ends = [total for total, done, _, _ in records if done]
    expected = []
    for k in range(1, 1500 // change_every + 1):
        first = next((t for t in ends if t >= k * change_every), None)
        if first is not None and first not in expected:
            expected.append(first)
    assert changes == expected
    assert len(changes) >= 14
    assert any(t > k * change_every for k, t in enumerate(changes, 1)), "some change should have waited for an episode end"
    # Episodes (<= 60 steps) are shorter than change_every, so no index is skipped.
    assert [index for total, _, _, index in records if total in changes] == list(range(1, len(changes) + 1))
    np.testing.assert_array_equal(env.unwrapped.model.geom_friction[:, 0], env.friction)


def test_change_every_shorter_than_an_episode_skips_indices_deterministically():
    # Zero actions never topple the ant: episodes end by truncation at exactly 30 steps.
    env = ant(max_episode_steps=30, change_every=7, friction_seed=1)
    env.reset(seed=0)
    seen = []
    for _ in range(90):
        _, _, terminated, truncated, _ = env.step(np.zeros(8))
        assert not terminated
        if truncated:
            seen.append((env.total_steps, env.schedule_index, env.friction))
            env.reset()
    schedule = friction_schedule(1, 13)
    assert seen == [(30, 4, schedule[4]), (60, 8, schedule[8]), (90, 12, schedule[12])]


def test_schedule_is_log_uniform_on_the_range():
    values = friction_schedule(0, 5000)
    assert values.min() >= FRICTION_LOW and values.max() <= FRICTION_HIGH
    logs = np.log(values)
    assert logs.mean() == pytest.approx((LOG_LOW + LOG_HIGH) / 2, abs=0.05)
    # Log-uniform: the median is the geometric midpoint 0.2, far from the linear midpoint 1.01.
    assert np.median(values) == pytest.approx(0.2, rel=0.1)
    try:
        from scipy import stats
    except ImportError:
        quantiles = np.quantile(logs, [0.1, 0.25, 0.5, 0.75, 0.9])
        uniform = LOG_LOW + np.array([0.1, 0.25, 0.5, 0.75, 0.9]) * (LOG_HIGH - LOG_LOW)
        np.testing.assert_allclose(quantiles, uniform, atol=0.1)
    else:
        assert stats.kstest(logs, "uniform", args=(LOG_LOW, LOG_HIGH - LOG_LOW)).pvalue > 1e-3
        assert stats.kstest(values, "uniform", args=(FRICTION_LOW, FRICTION_HIGH - FRICTION_LOW)).pvalue < 1e-6


def test_schedule_value_is_a_function_of_seed_and_index():
    env = ant(friction_seed=7)
    # Drawn lazily, out of order and past the first cache block, it still matches the batch draw.
    assert env.schedule_value(40) == friction_schedule(7, 41)[40]
    assert env.schedule_value(150) == friction_schedule(7, 151)[150]
    np.testing.assert_array_equal([env.schedule_value(i) for i in range(300)], friction_schedule(7, 300))
    np.testing.assert_array_equal(friction_schedule(7, 60), friction_schedule(7, 200)[:60])
    assert friction_schedule(7, 1)[0] == env.friction


def test_same_seed_same_schedule_other_seed_other_schedule():
    a, b, c = ant(friction_seed=5), ant(friction_seed=5), ant(friction_seed=6)
    sa, sb, sc = ([e.schedule_value(i) for i in range(20)] for e in (a, b, c))
    assert sa == sb and a.friction == b.friction
    assert all(x != y for x, y in zip(sa, sc)) and a.friction != c.friction
    ra = run(ant(max_episode_steps=40, change_every=50, friction_seed=5), 400)
    rb = run(ant(max_episode_steps=40, change_every=50, friction_seed=5), 400)
    assert ra == rb and len({f for _, _, f, _ in ra}) > 3


def test_model_carries_the_friction_and_it_changes_the_dynamics():
    def final_position(friction, action_seed=1):
        env = ant(terminate_when_unhealthy=False, friction=friction)
        original = env.unwrapped.model.geom_friction.copy()
        env.reset(seed=0)
        model = env.unwrapped.model
        assert np.all(model.geom_friction[:, 0] == friction)
        np.testing.assert_array_equal(model.geom_friction[:, 1:], original[:, 1:])  # torsional, rolling untouched
        for action in np.random.default_rng(action_seed).uniform(-1, 1, size=(200, 8)):
            env.step(action)
        return env.unwrapped.data.qpos[:2].copy()

    slippery, grippy = final_position(0.02), final_position(2.0)
    np.testing.assert_array_equal(slippery, final_position(0.02))  # deterministic, so friction is the cause
    assert np.linalg.norm(slippery - grippy) > 0.5


def test_state_dict_round_trip_continues_the_same_schedule(tmp_path):
    # No early terminations: episodes are exactly 40 steps, so two runs end episodes at the same steps.
    kwargs = dict(max_episode_steps=40, terminate_when_unhealthy=False, change_every=50, friction_seed=2)
    uninterrupted = run(ant(**kwargs), 800)

    first = ant(**kwargs)
    head = run(first, 400)
    assert head == uninterrupted[:400]
    state = first.state_dict()
    assert all(v is None or type(v) in (int, float) for v in state.values())
    assert state["total_steps"] == 400 and state["schedule_index"] == first.schedule_index > 0

    torch.save(state, tmp_path / "env.pt")
    loaded = torch.load(tmp_path / "env.pt", weights_only=True)
    assert loaded == state

    resumed = ant(**kwargs)
    assert resumed.friction != first.friction
    resumed.load_state_dict(loaded)
    assert resumed.friction == first.friction and resumed.total_steps == 400
    np.testing.assert_array_equal(resumed.unwrapped.model.geom_friction[:, 0], first.friction)
    tail = run(resumed, 400, seed=1, action_seed=1)
    assert tail == uninterrupted[400:]
    assert len({f for _, _, f, _ in tail}) > 3

    fresh = run(ant(**kwargs), 400, seed=1, action_seed=1)  # without the state it starts over
    assert [f for _, _, f, _ in fresh] != [f for _, _, f, _ in tail]


def test_loading_a_state_of_another_schedule_is_refused():
    state = ant(change_every=50, friction_seed=2).state_dict()
    with pytest.raises(ValueError, match="env.friction_seed"):
        ant(change_every=50, friction_seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="env.change_every"):
        ant(change_every=60, friction_seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="env.friction"):
        ant(change_every=50, friction_seed=2, friction=0.05).load_state_dict(state)


def test_fixed_friction_never_changes():
    env = ant(max_episode_steps=30, change_every=10, friction=0.05)
    records = run(env, 300)
    assert {f for _, _, f, _ in records} == {0.05} and {i for _, _, _, i in records} == {0}
    assert env.total_steps == 300 and sum(d for _, d, _, _ in records) >= 10
    assert np.all(env.unwrapped.model.geom_friction[:, 0] == 0.05)
    assert env.state_dict()["fixed_friction"] == 0.05


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"change_every": 0}, "env.change_every must be >= 1, got 0"),
        ({"change_every": 2.5}, "env.change_every must be >= 1, got 2.5"),
        ({"friction": -1}, "env.friction must be > 0 or null, got -1"),
        ({"friction": 0.0}, "env.friction must be > 0 or null, got 0.0"),
        ({"friction": float("nan")}, "env.friction must be > 0 or null, got nan"),
        ({"friction_seed": -1}, "env.friction_seed must be an integer >= 0, got -1"),
    ],
)
def test_invalid_settings_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ant(**kwargs)
    with pytest.raises(ValueError, match=message):
        make_env({"kind": "slippery_ant", **kwargs})


def test_make_env_standardises_and_find_slippery_ant_finds_the_wrapper():
    env = make_env(
        {"kind": "slippery_ant", "id": "Ant-v5", "change_every": 20, "friction_seed": 4, "action_repeat": 2},
        max_episode_steps=50,
    )
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == env.observation_space.shape == (105,)
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    wrapper = find_slippery_ant(env)
    assert isinstance(wrapper, SlipperyAnt) and wrapper is not env
    assert wrapper.friction == friction_schedule(4, 1)[0]
    env.action_space.seed(0)
    obs, *_ = env.step(env.action_space.sample())
    assert obs.dtype == np.float32
    assert wrapper.total_steps == 2  # raw MuJoCo steps: the wrapper sits below the action repeat
    assert find_slippery_ant(make_env({"kind": "gym", "id": "Pendulum-v1"})) is None


def test_config_file_builds_the_default_schedule():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "env" / "slippery-ant.yaml")
    assert cfg.kind == "slippery_ant" and cfg.change_every == 2_000_000 and cfg.friction is None
    wrapper = find_slippery_ant(make_env(cfg))
    assert wrapper.change_every == 2_000_000 and wrapper.friction == friction_schedule(0, 1)[0]
    fixed = find_slippery_ant(make_env(OmegaConf.merge(cfg, {"friction": 0.05})))
    assert fixed.friction == 0.05


def test_unknown_kind_lists_slippery_ant():
    with pytest.raises(UnknownEnvError, match="dmc, gym, slippery_ant"):
        make_env({"kind": "slippery"})


def test_sac_evaluation_runs_under_the_training_friction(tmp_path, monkeypatch):
    """SAC on Slippery Ant: every evaluation holds the friction the training env has then (the
    schedule has moved past its first value by the time of the evaluation)."""
    from hydra import compose, initialize_config_module

    from rl_plasticity.envs.slippery_ant import SlipperyAnt
    from rl_plasticity.train import train

    held = []
    original = SlipperyAnt.hold_friction

    def record(self, value):
        held.append(value)
        return original(self, value)

    monkeypatch.setattr(SlipperyAnt, "hold_friction", record)
    overrides = ["env=slippery-ant", "env.change_every=100", "+env.max_episode_steps=50", "agent.prefill_steps=100",
                 "agent.replay_ratio=1", "agent.batch_size=32", "agent.hidden_sizes=[32,32]", "total_steps=250",
                 "eval.every=250", "eval.episodes=1", "log.every=250", "checkpoint.every=250", "threads=1"]
    with initialize_config_module(config_module="rl_plasticity.configs", version_base=None):
        cfg = compose("train", overrides=overrides)
    train(cfg, str(tmp_path))
    assert len(held) == 1
    schedule_start = find_slippery_ant(make_env({"kind": "slippery_ant", "change_every": 100})).friction
    assert held[0] != pytest.approx(schedule_start)  # the schedule moved on, and evaluation followed it
