"""Continual backprop: how many units it replaces, which ones, and what a replacement does."""
import pytest
import torch
from torch import nn

from rl_plasticity.agents.networks import EnsembleMLP, fresh_weight, orthogonal_init_
from rl_plasticity.agents.ppo import policy_mlp
from rl_plasticity.plasticity.cbp import ContinualBackprop, hidden_layers
from rl_plasticity.plasticity.layers import FeatureRecorder


def features(net, x):
    with FeatureRecorder(net) as rec:
        net(x)
    return rec.features


def test_hidden_layers_pair_each_activation_with_its_linear_layers():
    net = policy_mlp(5, (16, 8), 3, layer_norm=True, head_gain=1.0)
    layers = hidden_layers(net)
    assert [(l.linear_in.out_features, l.linear_out.in_features) for l in layers] == [(16, 16), (8, 8)]
    assert all(isinstance(l.norm, nn.LayerNorm) for l in layers)


def test_replaces_the_expected_number_and_leaves_young_units_alone():
    torch.manual_seed(0)
    net = policy_mlp(4, (64, 64), 2, layer_norm=False, head_gain=1.0)
    maturity, rate, steps = 20, 0.08, 40  # no replaced unit matures again within 40 updates
    cbp = ContinualBackprop(net, replacement_rate=rate, maturity=maturity, decay=0.99)
    x = torch.randn(32, 4)
    last_replaced_at = {}
    counts = []
    for step in range(1, steps + 1):
        counts.append(cbp.step(features(net, x)))
        for i, layer in enumerate(cbp.layers):
            changed = (cbp.age[i][0] == 0).nonzero().flatten().tolist()  # ages restart at replacement
            if i == len(cbp.layers) - 1:  # (earlier layers' zeroed columns may be redrawn by the next layer)
                assert bool((layer.linear_out.weight[:, changed] == 0).all())
            for unit in changed:
                # A replaced unit is young again: it is not replaced before it matures once more.
                assert step - last_replaced_at.get((i, unit), 0) > maturity
                last_replaced_at[(i, unit)] = step
    assert sum(counts[:maturity]) == 0  # nobody is mature during the first `maturity` updates
    # From then on all 128 units are mature until replaced; replaced ones stay young for the
    # rest of this run, so the expected count follows the accumulated rate over eligible units.
    expected, acc, eligible = 0, [0.0, 0.0], [64, 64]
    for _ in range(steps - maturity):
        for i in range(2):
            acc[i] += rate * eligible[i]
            n = int(acc[i])
            acc[i] -= n
            eligible[i] -= n
            expected += n
    assert sum(counts) == expected == cbp.replaced_total
    assert expected > 60  # the check is not vacuous


def test_replacement_picks_the_lowest_utility_and_reinitialises_the_unit():
    torch.manual_seed(0)
    net = policy_mlp(4, (8,), 3, layer_norm=False, head_gain=1.0)
    first, head = net[0], net[2]
    with torch.no_grad():
        first.bias.fill_(5.0)  # every unit active ...
        head.weight[:, 5] = 1e-3  # ... and unit 5 contributes least
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(16, 4)).square().sum().backward()
    opt.step()
    cbp = ContinualBackprop(net, replacement_rate=1.0 / 8, maturity=0, decay=0.0)
    x = torch.randn(64, 4).abs()
    feats = features(net, x)
    silenced = feats[0][0].clone().index_fill_(1, torch.tensor([5]), 0.0)
    # decay 0: the bias-corrected mean activation is this batch's mean of h_5
    moved = head.weight[:, 5].detach() * feats[0][0][:, 5].mean()
    out_before = head(silenced) + moved
    w_before = first.weight.detach().clone()
    assert cbp.step(feats, [opt]) == 1
    assert not torch.equal(first.weight[5], w_before[5]) and torch.equal(first.weight[:5], w_before[:5])
    assert first.bias[5] == 0.0 and torch.all(head.weight[:, 5] == 0.0)
    state = opt.state[first.weight]
    assert torch.all(state["exp_avg"][5] == 0) and torch.all(state["exp_avg_sq"][5] == 0)
    assert torch.all(state["exp_avg"][4] != 0)
    assert torch.all(opt.state[head.weight]["exp_avg"][:, 5] == 0)
    assert cbp.age[0][0, 5] == 0 and cbp.utility[0][0, 5] == 0
    # The output is the old one with unit 5 silenced and its mean contribution moved into the
    # head's bias (Dohare et al.'s transfer); the fresh unit contributes nothing yet.
    out_after = net(x)
    torch.testing.assert_close(out_after, out_before)


