"""PPO: GAE against a hand computation, the losses on a fixed batch, the loop's bootstrapping,
checkpoints, and the command line on Slippery Ant (frictions, presets)."""
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from rl_plasticity.agents.ppo import PPOAgent, PPOConfig
from rl_plasticity.buffers import RolloutBuffer, compute_gae
from rl_plasticity.checkpoint import list_checkpoints
from rl_plasticity.config import ConfigError
from rl_plasticity.plasticity.mixin import PlasticityConfig
from tests.test_cli import read_events, train

GAMMA, LAM = 0.9, 0.8


def test_gae_matches_hand_computation_with_truncation_and_termination():
    # Two envs, four steps.  Env 0: truncated (time limit) at t=1, then a new episode.
    # Env 1: terminated at t=2, then a new episode.
    r = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    v = np.array([[0.5, 1.5], [2.5, 3.5], [4.5, 5.5], [6.5, 7.5]])
    v_final_trunc = 10.0      # V of env 0's final observation at its truncation
    v_last = np.array([20.0, 30.0])  # V of the observations after the rollout
    terminated = np.zeros((4, 2), bool)
    truncated = np.zeros((4, 2), bool)
    truncated[1, 0] = True
    terminated[2, 1] = True
    g, gl = GAMMA, GAMMA * LAM

    # Env 0, episode A = steps 0, 1 (bootstrapped from the final obs); episode B = steps 2, 3.
    d0 = [r[0, 0] + g * v[1, 0] - v[0, 0], r[1, 0] + g * v_final_trunc - v[1, 0],
          r[2, 0] + g * v[3, 0] - v[2, 0], r[3, 0] + g * v_last[0] - v[3, 0]]
    a0 = [d0[0] + gl * d0[1], d0[1], d0[2] + gl * d0[3], d0[3]]
    # Env 1, episode A = steps 0..2 (terminal: no bootstrap); episode B = step 3.
    d1 = [r[0, 1] + g * v[1, 1] - v[0, 1], r[1, 1] + g * v[2, 1] - v[1, 1], r[2, 1] - v[2, 1],
          r[3, 1] + g * v_last[1] - v[3, 1]]
    a1 = [d1[0] + gl * d1[1] + gl**2 * d1[2], d1[1] + gl * d1[2], d1[2], d1[3]]
    expected = np.array([a0, a1]).T

    buf = RolloutBuffer(4, 2, obs_dim=3, action_dim=1)
    for t in range(4):
        buf.add(np.zeros((2, 3)), np.zeros((2, 1)), np.zeros(2), v[t], r[t], terminated[t], truncated[t])
    out = buf.finish(v_last, {(1, 0): v_final_trunc}, GAMMA, LAM)
    np.testing.assert_allclose(out["advantage"].reshape(4, 2), expected, rtol=1e-6)
    np.testing.assert_allclose(out["return"].reshape(4, 2), expected + v, rtol=1e-6)

    # The same through compute_gae directly, with λ = 1 giving discounted returns minus values.
    nv = np.array([[v[1, 0], v[1, 1]], [v_final_trunc, v[2, 1]], [v[3, 0], 0.0], list(v_last)])
    adv, ret = compute_gae(r, v, nv, terminated, terminated | truncated, GAMMA, 1.0)
    assert ret[0, 1] == pytest.approx(r[0, 1] + g * r[1, 1] + g**2 * r[2, 1])  # terminal: no bootstrap
    assert ret[0, 0] == pytest.approx(r[0, 0] + g * r[1, 0] + g**2 * v_final_trunc)


def small_agent(**overrides):
    cfg = PPOConfig(hidden_sizes=(32, 32), rollout_steps=64, num_minibatches=4, **overrides)
    return PPOAgent(4, 2, cfg, "cpu", seed=0)


def fixed_rollout(agent, n=256, seed=0):
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n, 4)).astype(np.float32)
    norm, action, log_prob, value = agent.explore(obs)
    advantage = rng.standard_normal(n).astype(np.float32)
    returns = (obs[:, 0] * 3.0 + 1.0).astype(np.float32)
    return {"obs": norm, "action": action, "log_prob": log_prob, "value": value,
            "advantage": advantage, "return": returns}


