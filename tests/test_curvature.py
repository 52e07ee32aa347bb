"""Curvature and representation diagnostics (issue 18), checked against exact computations on
networks small enough for torch.func.hessian; and the probes the loops measure them on."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from rl_plasticity.buffers import ReplayBuffer
from rl_plasticity.envs import make_env


class NullLogger:
    def __getattr__(self, name):
        return lambda *a, **k: None


# -- probes (part 1) --------------------------------------------------------------------------
def test_sac_probe_after_prefill_holds_policy_transitions(monkeypatch):
    """Each SAC diagnostic draws a fresh batch from the whole buffer: after prefill it contains
    transitions the policy collected, up to the latest; the reference (plasticity_ref/) is fixed."""
    from rl_plasticity.agents.sac import SACAgent, SACConfig
    from rl_plasticity.loops import OffPolicySchedule, run_off_policy

    env = make_env({"kind": "gym", "id": "Pendulum-v1"})
    agent = SACAgent(3, 1, SACConfig(hidden_sizes=(8, 8), batch_size=32, replay_ratio=1))
    buffer = ReplayBuffer(3, 1, 1000)
    seen, metrics = [], []
    original = agent.diagnostics
    monkeypatch.setattr(agent, "diagnostics", lambda b: (seen.append((b, len(buffer))), original(b))[1])

    class Logger(NullLogger):
        def scalars(self, values, step):
            metrics.append(dict(values))

    sched = OffPolicySchedule(total_steps=300, prefill_steps=50, replay_ratio=1, batch_size=32, eval_every=1000,
                              eval_episodes=0, log_every=100, checkpoint_every=1000, seed=0, diagnostics_every=1)
    run_off_policy(agent, buffer, env, env, Logger(), sched, lambda step, state: None)
    prefill_obs = buffer.obs[:50]

    def from_prefill(batch):
        return (batch.obs[:, None, :] == prefill_obs[None]).all(-1).any(-1)

    # the calls alternate: current batch, then the fixed reference
    current = [b for b, _ in seen[0::2]]
    reference = [b for b, _ in seen[1::2]]
    assert len(current) == 3
    assert not from_prefill(current[-1]).all()  # policy transitions in the probe after prefill
    assert torch.equal(reference[0].obs, reference[-1].obs)  # drawn once, at the first diagnostic
    late = buffer.obs[200:300]  # collected after the second diagnostic
    assert (current[-1].obs[:, None, :] == late[None]).all(-1).any(-1).any()
    assert not torch.equal(current[1].obs, current[2].obs)  # fresh each time
    logged = metrics[-1]
    assert "plasticity/critic/feature_effective_rank" in logged
    assert "plasticity_ref/critic/feature_effective_rank" in logged
    assert "plasticity_ref/critic/param_norm" not in logged


def test_ppo_probe_is_the_current_rollout_normalised_with_current_statistics(monkeypatch):
    from rl_plasticity.agents.ppo import PPOAgent, PPOConfig
    from rl_plasticity.loops import OnPolicySchedule, run_on_policy

    cfg = {"kind": "gym", "id": "Pendulum-v1", "action_repeat": 1}
    envs = gym.vector.SyncVectorEnv([lambda: make_env(cfg)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    agent = PPOAgent(3, 1, PPOConfig(hidden_sizes=(8,), rollout_steps=40, num_minibatches=2, epochs=1), "cpu", seed=0)
    raw, seen = [], []
    explore = agent.explore
    monkeypatch.setattr(agent, "explore", lambda obs: (raw.append(np.array(obs)), explore(obs))[1])
    original = agent.diagnostics
    monkeypatch.setattr(agent, "diagnostics", lambda o: (seen.append(o.clone()), original(o))[1])
    schedule = OnPolicySchedule(total_steps=120, rollout_steps=40, eval_every=10**9, eval_episodes=0, log_every=40,
                                checkpoint_every=10**9, seed=0, diagnostics_every=1)
    run_on_policy(agent, envs, make_env(cfg), NullLogger(), schedule, lambda step, state: None)
    raw = np.concatenate(raw)  # (120, 3)
    last_current, last_reference = seen[-2], seen[-1]
    expected = torch.from_numpy(agent.normalize(raw[80:]))  # last rollout, current statistics
    assert last_current.shape == (40, 3)
    assert torch.allclose(last_current, expected)
    assert torch.allclose(last_reference, torch.from_numpy(agent.normalize(raw[:40])))


# -- curvature (part 2): exact checks on tiny networks -----------------------------------------
from rl_plasticity.plasticity import curvature as C  # noqa: E402


def tiny(hidden=5, inp=3, out=2, seed=0, act=torch.nn.Tanh):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(inp, hidden), act(), torch.nn.Linear(hidden, out)).double()


def mse(forward, data):
    return 0.5 * (forward(data["x"]) - data["y"]).square().sum(-1)


def tiny_data(n=16, inp=3, out=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, inp, generator=g, dtype=torch.float64),
            "y": torch.randn(n, out, generator=g, dtype=torch.float64)}


def exact_spectrum(net, data):
    problem = C.FlatProblem(net, mse, data)
    H = problem.hessian()
    return problem, torch.linalg.eigvalsh(0.5 * (H + H.T))


def test_per_sample_gradients_and_fisher_rank_match_explicit_construction():
    net, data = tiny(), tiny_data(n=12)
    problem = C.FlatProblem(net, mse, data)
    G = problem.per_sample_gradients(12)
    for i in range(12):  # each row is the gradient of that sample's loss
        net.zero_grad()
        mse(net, {k: v[i:i + 1] for k, v in data.items()}).sum().backward()
        assert torch.allclose(G[i], torch.cat([p.grad.flatten() for p in net.parameters()]), atol=1e-12)
    rank, normalised = C.fisher_rank(G)
    explicit = G.T @ G  # the P×P empirical Fisher
    assert rank == C.srank(torch.linalg.svdvals(explicit))
    assert normalised == rank / min(12, problem.dim)
    s = torch.linalg.svdvals(G)
    erank, cond = C.gradient_diversity(G)
    assert erank == pytest.approx(float(torch.exp(-((s / s.sum()) * (s / s.sum()).log()).sum())), rel=1e-9)
    assert cond == pytest.approx(float(s[0] / s[-1]), rel=1e-9)


def test_hvp_is_the_exact_hessian_product():
    net, data = tiny(), tiny_data()
    problem = C.FlatProblem(net, mse, data)
    H = problem.hessian()
    v = torch.randn(problem.dim, dtype=torch.float64)
    assert torch.allclose(problem.hvp(v), H @ v, atol=1e-10)


def test_lanczos_epsilon_rank_density_and_sharpness_match_the_exact_eigendecomposition():
    """With steps ≥ P (full re-orthogonalisation) the Ritz values are H's eigenvalues (to 1e-8);
    the SLQ ε-rank is an unbiased estimate: with 64 probe vectors within 0.05 of the exact
    normalised ε-rank; the density's support is the exact [λ_min, λ_max]."""
    net, data = tiny(), tiny_data()
    problem, lam = exact_spectrum(net, data)
    g = torch.Generator().manual_seed(0)
    spec = C.slq(problem.hvp, problem.dim, problem.dim, 64, g, dtype=torch.float64)
    nodes, weights = spec.flat()
    assert float(nodes.max()) == pytest.approx(float(lam.max()), abs=1e-8)  # sharpness
    assert float(nodes.min()) == pytest.approx(float(lam.min()), abs=1e-8)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    for eps in (1e-3, 0.05, 0.1):
        exact = float((lam.abs() > eps).double().mean())
        assert spec.epsilon_rank(eps) == pytest.approx(exact, abs=0.05)
    # the density integrates to 1 and its mass lies within the exact support (± 4σ)
    sigma = 0.01 * float(lam.max() - lam.min())
    grid = torch.linspace(float(lam.min()) - 10 * sigma, float(lam.max()) + 10 * sigma, 4001, dtype=torch.float64)
    psi = spec.density(grid, sigma)
    assert float(torch.trapezoid(psi, grid)) == pytest.approx(1.0, abs=1e-3)
    outside = (grid < lam.min() - 4 * sigma) | (grid > lam.max() + 4 * sigma)
    assert float(torch.trapezoid(psi * outside, grid)) < 1e-3