def test_fresh_weights_come_from_the_initial_distribution():
    ortho = orthogonal_init_(nn.Linear(16, 8), gain=2.0)
    w = fresh_weight(ortho)
    torch.testing.assert_close(w @ w.t(), 4.0 * torch.eye(8), atol=1e-5, rtol=0)
    plain = nn.Linear(100, 50)
    w = fresh_weight(plain)
    assert w.abs().max() <= 0.1 and w.abs().max() > 0.09 and not torch.equal(w, plain.weight)


def test_ensemble_members_keep_their_own_utilities():
    torch.manual_seed(0)
    net = EnsembleMLP(2, 4, (16,), 1, layer_norm=True)
    cbp = ContinualBackprop(net, replacement_rate=0.1, maturity=1, decay=0.9)
    for _ in range(5):
        cbp.step(features(net, torch.randn(8, 4)))
    assert cbp.utility[0].shape == (2, 16)
    assert cbp.replaced_total > 0
    assert not torch.equal(cbp.utility[0][0], cbp.utility[0][1])


def test_mismatched_features_are_an_error():
    net = policy_mlp(4, (8, 8), 2, layer_norm=False, head_gain=1.0)
    cbp = ContinualBackprop(net, 0.1, 1, 0.9)
    with pytest.raises(ValueError, match="hidden layers"):
        cbp.step(features(net, torch.randn(4, 4))[:1])


# -- the data continual backprop reads: the update's own training forward, before the step ----------
import contextlib  # noqa: E402
import copy  # noqa: E402

import numpy as np  # noqa: E402

from rl_plasticity.agents.ppo import PPOAgent, PPOConfig  # noqa: E402
from rl_plasticity.agents.sac import SACAgent, SACConfig  # noqa: E402
from rl_plasticity.agents.seeds import PPOSeedGroup, SACSeedGroup, SequentialGroup  # noqa: E402
from rl_plasticity.buffers import Batch  # noqa: E402
from rl_plasticity.plasticity.mixin import PlasticityConfig, PlasticityMixin  # noqa: E402
from tests.test_seeds import _agents, _rollout  # noqa: E402

CBP = dict(name="cbp", cbp_maturity=2, cbp_replacement_rate=0.2)


@pytest.fixture
def received(monkeypatch):
    """Every `ContinualBackprop.step` call: (its ContinualBackprop, copies of the features it got)."""
    calls = []
    original = ContinualBackprop.step

    def step(self, feats, optimizers=()):
        calls.append((self, [f.clone() for f in feats]))
        return original(self, feats, optimizers)

    monkeypatch.setattr(ContinualBackprop, "step", step)
    return calls


@torch.no_grad()
def explicit(net, x):
    """The hidden features of a forward of `net` on `x` now."""
    return features(net, x)


def by_network(calls, agent):
    """{network: features} of `calls` made by `agent`'s continual backprop."""
    names = {id(c): n for n, c in agent._cbp.items()}
    return {names[id(c)]: f for c, f in calls if id(c) in names}


def assert_same_features(got, expected, rows):
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.shape[1] == rows
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def sac_batch(seed, size=16):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(1, size, 5, generator=g), torch.rand(1, size, 3, generator=g) * 2 - 1,
                 torch.randn(1, size, generator=g), torch.randn(1, size, 5, generator=g), torch.zeros(1, size))


