import numpy as np
import pytest

from rl_plasticity.envs import DMC_TASKS, make_env
from rl_plasticity.envs.dmc import UnknownEnvError


def dmc(name, **extra):
    domain, task = name.split("-", 1)
    return make_env({"kind": "dmc", "domain": domain, "task": task, **extra})


def test_every_paper_task_is_selectable():
    for name in ["cheetah-run", "walker-run", "quadruped-run", "humanoid-run", "hopper-hop", "finger-turn_hard"]:
        assert name in DMC_TASKS


@pytest.mark.parametrize("name", ["cheetah-run", "humanoid-run", "finger-turn_hard"])
def test_dmc_spaces_are_flat_float32_and_actions_in_unit_box(name):
    env = dmc(name)
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.ndim == 1
    assert obs.shape == env.observation_space.shape
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
    assert obs.dtype == np.float32 and np.isscalar(reward) or np.ndim(reward) == 0
    assert env.observation_space.contains(obs) or np.all(np.isfinite(obs))


def test_dmc_episode_ends_by_truncation_at_1000_steps():
    env = dmc("cartpole-balance")
    env.reset(seed=0)
    env.action_space.seed(0)
    for t in range(1, 1001):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        assert not terminated, "DMC tasks never terminate; the time limit is a truncation"
        if truncated:
            break
    assert t == 1000 and truncated


def test_action_repeat_divides_episode_length_and_sums_rewards():
    base, rep = dmc("cartpole-balance"), dmc("cartpole-balance", action_repeat=4)
    base.reset(seed=3)
    rep.reset(seed=3)
    action = np.zeros(1, dtype=np.float32)
    expected = sum(float(base.step(action)[1]) for _ in range(4))
    assert float(rep.step(action)[1]) == pytest.approx(expected)
    steps = 1
    while True:
        steps += 1
        if rep.step(action)[3]:
            break
    assert steps == 250


def test_seeding_reproduces_and_differs():
    a, b, c = dmc("walker-run"), dmc("walker-run"), dmc("walker-run")
    oa, ob, oc = a.reset(seed=1)[0], b.reset(seed=1)[0], c.reset(seed=2)[0]
    np.testing.assert_array_equal(oa, ob)
    assert not np.array_equal(oa, oc)
    action = np.full(a.action_space.shape, 0.3, dtype=np.float32)
    np.testing.assert_array_equal(a.step(action)[0], b.step(action)[0])


def test_plain_gymnasium_id_is_rescaled_to_unit_actions():
    env = make_env({"kind": "gym", "id": "Pendulum-v1"})
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == (3,)
    env.step(np.ones(1, dtype=np.float32))


def test_unknown_names_list_close_matches():
    with pytest.raises(UnknownEnvError, match="Did you mean: cheetah-run"):
        dmc("cheeta-run")
    with pytest.raises(UnknownEnvError, match="Pendulum-v1"):
        make_env({"kind": "gym", "id": "Pendulm-v1"})
