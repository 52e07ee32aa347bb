import copy

import numpy as np
import pytest
import torch

from rl_plasticity.agents.sac import SACAgent, SACConfig
from rl_plasticity.buffers import Batch
from rl_plasticity.config import ConfigError

OBS, ACT = 5, 2


def make_agent(**kw):
    return SACAgent(OBS, ACT, SACConfig(**kw))


def fixed_batch(n=1, b=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(b, OBS, generator=g)
    one = Batch(obs, torch.rand(b, ACT, generator=g) * 2 - 1, torch.randn(b, generator=g),
                torch.randn(b, OBS, generator=g), torch.zeros(b))
    return Batch(*(t.expand(n, *t.shape).clone() for t in one))


def test_defaults_are_the_papers():
    cfg = SACConfig()
    assert (cfg.replay_ratio, cfg.batch_size, cfg.buffer_size, cfg.prefill_steps) == (16, 256, 1_000_000, 10_000)
    assert cfg.hidden_sizes == (256, 256) and cfg.layer_norm and cfg.num_critics == 1
    assert (cfg.gamma, cfg.tau, cfg.actor_lr, cfg.critic_lr) == (0.99, 0.005, 3e-4, 3e-4)
    agent = SACAgent(OBS, ACT, cfg)
    assert agent.target_entropy == -ACT
    layers = [type(m).__name__ for m in agent.actor.net]
    assert layers == ["Linear", "LayerNorm", "ReLU", "Linear", "LayerNorm", "ReLU", "Linear"]


@pytest.mark.parametrize("num_critics", [1, 2])
def test_critic_loss_falls_on_a_fixed_batch(num_critics):
    agent = make_agent(num_critics=num_critics, gamma=0.0)  # γ = 0: a fixed regression target
    batch = fixed_batch(n=50)
    first = agent.update(Batch(*(t[:1] for t in batch)))["losses/critic"].item()
    for _ in range(4):
        last = agent.update(batch)["losses/critic"].item()
    assert last < 0.5 * first
    assert agent.update_count == 201


@pytest.mark.parametrize("target_entropy, direction", [(50.0, +1), (-50.0, -1)])
def test_temperature_moves_toward_the_entropy_target(target_entropy, direction):
    agent = make_agent(target_entropy=target_entropy)
    before = agent.alpha.item()
    agent.update(fixed_batch(n=20))
    assert np.sign(agent.alpha.item() - before) == direction


def test_target_network_lags_by_tau():
    agent = make_agent(tau=0.005)
    old_target = copy.deepcopy(agent.critic_target.state_dict())
    assert all(torch.equal(old_target[k], v) for k, v in agent.critic.state_dict().items())
    agent.update(fixed_batch(n=1))
    new_critic = agent.critic.state_dict()
    for k, v in agent.critic_target.state_dict().items():
        expected = (1 - 0.005) * old_target[k] + 0.005 * new_critic[k]
        torch.testing.assert_close(v, expected)
        if "weight" in k and v.dim() == 3:
            assert not torch.equal(v, new_critic[k])


def test_termination_stops_bootstrapping_truncation_does_not():
    agent = make_agent(gamma=0.9)
    r = torch.tensor([1.0, 1.0])
    nxt = torch.randn(2, OBS)
    torch.manual_seed(0)
    done = agent.td_target(r, nxt, torch.tensor([1.0, 1.0]))
    assert torch.equal(done, r)
    torch.manual_seed(0)
    cont = agent.td_target(r, nxt, torch.tensor([0.0, 0.0]))
    assert not torch.allclose(cont, r)


def test_actor_loss_does_not_train_the_critic():
    agent = make_agent()
    agent.optimizer.param_groups[1]["lr"] = 0.0  # the critic's group: only its own loss could move it
    before = copy.deepcopy(agent.critic.state_dict())
    agent.update(fixed_batch())
    assert all(torch.equal(before[k], v) for k, v in agent.critic.state_dict().items())


def test_critic_members_are_independent():
    agent = make_agent(num_critics=2)
    w = agent.critic.net.layers[0].weight
    assert w.shape[0] == 2 and not torch.equal(w[0], w[1])
    q = agent.critic(torch.randn(8, OBS), torch.rand(8, ACT))
    assert q.shape == (2, 8)


def test_actions_are_bounded_and_evaluation_is_deterministic():
    agent = make_agent()
    obs = np.random.randn(OBS).astype(np.float32)
    a = np.stack([agent.act(obs) for _ in range(50)])
    assert a.shape == (50, ACT) and np.all(np.abs(a) <= 1)
    assert a.std(0).min() > 0
    d1, d2 = agent.act(obs, deterministic=True), agent.act(obs, deterministic=True)
    np.testing.assert_array_equal(d1, d2)
    mean = agent.actor.distribution_params(torch.as_tensor(obs))[0]
    np.testing.assert_allclose(d1, torch.tanh(mean).detach().numpy(), rtol=1e-6)


def test_log_prob_matches_torch_distributions():
    from torch.distributions import Normal, TransformedDistribution
    from torch.distributions.transforms import TanhTransform

    agent = make_agent()
    obs = torch.randn(16, OBS)
    torch.manual_seed(3)
    a, logp = agent.actor.sample(obs)
    mean, log_std = agent.actor.distribution_params(obs)
    dist = TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform(cache_size=1)])
    torch.manual_seed(3)
    u = mean + log_std.exp() * torch.randn_like(mean)
    ref = dist.log_prob(torch.tanh(u)).sum(-1)
    torch.testing.assert_close(logp, ref, rtol=1e-3, atol=1e-3)


def test_state_dict_round_trip_restores_everything():
    a = make_agent()
    a.update(fixed_batch(n=3))
    b = make_agent()
    b.load_state_dict(a.state_dict())
    for net in ("actor", "critic", "critic_target"):
        sa, sb = getattr(a, net).state_dict(), getattr(b, net).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.alpha.item() == a.alpha.item() and b.update_count == 3
    batch = fixed_batch(n=2, seed=5)
    torch.manual_seed(9)
    ma = a.update(batch)
    torch.manual_seed(9)
    mb = b.update(batch)
    assert ma["losses/critic"].item() == mb["losses/critic"].item()


@pytest.mark.parametrize("key, value, match", [
    ("replay_ratio", 0, "agent.replay_ratio"),
    ("batch_size", 2_000_000, "agent.batch_size"),
    ("num_critics", 0, "agent.num_critics"),
    ("tau", 0.0, "agent.tau"),
    ("gamma", 1.5, "agent.gamma"),
])
def test_impossible_values_name_the_key(key, value, match):
    node = {**SACConfig().__dict__, key: value}
    with pytest.raises(ConfigError, match=match):
        SACConfig.from_node(node)


def test_wrong_types_and_unknown_keys_name_the_key():
    with pytest.raises(ConfigError, match="agent.batch_size must be an integer"):
        SACConfig.from_node({"batch_size": "abc"})
    with pytest.raises(ConfigError, match="unknown key agent.foo"):
        SACConfig.from_node({"foo": 1})