def sac_expected(agent, batch):
    obs, action = batch.obs[0], batch.action[0]
    return {"actor": explicit(agent.actor.net, obs), "critic": explicit(agent.critic.net, torch.cat([obs, action], -1))}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("num_critics", [1, 2])
def test_sac_cbp_reads_the_pre_step_features_of_the_updates_own_forward(fused, num_critics, received):
    """Actor: its forward on the batch's obs (the actor loss's); critic: its forward on (obs,
    action) (the TD loss's); both before the optimizer step, not a forward after it."""
    torch.manual_seed(0)
    cfg = SACConfig(hidden_sizes=(16, 16), num_critics=num_critics, batch_size=16, replay_ratio=1, fused=fused)
    agent = SACAgent(5, 3, cfg, plasticity=PlasticityConfig(**CBP))
    for step in range(4):  # replacements from update 3 on
        batch = sac_batch(step)
        expected = sac_expected(agent, batch)
        received.clear()
        agent.update(batch)
        got = by_network(received, agent)
        for name in ("actor", "critic"):
            assert_same_features(got[name], expected[name], rows=16)
        after = sac_expected(agent, batch)  # a forward after the step sees other features
        assert (after["critic"][0] - got["critic"][0]).abs().max() > 1e-4
    assert all(c.replaced_total > 0 for c in agent._cbp.values())


def test_sac_seed_group_gives_each_seed_its_slice_of_the_stacked_features(received):
    cfg = SACConfig(hidden_sizes=(16, 16), num_critics=2, batch_size=16, replay_ratio=1)
    agents, rngs = _agents(cfg, PlasticityConfig(**CBP), [3, 4, 5])
    group = SACSeedGroup(agents, rngs)
    for step in range(3):
        batches = [sac_batch(10 * step + i) for i in range(3)]
        expected = [sac_expected(a, b) for a, b in zip(agents, batches)]
        received.clear()
        group.update(batches)
        for agent, exp in zip(agents, expected):
            got = by_network(received, agent)
            for name in ("actor", "critic"):
                assert_same_features(got[name], exp[name], rows=16)


@pytest.mark.parametrize("er", [False, True])
def test_ppo_cbp_reads_the_minibatchs_pre_step_features_whatever_the_er_block(er, received):
    """With the ER step (er_batch 12 > the minibatch's 8 rows) the mixin's inputs are a 12-row
    block; continual backprop still reads the minibatch's own training forward."""
    cfg = PPOConfig(rollout_steps=32, num_minibatches=4, epochs=2, hidden_sizes=(16, 16))
    pcfg = PlasticityConfig(**CBP, er=er, er_lr=1e-3, er_batch=12)
    torch.manual_seed(0)
    agent = PPOAgent(6, 2, cfg, plasticity=pcfg)
    expected = []
    minibatch_step = agent._update_minibatch

    def recorded(mb):
        expected.append({"actor": explicit(agent.actor, mb["obs"]), "critic": explicit(agent.critic, mb["obs"])})
        return minibatch_step(mb)

    agent._update_minibatch = recorded
    agent.update(_rollout(np.random.default_rng(0), 32))
    assert len(received) == 2 * len(expected) == 2 * 8
    for k, exp in enumerate(expected):
        got = by_network(received[2 * k:2 * k + 2], agent)
        for name in ("actor", "critic"):
            assert_same_features(got[name], exp[name], rows=8)
    assert all(c.replaced_total > 0 for c in agent._cbp.values())