def test_explore_log_prob_matches_torch_normal():
    agent = small_agent()
    obs = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)
    norm, action, log_prob, value = agent.explore(obs)
    with torch.no_grad():
        mean = agent.actor(torch.from_numpy(norm))
        ref = torch.distributions.Normal(mean, agent.log_std.exp()).log_prob(torch.from_numpy(action)).sum(-1)
        np.testing.assert_allclose(log_prob, ref.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(value, agent.critic(torch.from_numpy(norm)).squeeze(-1).numpy(), rtol=1e-6)
    assert action.shape == (8, 2) and log_prob.shape == value.shape == (8,)


def test_ppo_losses_on_a_fixed_batch_clip_and_fit_values():
    agent = small_agent(epochs=30, lr=3e-3, normalize_obs=False)
    data = fixed_rollout(agent)
    obs = torch.from_numpy(data["obs"])
    target = torch.from_numpy(data["return"])

    def value_loss():
        with torch.no_grad():
            return float(0.5 * (agent.critic(obs).squeeze(-1) - target).square().mean())

    def log_probs():
        with torch.no_grad():
            mean = agent.actor(obs)
            return torch.distributions.Normal(mean, agent.log_std.exp()).log_prob(torch.from_numpy(data["action"])).sum(-1)

    before_v, before_lp = value_loss(), log_probs()
    metrics = agent.update(data)
    assert value_loss() < 0.2 * before_v
    assert float(metrics["losses/clip_fraction"]) > 0.1  # the ratio left [1-ε, 1+ε] and was clipped
    change = log_probs() - before_lp
    adv = torch.from_numpy(data["advantage"])
    # The surrogate raises the probability of actions with positive advantage and lowers the others.
    assert float(change[adv > 0.5].mean()) > 0 > float(change[adv < -0.5].mean())
    # Clipping bounds how far the ratio can be pushed: far less than without it.
    assert float(change.exp().max()) < 5.0
    assert agent.update_count == 30 * 4


def test_ppo_clip_limits_the_policy_change():
    changes = {}
    for clip in (0.05, 10.0):
        agent = small_agent(epochs=10, lr=3e-3, normalize_obs=False, clip=clip, ent_coef=0.0)
        data = fixed_rollout(agent)
        agent.update(data)
        with torch.no_grad():
            mean = agent.actor(torch.from_numpy(data["obs"]))
            lp = torch.distributions.Normal(mean, agent.log_std.exp()).log_prob(torch.from_numpy(data["action"])).sum(-1)
        changes[clip] = float((lp - torch.from_numpy(data["log_prob"])).abs().mean())
    assert changes[0.05] < 0.5 * changes[10.0]


@pytest.mark.parametrize("plasticity", ["none", "l2_er", "cbp_l2", "spectral", "parseval"])
def test_ppo_checkpoint_round_trip_gives_identical_next_update(plasticity):
    cfg = PlasticityConfig(name=plasticity, coef=1e-3, er=plasticity == "l2_er", er_batch=32,
                           cbp=plasticity.startswith("cbp"), cbp_maturity=5, cbp_replacement_rate=0.05)
    a = PPOAgent(4, 2, PPOConfig(hidden_sizes=(32, 32), num_minibatches=4), "cpu", plasticity=cfg, seed=0)
    a.update(fixed_rollout(a, seed=1))
    state = a.state_dict()
    buf = __import__("io").BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    b = PPOAgent(4, 2, PPOConfig(hidden_sizes=(32, 32), num_minibatches=4), "cpu", plasticity=cfg, seed=5)
    b.load_state_dict(torch.load(buf, weights_only=True))
    data = fixed_rollout(a, seed=2)
    torch.manual_seed(3)
    ma = a.update(data)
    torch.manual_seed(3)
    mb = b.update(data)
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    for pa, pb in zip(a.params, b.params):
        assert torch.equal(pa, pb)


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="agent.num_minibatches"):
        PPOConfig.from_node({"rollout_steps": 8, "num_minibatches": 16})
    with pytest.raises(ConfigError, match="agent.clip"):
        PPOConfig.from_node({"clip": 0.0})
    with pytest.raises(ConfigError, match="agent.gae_lambda"):
        PPOConfig.from_node({"gae_lambda": 1.5})


