"""CReLU (agent.activation=crelu): doubled features, widths and parameter counts, the fused SAC
path and the seed groups against autograd, diagnostics on the 2n features, and short CLI runs."""
import numpy as np
import pytest
import torch
from torch import nn

from rl_plasticity.agents.networks import CReLU, mlp, parameter_count
from rl_plasticity.agents.ppo import PPOAgent, PPOConfig, policy_mlp
from rl_plasticity.agents.sac import SACAgent, SACConfig
from rl_plasticity.agents.seeds import PPOSeedGroup, SACSeedGroup, SeedRNG
from rl_plasticity.buffers import Batch
from rl_plasticity.checkpoint import list_checkpoints
from rl_plasticity.config import ConfigError
from rl_plasticity.plasticity.layers import FeatureRecorder
from rl_plasticity.plasticity.mixin import PlasticityConfig
from tests.test_cli import train

OBS, ACT = 7, 2


def test_crelu_doubles_the_features():
    x = torch.tensor([[1.5, -2.0, 0.0], [-0.5, 0.25, 3.0]])
    torch.testing.assert_close(CReLU()(x), torch.tensor([[1.5, 0.0, 0.0, 0.0, 2.0, 0.0],
                                                         [0.0, 0.25, 3.0, 0.5, 0.0, 0.0]]), rtol=0, atol=0)
    net = mlp(5, (16, 8), 3, layer_norm=True, activation="crelu")
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(5, 16), (32, 8), (16, 3)]
    assert [m.normalized_shape for m in net if isinstance(m, nn.LayerNorm)] == [(16,), (8,)]  # on the units
    with FeatureRecorder(net) as rec:
        net(torch.randn(4, 5))
    assert [f.shape for f in rec.features] == [(1, 4, 32), (1, 4, 16)]


def test_parameter_counts_of_both_activations():
    """Hidden widths count linear units; with CReLU each next layer reads twice as many inputs."""
    def count(activation, layer_norm):
        w, h = 16, 8
        feats = 2 if activation == "crelu" else 1
        ln = 2 * (w + h) if layer_norm else 0
        return (OBS * w + w) + (feats * w * h + h) + (feats * h * 2 * ACT + 2 * ACT) + ln

    for activation in ("relu", "crelu"):
        for layer_norm in (True, False):
            agent = SACAgent(OBS, ACT, SACConfig(hidden_sizes=(16, 8), activation=activation, layer_norm=layer_norm))
            assert agent.parameter_counts()["actor"] == count(activation, layer_norm)
    ppo = PPOAgent(OBS, ACT, PPOConfig(hidden_sizes=(16, 8), activation="crelu"))
    assert ppo.parameter_counts() == {"actor": OBS * 16 + 16 + 32 * 8 + 8 + 16 * ACT + ACT,
                                      "critic": OBS * 16 + 16 + 32 * 8 + 8 + 16 + 1}
    assert parameter_count(policy_mlp(OBS, (16, 8), ACT, False, 0.01)) == OBS * 16 + 16 + 16 * 8 + 8 + 8 * ACT + ACT


def test_invalid_activation_is_one_config_error():
    with pytest.raises(ConfigError, match=r"agent\.activation must be one of relu, crelu, got 'tanh'"):
        SACConfig.from_node({"activation": "tanh"})
    with pytest.raises(ConfigError, match=r"agent\.activation must be one of relu, crelu"):
        PPOConfig.from_node({"activation": "gelu"})
    with pytest.raises(ConfigError, match=r"agent\.activation"):
        SACAgent(OBS, ACT, SACConfig(activation="elu"))
    with pytest.raises(ConfigError, match=r"plasticity.interventions \['cbp'\] .* agent.activation=crelu"):
        PPOAgent(OBS, ACT, PPOConfig(activation="crelu"), plasticity=PlasticityConfig(name="cbp", cbp=True))
    with pytest.raises(ConfigError, match=r"plasticity.interventions \['redo'\] .* agent.activation=relu"):
        SACAgent(OBS, ACT, SACConfig(activation="crelu"), plasticity=PlasticityConfig(interventions=("redo",)))


def make_sac(fused, num_critics=1, layer_norm=True, plasticity="none", coef=0.0, seed=3):
    torch.manual_seed(7)
    cfg = SACConfig(num_critics=num_critics, layer_norm=layer_norm, fused=fused, hidden_sizes=(32, 24),
                    activation="crelu", replay_ratio=2, batch_size=16)
    return SACAgent(OBS, ACT, cfg, plasticity=PlasticityConfig(name=plasticity, coef=coef), seed=seed)


def make_batch(updates=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(updates, size, OBS, generator=g), torch.rand(updates, size, ACT, generator=g) * 2 - 1,
                 torch.randn(updates, size, generator=g), torch.randn(updates, size, OBS, generator=g),
                 (torch.rand(updates, size, generator=g) < 0.2).float())


@pytest.mark.parametrize("num_critics,layer_norm,plasticity", [(1, True, "none"), (2, False, "spectral"),
                                                               (2, True, "parseval")])