def test_ppo_seed_group_gives_each_seed_its_minibatchs_features(received):
    cfg = PPOConfig(rollout_steps=32, num_minibatches=4, epochs=1, hidden_sizes=(16, 16))
    agents, rngs = _agents(cfg, PlasticityConfig(**CBP, er=True, er_lr=1e-3, er_batch=12), [3, 4, 5], PPOAgent, (6, 2))
    group = PPOSeedGroup(agents, rngs)
    expected = []
    minibatch_step = group._update_minibatch

    def recorded(mb):
        expected.append([{"actor": explicit(a.actor, mb["obs"][i]), "critic": explicit(a.critic, mb["obs"][i])}
                         for i, a in enumerate(agents)])
        return minibatch_step(mb)

    group._update_minibatch = recorded
    data = np.random.default_rng(0)
    group.update([_rollout(data, 32) for _ in agents])
    per_update = 2 * len(agents)
    assert len(received) == per_update * len(expected) == per_update * 4
    for k, exp in enumerate(expected):
        calls = received[per_update * k:per_update * (k + 1)]
        for agent, e in zip(agents, exp):
            got = by_network(calls, agent)
            for name in ("actor", "critic"):
                assert_same_features(got[name], e[name], rows=8)


class Learner(PlasticityMixin):
    """A Python-API host with its own network and loop (README: "Use the toolbox on your own model")."""

    def __init__(self):
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-2)
        self.init_plasticity(PlasticityConfig(**CBP))
        self.register_networks({"net": self.net})

    def plasticity_inputs(self, batch):
        return {"net": batch}

    def plasticity_optimizers(self):
        return [self.optimizer]

    def update(self, x, record):
        self.optimizer.zero_grad()
        with self.plasticity_record("net") if record else contextlib.nullcontext():
            out = self.net(x)
        out.square().mean().backward()
        self.plasticity_before_step()
        self.optimizer.step()
        self.plasticity_after_update(x)


@pytest.mark.parametrize("record", [True, False])
def test_api_hosts_record_their_training_forward_or_get_a_forward_after_the_step(record, received):
    learner = Learner()
    for step in range(4):
        x = torch.randn(32, 4, generator=torch.Generator().manual_seed(step))
        before = explicit(learner.net, x)
        received.clear()
        learner.update(x, record)
        (cbp, got), = received
        after = explicit(learner.net, x) if cbp.replaced_total == 0 else None
        if record:
            assert_same_features(got, before, rows=32)
        elif after is not None:  # the fallback: a forward of its own after the step (before surgery)
            assert_same_features(got, after, rows=32)
            assert (got[0] - before[0]).abs().max() > 1e-4
    assert learner._cbp["net"].replaced_total > 0
    assert learner._recorded_features == {}  # consumed by the update


def test_no_features_are_recorded_when_no_intervention_wants_them():
    torch.manual_seed(0)
    agent = PPOAgent(6, 2, PPOConfig(rollout_steps=32, num_minibatches=4, epochs=1, hidden_sizes=(16, 16)),
                     plasticity=PlasticityConfig(name="l2", interventions=["redo"], redo={"every": 3}))
    assert not agent.plasticity_wants_features()
    with agent.plasticity_record("actor"):
        agent.actor(torch.randn(8, 6))
    assert agent._recorded_features == {}
    sac = SACAgent(5, 3, SACConfig(hidden_sizes=(16, 16), batch_size=16, replay_ratio=1))
    obs, action = torch.randn(16, 5), torch.rand(16, 3)
    assert sac._fused.losses_and_grads(obs, action, torch.randn(16), torch.randn(16, 5), torch.zeros(16),
                                       torch.randn(2, 16, 3))[1] is None