def test_loop_bootstraps_truncations_from_the_final_observation(monkeypatch, tmp_path):
    """Pendulum truncated every 5 steps: the rollout hands V(final obs) of each truncation to GAE."""
    from rl_plasticity import buffers
    from rl_plasticity.envs import make_env
    from rl_plasticity.logging import Logger
    from rl_plasticity.loops import OnPolicySchedule, run_on_policy

    seen = []
    original = buffers.RolloutBuffer.finish

    def spy(self, last_value, final_values, gamma, lam):
        seen.append(dict(final_values))
        return original(self, last_value, final_values, gamma, lam)

    monkeypatch.setattr(buffers.RolloutBuffer, "finish", spy)
    cfg = {"kind": "gym", "id": "Pendulum-v1", "action_repeat": 1}
    envs = gym.vector.SyncVectorEnv([lambda: gym.wrappers.TimeLimit(make_env(cfg).unwrapped, 5)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    agent = PPOAgent(3, 1, PPOConfig(hidden_sizes=(16,), rollout_steps=12, num_minibatches=2), "cpu", seed=0)
    calls = []
    values = agent.values
    monkeypatch.setattr(agent, "values", lambda obs: (calls.append(np.array(obs)), values(obs))[1])
    logger = Logger(str(tmp_path), 24)
    schedule = OnPolicySchedule(total_steps=24, rollout_steps=12, eval_every=10**9, eval_episodes=0, log_every=12,
                                checkpoint_every=10**9, seed=0)
    run_on_policy(agent, envs, make_env(cfg), logger, schedule, lambda step, state: None)
    logger.close()
    assert [sorted(s) for s in seen] == [[(4, 0), (9, 0)], [(2, 0), (7, 0)]]
    finals = [c for c in calls if c.shape[0] == 1]
    assert len(finals) >= 4 and all(np.all(np.isfinite(c)) for c in finals)


@pytest.fixture(scope="module")
def ant_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ant")
    result = train("agent=ppo", "env=slippery-ant", "plasticity=l2_er", "plasticity.er_batch=32", "total_steps=3000",
                   "env.change_every=400", "agent.rollout_steps=500", "agent.num_minibatches=10", "agent.epochs=2",
                   "eval.every=1500", "eval.episodes=1", "log.every=500", "checkpoint.every=1500",
                   f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_slippery_ant_run_logs_frictions_and_ppo_tags(ant_run):
    run_dir, result = ant_run
    acc = read_events(run_dir)
    tags = set(acc.Tags()["scalars"])
    for tag in ("charts/episode_return", "env/friction", "eval/return_mean", "losses/policy", "losses/value",
                "losses/entropy", "losses/approx_kl", "losses/clip_fraction", "losses/plasticity",
                "plasticity/actor/dead_units", "plasticity/critic/feature_effective_rank",
                "plasticity/actor/spectral_norm_max", "plasticity/critic/dormant_fraction"):
        assert tag in tags, tag
    frictions = [e.value for e in acc.Scalars("env/friction")]
    assert len(set(round(f, 6) for f in frictions)) >= 3
    assert all(0.02 <= f <= 2.0 for f in frictions)
    returns = acc.Scalars("charts/episode_return")
    assert returns and returns[-1].step <= 3000
    assert "slippery-ant" in result.stdout


def test_slippery_ant_checkpoint_holds_the_schedule(ant_run):
    run_dir, _ = ant_run
    ckpts = list_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in ckpts] == ["step_000001500.pt", "step_000003000.pt"]
    state = torch.load(ckpts[-1], weights_only=True)
    env_state = state["env"][0]["slippery_ant"]
    # The index moves only at episode ends, so it lags total_steps // change_every by at most one episode.
    assert env_state["total_steps"] == 3000 and 3 <= env_state["schedule_index"] <= 3000 // 400
    assert env_state["friction_seed"] == 0 and env_state["change_every"] == 400
    assert state["agent"]["obs_rms"]["count"] > 3000


def test_ppo_presets_run_with_table_7_values(tmp_path):
    # agent=ppo: Hydra composes a sweep once without its swept values, so the agent-specific keys
    # below need the agent group on the command line too.
    result = train("-m", "+experiment=ppo_bp,ppo_l2,ppo_er,ppo_l2_er,ppo_cbp_l2", "agent=ppo", "total_steps=128",
                   "agent.rollout_steps=64", "agent.num_minibatches=4", "agent.epochs=1", "plasticity.er_batch=16",
                   "eval.episodes=0", "log.every=64", f"hydra.sweep.dir={tmp_path}", timeout=900)
    assert result.returncode == 0, result.stderr
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    configs = {c["plasticity"]["name"]: c for c in
               (torch.load(list_checkpoints(r / "checkpoints")[-1], weights_only=True)["config"] for r in runs)}
    assert set(configs) == {"none", "l2", "er", "l2_er", "cbp_l2"}
    assert all(c["agent"]["name"] == "ppo" and c["agent"]["lr"] == 1e-4 for c in configs.values())
    assert all(c["env"]["name"] == "slippery-ant" and c["env"]["change_every"] == 2_000_000 for c in configs.values())
    assert configs["l2"]["plasticity"]["coef"] == 1e-3
    assert configs["er"]["plasticity"]["er_lr"] == 1e-7 and configs["er"]["plasticity"]["er"]
    assert configs["l2_er"]["plasticity"]["er_lr"] == 1e-6 and configs["l2_er"]["plasticity"]["coef"] == 1e-3
    assert configs["cbp_l2"]["plasticity"]["cbp"] and configs["cbp_l2"]["plasticity"]["cbp_replacement_rate"] == 1e-7


def test_two_vector_envs_train(tmp_path):
    result = train("agent=ppo", "env=gym", "env.id=Pendulum-v1", "agent.num_envs=2", "total_steps=401",
                   "agent.rollout_steps=50", "agent.num_minibatches=4", "agent.epochs=1", "eval.episodes=0",
                   "log.every=100", f"run_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    state = torch.load(list_checkpoints(tmp_path / "checkpoints")[-1], weights_only=True)
    assert state["step"] == 400  # whole vector steps: 200 × 2 envs
    assert math.isclose(state["agent"]["obs_rms"]["count"], 400, rel_tol=1e-3)  # every observation acted on