def test_fused_crelu_equals_autograd(num_critics, layer_norm, plasticity):
    """One update's gradients and metrics, then several updates' parameters: the hand-written
    CReLU backward of agents/fused.py against autograd through networks.CReLU."""
    ref, fused = (make_sac(f, num_critics, layer_norm, plasticity, 1e-3) for f in (False, True))
    batch = make_batch(updates=1)
    m_ref, m_fused = ref.update(batch), fused.update(batch)
    for key in m_ref:
        torch.testing.assert_close(m_fused[key], m_ref[key], rtol=1e-5, atol=1e-6, msg=key)
    params = lambda a: [*a.actor.parameters(), *a.critic.parameters(), a.log_alpha]  # noqa: E731
    for p, q in zip(params(fused), params(ref)):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    assert all(float(q.grad.abs().max()) > 0 for q in params(ref)[:-1])
    for step in range(3):
        b = make_batch(updates=2, seed=step + 1)
        ref.update(b)
        fused.update(b)
    for p, q in zip(params(fused), params(ref)):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_sac_seed_group_with_crelu_follows_separate_agents():
    seeds = [3, 4]

    def agents():
        out, rngs = [], []
        for s in seeds:
            torch.manual_seed(s)
            out.append(make_sac(True, num_critics=2, seed=s))
            rngs.append(SeedRNG())
        return out, rngs

    single, single_rngs = agents()
    batched, rngs = agents()
    group = SACSeedGroup(batched, rngs)
    for step in range(3):
        batches = [make_batch(seed=10 * step + i) for i in range(len(seeds))]
        metrics = group.update(batches)
        for i, (agent, rng) in enumerate(zip(single, single_rngs)):
            with rng:
                expected = agent.update(batches[i])
            for k, v in expected.items():
                torch.testing.assert_close(metrics[i][k], v, rtol=1e-4, atol=1e-5, msg=k)
    for a, b in zip(single, batched):
        for p, q in zip([*a.actor.parameters(), *a.critic.parameters()], [*b.actor.parameters(), *b.critic.parameters()]):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


def test_ppo_seed_group_with_crelu_follows_separate_agents():
    cfg = PPOConfig(hidden_sizes=(16, 16), rollout_steps=64, num_minibatches=4, epochs=2, activation="crelu")
    seeds = [0, 1]

    def agents():
        out, rngs = [], []
        for s in seeds:
            torch.manual_seed(s)
            out.append(PPOAgent(4, 2, cfg, seed=s, plasticity=PlasticityConfig(name="parseval")))
            rngs.append(SeedRNG())
        return out, rngs

    def rollout(seed):
        rng = np.random.default_rng(seed)
        f32 = np.float32
        return {"obs": rng.standard_normal((64, 4)).astype(f32), "action": rng.standard_normal((64, 2)).astype(f32),
                "log_prob": (rng.standard_normal(64) - 2.0).astype(f32), "value": rng.standard_normal(64).astype(f32),
                "advantage": rng.standard_normal(64).astype(f32), "return": rng.standard_normal(64).astype(f32)}

    single, single_rngs = agents()
    batched, rngs = agents()
    metrics = PPOSeedGroup(batched, rngs).update([rollout(i) for i in range(len(seeds))])
    for i, (agent, rng) in enumerate(zip(single, single_rngs)):
        with rng:
            expected = agent.update(rollout(i))
        for k, v in expected.items():
            torch.testing.assert_close(metrics[i][k], v, rtol=1e-4, atol=1e-5, msg=k)
        for p, q in zip(agent.params, batched[i].params):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


def test_diagnostics_see_the_crelu_features():
    """Each unit's pair [relu(z), relu(−z)] has exactly one positive entry for z ≠ 0, so exactly
    half of the 2n features are active on any probe, and every layer reports 2n-wide features."""
    agent = make_sac(True)
    b = make_batch(updates=1)
    d = agent.diagnostics(Batch(*(t[0] for t in b)))
    for net in ("actor", "critic"):
        for layer in (0, 1):
            assert d[f"plasticity/{net}/layer{layer}/active_fraction"].item() == pytest.approx(0.5, abs=1e-9)
    with FeatureRecorder(agent.critic.net) as rec:
        agent.critic.net(torch.randn(5, OBS + ACT))
    assert [f.shape[-1] for f in rec.features] == [64, 48]


@pytest.mark.parametrize("agent", ["sac", "ppo"])
def test_short_train_run_with_crelu(agent, tmp_path):
    args = (["agent=sac", "agent.prefill_steps=20", "agent.replay_ratio=2", "agent.batch_size=16", "total_steps=60"]
            if agent == "sac" else
            ["agent=ppo", "agent.rollout_steps=32", "agent.num_minibatches=4", "agent.epochs=1", "total_steps=64"])
    result = train(*args, "env=gym", "env.id=Pendulum-v1", "agent.activation=crelu", "agent.hidden_sizes=[32,32]",
                   "eval.every=60", "eval.episodes=1", "log.every=20", "plasticity.log_every=20",
                   f"run_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "activation crelu | parameters: actor" in result.stdout
    state = torch.load(list_checkpoints(tmp_path / "checkpoints")[-1], weights_only=True)
    assert state["config"]["agent"]["activation"] == "crelu"
    weight = state["agent"]["actor"]["net.3.weight" if agent == "sac" else "2.weight"]  # SAC: Linear, LayerNorm, CReLU, Linear
    assert weight.shape == (32, 64)  # the second layer reads 2 × 32 CReLU features


def test_invalid_activation_on_the_command_line_is_one_line(tmp_path):
    result = train("env=gym", "env.id=Pendulum-v1", "agent.activation=tanh", f"run_dir={tmp_path}")
    assert result.returncode != 0
    assert "agent.activation must be one of relu, crelu, got 'tanh'" in result.stderr
    assert "Traceback" not in result.stderr


def test_report_labels_crelu_runs_apart():
    from rl_plasticity.report import base_label

    relu = {"agent.name": "sac", "agent.layer_norm": True, "agent.activation": "relu", "plasticity.name": "parseval"}
    assert base_label(relu) == "sac+LN+parseval"
    assert base_label({**relu, "agent.activation": "crelu"}) == "sac+LN+CReLU+parseval"
    assert base_label({k: v for k, v in relu.items() if k != "agent.activation"}) == "sac+LN+parseval"  # old runs