def test_fused_and_autograd_sac_with_cbp_train_alike():
    """The fused path's cached activations give continual backprop what the autograd path's
    recorded forward gives it: same replacements, same parameters over several updates."""
    agents = []
    for f in (False, True):
        torch.manual_seed(7)
        cfg = SACConfig(hidden_sizes=(32, 32), num_critics=2, batch_size=32, replay_ratio=4, fused=f)
        agents.append(SACAgent(5, 3, cfg, plasticity=PlasticityConfig(name="cbp", cbp_maturity=3,
                                                                       cbp_replacement_rate=0.05), seed=3))
    ref, other = agents
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        batch = Batch(torch.randn(4, 32, 5, generator=g), torch.rand(4, 32, 3, generator=g) * 2 - 1,
                      torch.randn(4, 32, generator=g), torch.randn(4, 32, 5, generator=g), torch.zeros(4, 32))
        for agent in agents:
            torch.manual_seed(100 + step)  # replacements draw fresh weights from the global generator
            agent.update(batch)
    assert ref.update_count == other.update_count == 16
    for name in ("actor", "critic"):
        assert ref._cbp[name].replaced_total == other._cbp[name].replaced_total > 0
        for a, b in zip(ref._cbp[name].age, other._cbp[name].age):
            assert torch.equal(a, b)
    for net in ("actor", "critic", "critic_target"):
        for (k, v), w in zip(getattr(ref, net).state_dict().items(), getattr(other, net).state_dict().values()):
            torch.testing.assert_close(w, v, rtol=1e-4, atol=1e-5, msg=f"{net}.{k}")


@pytest.mark.parametrize("fused", [False, True])
def test_seeds_in_turn_are_bitwise_the_single_seed_runs_with_cbp(fused):
    """batch_seeds=false (and SAC's autograd path): each seed updated alone under its generators."""
    cfg = SACConfig(hidden_sizes=(16, 16), num_critics=2, batch_size=16, replay_ratio=2, fused=fused)
    seeds = [3, 4, 5]
    single, single_rngs = _agents(cfg, PlasticityConfig(**CBP), seeds)
    grouped, rngs = _agents(cfg, PlasticityConfig(**CBP), seeds)
    group = SequentialGroup(grouped, rngs)
    for step in range(3):
        batches = [Batch(*(torch.cat([t, t]) for t in sac_batch(10 * step + i))) for i in range(len(seeds))]
        group.update(batches)
        for agent, batch, rng in zip(single, batches, single_rngs):
            with rng:
                agent.update(batch)
    for a, b in zip(single, grouped):
        assert a._cbp["critic"].replaced_total == b._cbp["critic"].replaced_total > 0
        for net in ("actor", "critic", "critic_target"):
            for v, w in zip(getattr(a, net).state_dict().values(), getattr(b, net).state_dict().values()):
                assert torch.equal(v, w)


@pytest.mark.parametrize("kind", ["sac-autograd", "sac-fused", "ppo"])
def test_checkpoint_round_trip_with_cbp_gives_bitwise_equal_next_updates(kind):
    pcfg = PlasticityConfig(**CBP)
    if kind == "ppo":
        cfg = PPOConfig(rollout_steps=32, num_minibatches=4, epochs=1, hidden_sizes=(16, 16))
        make = lambda seed: PPOAgent(6, 2, cfg, plasticity=pcfg, seed=seed)  # noqa: E731
        data = np.random.default_rng(0)
        requests = [_rollout(data, 32) for _ in range(3)]
        nets = ("actor", "critic")
    else:
        cfg = SACConfig(hidden_sizes=(16, 16), num_critics=2, batch_size=16, replay_ratio=2, fused=kind == "sac-fused")
        make = lambda seed: SACAgent(5, 3, cfg, plasticity=pcfg, seed=seed)  # noqa: E731
        requests = [Batch(*(torch.cat([t, t]) for t in sac_batch(i))) for i in range(3)]
        nets = ("actor", "critic", "critic_target")
    torch.manual_seed(0)
    a = make(0)
    a.update(requests[0])
    torch.manual_seed(1)
    b = make(1)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for i, request in enumerate(requests[1:]):
        for agent in (a, b):
            torch.manual_seed(100 + i)
            agent.update(request)
    assert a._cbp["actor"].replaced_total == b._cbp["actor"].replaced_total > 0
    for net in nets:
        for v, w in zip(getattr(a, net).state_dict().values(), getattr(b, net).state_dict().values()):
            assert torch.equal(v, w)