def test_few_lanczos_steps_find_the_sharpness():
    net, data = tiny(hidden=16), tiny_data()
    problem, lam = exact_spectrum(net, data)
    spec = C.slq(problem.hvp, problem.dim, 20, 1, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(spec.flat()[0].max()) == pytest.approx(float(lam.max()), rel=1e-6)


def test_gradient_hessian_overlap_matches_exact_including_top_subspace():
    net, data = tiny(), tiny_data()
    problem, _ = exact_spectrum(net, data)
    H = problem.hessian()
    H = 0.5 * (H + H.T)
    lam, Q = torch.linalg.eigh(H)
    g = problem.gradient()
    exact = float(g @ H @ g / (g.norm() * (H @ g).norm()))
    theta, omega = C.lanczos(problem.hvp, g, problem.dim)
    assert C.overlap_from_measure(theta, omega) == pytest.approx(exact, abs=1e-8)
    theta2, omega2 = C.lanczos(problem.hvp, g, 2)  # two steps already give the full-H overlap
    assert C.overlap_from_measure(theta2, omega2) == pytest.approx(exact, abs=1e-8)
    # top subspace (directions-of-curvature.md footnote 6): keep the srank99(|λ|) largest |λ|
    k = C.srank(lam)
    cut = lam.abs().sort(descending=True).values[k - 1]
    Hk = Q @ torch.diag(torch.where(lam.abs() >= cut, lam, torch.zeros_like(lam))) @ Q.T
    exact_top = float(g @ Hk @ g / (g.norm() * (Hk @ g).norm()))
    gap = 0.5 * float(cut + lam.abs().sort(descending=True).values[k])  # between the kept and the dropped
    assert C.overlap_from_measure(theta, omega, gap) == pytest.approx(exact_top, abs=1e-8)
    # and the cut the SLQ spectrum estimates (many vectors, full steps) is that same eigenvalue
    spec = C.slq(problem.hvp, problem.dim, problem.dim, 64, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert spec.top_threshold() == pytest.approx(float(cut), rel=1e-6)


def test_dead_hidden_units_bound_the_hessian_rank_as_theorem_6_2_predicts():
    """spectral-collapse-l2-er.md Theorem 6.2: k dead units of a 2-layer ReLU MLP leave
    rank(H) ≤ P − k(I + O + 1); with all H units dead only the output bias has curvature."""
    inp, hidden, out = 3, 6, 2
    net = tiny(hidden=hidden, inp=inp, out=out, act=torch.nn.ReLU)
    with torch.no_grad():
        net[0].bias.fill_(-100.0)  # every unit dead on the data
    data = tiny_data(n=32, inp=inp, out=out)
    problem, lam = exact_spectrum(net, data)
    P = problem.dim
    bound = P - hidden * (inp + out + 1)
    exact_rank = int((lam.abs() > 1e-9).sum())
    assert P == hidden * (inp + 1) + out * (hidden + 1)
    assert exact_rank <= bound == out
    spec = C.slq(problem.hvp, P, P, 8, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert spec.epsilon_rank(1e-6) * P <= bound + 0.5
    G = problem.per_sample_gradients(32)
    rank, _ = C.fisher_rank(G)
    assert rank <= bound


def test_curvature_diagnostics_runs_on_the_float32_ensemble_critic():
    from rl_plasticity.agents.networks import EnsembleMLP

    net = EnsembleMLP(2, 4, (8, 8), 1, True)
    data = {"x": torch.randn(16, 4), "y": torch.randn(16)}

    def loss(forward, d):
        return (forward(d["x"]).squeeze(-1) - d["y"]).square().sum(0)

    out, spec = C.curvature_diagnostics(net, loss, data, C.CurvatureSettings(samples=8, lanczos_steps=8),
                                        torch.Generator().manual_seed(0))
    assert set(out) >= {"fisher_rank", "grad_erank", "grad_condition", "epsilon_rank", "sharpness", "overlap",
                        "overlap_top"}
    assert 0 < out["fisher_rank"] <= 1 and 0 <= out["epsilon_rank"] <= 1
    assert all(np.isfinite(v) or k == "grad_condition" for k, v in out.items())


# -- representation diagnostics (part 3) and the schedule (part 4) ------------------------------
def test_representation_diagnostics_per_layer():
    from rl_plasticity.agents.sac import SACAgent, SACConfig
    from rl_plasticity.buffers import Batch

    agent = SACAgent(3, 1, SACConfig(hidden_sizes=(8, 8), batch_size=16, num_critics=2))
    b = Batch(torch.randn(16, 3), torch.rand(16, 1) * 2 - 1, torch.randn(16), torch.randn(16, 3), torch.zeros(16))
    agent.update(Batch(*(t.unsqueeze(0) for t in b)))
    d = agent.diagnostics(b)
    for net in ("actor", "critic"):
        for i in range(3):
            assert d[f"plasticity/{net}/layer{i}/stable_rank"] >= 1.0
            assert d[f"plasticity/{net}/layer{i}/sigma_min"] <= d[f"plasticity/{net}/layer{i}/sigma_max"]
        for i in range(2):
            assert 1 <= d[f"plasticity/{net}/layer{i}/feature_srank"] <= 8
            assert 0 <= d[f"plasticity/{net}/layer{i}/active_fraction"] <= 1
            assert d[f"plasticity/{net}/layer{i}/feature_norm"] > 0
        assert d[f"plasticity/{net}/update_norm"] > 0
    # update_norm is the norm of the last step's parameter change
    before = [p.detach().clone() for p in agent.actor.net.parameters()]
    agent.update(Batch(*(t.unsqueeze(0) for t in b)))
    after = list(agent.actor.net.parameters())
    delta = torch.stack([(a.detach() - p).square().sum() for a, p in zip(after, before)]).sum().sqrt()
    assert agent.diagnostics(b)["plasticity/actor/update_norm"] == pytest.approx(float(delta), rel=1e-3)


def test_stable_rank_and_singular_values_match_svd():
    from rl_plasticity.plasticity.mixin import PlasticityConfig, PlasticityMixin

    class Holder(PlasticityMixin):
        def __init__(self, net):
            self.init_plasticity(PlasticityConfig())
            self.register_networks({"n": net})

        def plasticity_inputs(self, x):
            return {"n": x}

    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    d = Holder(net).plasticity_diagnostics(torch.randn(10, 4))
    s = torch.linalg.svdvals(net[0].weight.detach())
    assert float(d["plasticity/n/layer0/stable_rank"]) == pytest.approx(float(s.square().sum() / s[0] ** 2), rel=1e-5)
    assert float(d["plasticity/n/layer0/sigma_min"]) == pytest.approx(float(s[-1]), rel=1e-5)


@pytest.mark.parametrize("key,value", [("curvature_every", 0), ("curvature_every", -5), ("curvature_epsilon", 0.0),
                                       ("curvature_samples", 1)])
def test_impossible_curvature_keys_are_config_errors(key, value):
    from rl_plasticity.config import ConfigError
    from rl_plasticity.plasticity.mixin import PlasticityConfig

    with pytest.raises(ConfigError, match=f"plasticity.{key}"):
        PlasticityConfig.from_node({key: value})


def test_more_curvature_samples_than_the_batch_is_a_config_error():
    from rl_plasticity.agents.sac import SACAgent, SACConfig
    from rl_plasticity.config import ConfigError
    from rl_plasticity.loops import OffPolicySchedule, run_off_policy
    from rl_plasticity.plasticity.mixin import PlasticityConfig

    env = make_env({"kind": "gym", "id": "Pendulum-v1"})
    agent = SACAgent(3, 1, SACConfig(hidden_sizes=(8,), batch_size=16),
                     plasticity=PlasticityConfig(curvature_every=10, curvature_samples=32))
    sched = OffPolicySchedule(total_steps=30, prefill_steps=10, replay_ratio=1, batch_size=16, eval_every=1000,
                              eval_episodes=0, log_every=10, checkpoint_every=1000, seed=0)
    with pytest.raises(ConfigError, match="plasticity.curvature_samples"):
        run_off_policy(agent, ReplayBuffer(3, 1, 100), env, env, NullLogger(), sched, lambda step, state: None)


def test_sac_loop_measures_curvature_periodically_and_at_each_reset(tmp_path):
    from rl_plasticity.agents.sac import SACAgent, SACConfig
    from rl_plasticity.logging import Logger
    from rl_plasticity.loops import OffPolicySchedule, run_off_policy
    from rl_plasticity.plasticity.mixin import PlasticityConfig

    env = make_env({"kind": "gym", "id": "Pendulum-v1"})
    cfg = PlasticityConfig(curvature_every=40, curvature_task_start=True, curvature_samples=8,
                           curvature_lanczos_steps=6)
    agent = SACAgent(3, 1, SACConfig(hidden_sizes=(8, 8), batch_size=16, replay_ratio=1, reset_interval=50),
                     plasticity=cfg)
    logged = []

    class Spy(Logger):
        def scalars(self, values, step):
            logged.append((step, dict(values)))
            super().scalars(values, step)

    logger = Spy(str(tmp_path), 130)
    sched = OffPolicySchedule(total_steps=130, prefill_steps=10, replay_ratio=1, batch_size=16, eval_every=1000,
                              eval_episodes=0, log_every=20, checkpoint_every=1000, seed=0)
    run_off_policy(agent, ReplayBuffer(3, 1, 200), env, env, logger, sched, lambda step, state: None)
    logger.close()
    periodic = [st for st, v in logged if "curvature/critic/fisher_rank" in v and "curvature_task/change" not in v]
    task = [st for st, v in logged if "curvature_task/change" in v]
    assert len(periodic) >= 2 and len(task) == 2  # resets after updates 50 and 100
    v = next(v for st, v in logged if "curvature_task/actor/sharpness" in v)
    assert all(np.isfinite(float(v[f"curvature/actor/{k}"])) for k in ("fisher_rank", "epsilon_rank", "overlap"))


def test_ppo_loop_measures_curvature_at_a_friction_switch_before_updating(monkeypatch):
    from rl_plasticity.agents.ppo import PPOAgent, PPOConfig
    from rl_plasticity.loops import OnPolicySchedule, run_on_policy
    from rl_plasticity.plasticity.mixin import PlasticityConfig

    cfg = {"kind": "gym", "id": "Pendulum-v1", "action_repeat": 1}
    envs = gym.vector.SyncVectorEnv([lambda: make_env(cfg)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    pl = PlasticityConfig(curvature_task_start=True, curvature_samples=8, curvature_lanczos_steps=4)
    agent = PPOAgent(3, 1, PPOConfig(hidden_sizes=(8,), rollout_steps=20, num_minibatches=2, epochs=1), "cpu",
                     plasticity=pl, seed=0)
    friction = {"value": 1.0}
    measured = []
    original = agent.plasticity_curvature

    def spy(probe, seed):
        measured.append((agent.update_count, probe["obs"].shape[0]))
        return original(probe, seed)

    monkeypatch.setattr(agent, "plasticity_curvature", spy)
    step_count = {"n": 0}
    step = envs.step

    def stepping(action):
        step_count["n"] += 1
        if step_count["n"] == 30:
            friction["value"] = 0.5  # switches during the second rollout
        return step(action)

    monkeypatch.setattr(envs, "step", stepping)
    schedule = OnPolicySchedule(total_steps=80, rollout_steps=20, eval_every=10**9, eval_episodes=0, log_every=20,
                                checkpoint_every=10**9, seed=0)
    run_on_policy(agent, envs, make_env(cfg), NullLogger(), schedule, lambda step, state: None,
                  env_metrics=lambda: [{"env/friction": friction["value"]}])
    assert measured == [(2, 20)]  # once, on the second rollout, before its update (2 updates so far)


def test_sac_loop_measures_a_task_change_on_the_first_transitions_of_the_new_task(monkeypatch):
    """At a non-stationary env's task change the buffer holds no data of the new task: the loop waits
    for the first probe_rows (= batch 16) transitions of the new task and measures on exactly those,
    once, before the updates of the step that completes them (issue 18; loops.off_policy_steps)."""
    from rl_plasticity.agents.sac import SACAgent, SACConfig
    from rl_plasticity.loops import OffPolicySchedule, run_off_policy
    from rl_plasticity.plasticity.mixin import PlasticityConfig

    env = gym.make("Pendulum-v1", max_episode_steps=30)  # episodes end at steps 30, 60, 90
    pl = PlasticityConfig(curvature_task_start=True, curvature_samples=8, curvature_lanczos_steps=4)
    agent = SACAgent(3, 1, SACConfig(hidden_sizes=(8,), batch_size=16, replay_ratio=2), plasticity=pl)
    buffer = ReplayBuffer(3, 1, 500)
    added, measured, logged, states = [], [], [], {}
    add, curvature = buffer.add, agent.plasticity_curvature

    def spy_add(obs, action, reward, next_obs, terminated):
        added.append(np.array(obs, dtype=np.float32))
        add(obs, action, reward, next_obs, terminated)

    def spy_curvature(probe, seed):
        measured.append((len(added), agent.update_count, probe.obs.clone()))
        return curvature(probe, seed)

    monkeypatch.setattr(buffer, "add", spy_add)
    monkeypatch.setattr(agent, "plasticity_curvature", spy_curvature)
    episodes = {"ended": 0}

    def env_metrics():  # the task changes at the end of the first episode (step 30), then stays
        episodes["ended"] += 1
        return {"env/task": float(episodes["ended"] >= 1 and len(added) >= 30)}

    class Logger(NullLogger):
        def scalars(self, values, step):
            logged.append((step, {k: float(v) for k, v in values.items()}))

    sched = OffPolicySchedule(total_steps=90, prefill_steps=10, replay_ratio=2, batch_size=16, eval_every=10**9,
                              eval_episodes=0, log_every=1000, checkpoint_every=40, seed=0)
    run_off_policy(agent, buffer, env, env, Logger(), sched, lambda step, state: states.setdefault(step, state),
                   env_metrics=env_metrics)
    # Once, when the 16th transition of the new task (steps 31..46) is stored, before that step's updates.
    assert [(n, updates) for n, updates, _ in measured] == [(46, 2 * (46 - 10))]
    torch.testing.assert_close(measured[0][2], torch.as_tensor(np.stack(added[30:46])))
    (values,) = [v for step, v in logged if "curvature_task/change" in v]
    # The updates of steps 30 (whose episode end is the change) to 45, 2 each.
    assert values["curvature_task/updates_since_change"] == 2 * 16
    assert np.isfinite(values["curvature_task/critic/fisher_rank"]) and np.isfinite(values["curvature/actor/sharpness"])
    # A checkpoint in the wait (step 40: 10 of the 16 rows) holds it, so a resumed run measures the same rows.
    assert states[40]["task_wait"] == {"rows": 10, "updates": 2 * (30 - 10)}
    assert states[40]["task"] == [["env/task", 1.0]] and states[90]["task_wait"] is None
