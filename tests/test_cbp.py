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
