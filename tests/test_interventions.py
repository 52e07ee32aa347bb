"""Interventions (plasticity/interventions.py): each does exactly what its paper says on a
constructed case, keeps Adam exact per element, survives a checkpoint, keeps seed i of a seed group
equal to the single-seed run, and composes with a regularizer on the command line."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from rl_plasticity.agents.networks import fresh_weight
from rl_plasticity.agents.ppo import PPOAgent, PPOConfig, policy_mlp
from rl_plasticity.agents.sac import SACAgent, SACConfig
from rl_plasticity.agents.seeds import PPOSeedGroup, SACSeedGroup
from rl_plasticity.buffers import Batch
from rl_plasticity.config import ConfigError
from rl_plasticity.plasticity.cbp import ContinualBackprop
from rl_plasticity.plasticity.interventions import INTERVENTIONS, ReDo
from rl_plasticity.plasticity.layers import FeatureRecorder
from rl_plasticity.plasticity.mixin import PlasticityConfig, PlasticityMixin
from rl_plasticity.plasticity.surgery import AdamElementSteps, fresh_bias
from rl_plasticity.plasticity.surgery import linear_layers as linear_layers_of
from tests.test_cli import train
from tests.test_seeds import _agents, _rollout


class Holder(PlasticityMixin):
    """One network `net` trained by one Adam; inputs are the batch itself."""

    def __init__(self, net, lr=1e-2, **cfg):
        self.net = net
        self.optimizer = torch.optim.Adam(net.parameters(), lr=lr, fused=True)
        self.init_plasticity(PlasticityConfig(**cfg))
        self.register_networks({"net": net})

    def plasticity_inputs(self, batch):
        return {"net": batch}

    def plasticity_optimizers(self):
        return [self.optimizer]

    def train_step(self, x):
        self.optimizer.zero_grad()
        with self.plasticity_record("net"):  # continual backprop's features, when it is due
            out = self.net(x)
        out.square().mean().backward()
        self.plasticity_before_step()
        self.optimizer.step()
        return self.plasticity_after_update(x)


def features(net, x):
    with FeatureRecorder(net) as rec:
        net(x)
    return rec.features


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- ReDo -----------------------------------------------------------------------------------------
def test_redo_score_is_mean_activity_over_the_layer_mean():
    h = torch.tensor([[[1.0, 0.0, 2.0, -1.0], [3.0, 0.0, 2.0, 1.0]]])  # (members, batch, width)
    # mean|h| = [2, 0, 2, 1], layer mean 5/4
    torch.testing.assert_close(ReDo.scores(h), torch.tensor([[1.6, 0.0, 1.6, 0.8]]))


def test_redo_reinitialises_exactly_the_planted_dormant_units():
    torch.manual_seed(0)
    net = policy_mlp(4, (8, 8), 2, layer_norm=False, head_gain=1.0)
    holder = Holder(net, lr=1e-4, interventions=["redo"], redo={"every": 2, "tau": 0.025})
    x = torch.randn(32, 4)
    holder.train_step(x)  # update 1: Adam has state now; ReDo not due
    with torch.no_grad():
        net[0].bias.fill_(2.0)         # every unit clearly active ...
        net[2].weight.mul_(0.1)
        net[2].bias.fill_(5.0)
        net[0].bias[[2, 5]] = -100.0   # ... but layer 0's units 2 and 5, which never fire (score 0)
        net[2].weight[3] = 0.0         # layer 1: unit 3 sees nothing ...
        net[2].bias[3] = -1.0          # ... and stays off
        net[2].weight[6] = 0.0         # layer 1, unit 6: constant, score 0.04 (small, not dormant)
        others = features(net, x)[1][0].abs().mean(0)
        others[6] = 0.0
        net[2].bias[6] = 0.04 * others.sum() / (8 - 0.04)
    scores = [ReDo.scores(f) for f in features(net, x)]
    assert (scores[0][0] <= 0.025).nonzero().flatten().tolist() == [2, 5]
    assert (scores[1][0] <= 0.025).nonzero().flatten().tolist() == [3]
    assert scores[1][0, 6].item() == pytest.approx(0.04, rel=1e-5)

    # The update step itself changes every weight; run it, then compare ReDo against the same
    # network stepped without ReDo.
    twin = copy.deepcopy(net)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-4, fused=True)
    twin_opt.load_state_dict(copy.deepcopy(holder.optimizer.state_dict()))
    twin_opt.zero_grad()
    twin(x).square().mean().backward()
    twin_opt.step()
    stepped = snapshot(twin)
    stepped_feats = features(twin, x)
    dormant = [(ReDo.scores(f)[0] <= 0.025).nonzero().flatten() for f in stepped_feats]
    assert [d.tolist() for d in dormant] == [[2, 5], [3]]
    assert 0.025 < ReDo.scores(stepped_feats[1])[0, 6] < 0.1

    torch.manual_seed(123)
    done = holder.train_step(x)  # update 2: ReDo due
    assert done == {"redo": {"recycled": 3.0}}
    torch.manual_seed(123)
    fresh0, fresh1 = fresh_weight(net[0]), fresh_weight(net[2])  # drawn in the same order
    expected = {k: v.clone() for k, v in stepped.items()}
    expected["0.weight"][[2, 5]] = fresh0[[2, 5]]
    expected["0.bias"][[2, 5]] = 0.0
    expected["2.weight"][:, [2, 5]] = 0.0        # outgoing weights of layer-0 units ...
    expected["2.weight"][3] = fresh1[3]          # ... then layer 1's unit 3 re-drawn (its whole row)
    expected["2.bias"][3] = 0.0
    expected["4.weight"][:, 3] = 0.0
    after = snapshot(net)
    for k in expected:
        assert torch.equal(after[k], expected[k]), k
    # Optimizer state: exactly those entries cleared, everything else as the plain Adam left it.
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        st, ref = holder.optimizer.state[p], twin_opt.state[q]
        cleared = expected[name] != stepped[name]
        cleared |= {"0.bias": torch.isin(torch.arange(8), torch.tensor([2, 5])),
                    "2.bias": torch.arange(8) == 3}.get(name, torch.zeros_like(cleared))
        if name == "2.weight":
            cleared[:, [2, 5]] = True
            cleared[3] = True
        if name == "4.weight":
            cleared[:, 3] = True
        assert torch.all(st["exp_avg"][cleared] == 0) and torch.all(st["exp_avg_sq"][cleared] == 0), name
        assert torch.equal(st["exp_avg"][~cleared], ref["exp_avg"][~cleared]), name


# -- shrink-and-perturb ---------------------------------------------------------------------------
def test_shrink_perturb_is_lambda_theta_plus_sigma_fresh():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        net[1].weight.fill_(1.5)
        net[1].bias.fill_(0.25)
    holder = Holder(net, interventions=["shrink_perturb"], shrink_perturb={"every": 3, "shrink": 0.4, "perturb": 0.1})
    x = torch.randn(16, 4)
    for _ in range(2):
        assert holder.train_step(x) == {}
    assert holder.plasticity_draws_random()  # update 3 is due and draws
    theta = snapshot(net)
    theta_opt = copy.deepcopy(holder.optimizer.state_dict())
    # What the update alone does (same Adam state), to separate it from the intervention.
    twin = copy.deepcopy(net)
    opt = torch.optim.Adam(twin.parameters(), lr=1e-2, fused=True)
    opt.load_state_dict(theta_opt)
    opt.zero_grad()
    twin(x).square().mean().backward()
    opt.step()
    stepped = snapshot(twin)
    torch.manual_seed(7)
    holder.train_step(x)
    torch.manual_seed(7)
    fresh = {"0.weight": fresh_weight(net[0]), "0.bias": fresh_bias(net[0]),
             "1.weight": torch.ones(8), "1.bias": torch.zeros(8),
             "3.weight": fresh_weight(net[3]), "3.bias": fresh_bias(net[3])}
    after = snapshot(net)
    for k, f in fresh.items():
        torch.testing.assert_close(after[k], 0.4 * stepped[k] + 0.1 * f, rtol=0, atol=1e-7)
    # θ_fresh is a new draw (not θ₀): a second application uses other noise.
    assert not torch.equal(fresh_weight(net[0]), fresh["0.weight"])
    del theta


def test_shrink_perturb_acts_after_a_task_change_only_when_asked():
    torch.manual_seed(0)
    net = policy_mlp(3, (8,), 2, layer_norm=False, head_gain=1.0)
    holder = Holder(net, interventions=["shrink_perturb"], shrink_perturb={"shrink": 0.5, "perturb": 0.0})
    x = torch.randn(8, 3)
    assert holder.train_step(x) == {} and not holder.plasticity_draws_random()
    holder.plasticity_task_change()
    assert holder.plasticity_draws_random()
    w = net[0].weight.detach().clone()
    done = holder.train_step(x)
    assert done == {"shrink_perturb": {"applied": 1.0}}
    assert net[0].weight.abs().max() < w.abs().max()  # shrunk by 0.5 after one small Adam step
    assert holder.train_step(x) == {}  # once per change
    off = Holder(policy_mlp(3, (8,), 2, False, 1.0), interventions=["shrink_perturb"],
                 shrink_perturb={"task_change": False})
    off.plasticity_task_change()
    assert off.train_step(x) == {}


# -- partial reset --------------------------------------------------------------------------------
def sac_batch(updates=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(updates, size, 5, generator=g), torch.rand(updates, size, 3, generator=g) * 2 - 1,
                 torch.randn(updates, size, generator=g), torch.randn(updates, size, 5, generator=g),
                 torch.zeros(updates, size))


@pytest.mark.parametrize("networks,layers", [(("critic",), 1), (("actor",), 2), (("actor", "critic"), 1)])
def test_partial_reset_touches_only_the_chosen_layers(networks, layers):
    torch.manual_seed(0)
    cfg = SACConfig(hidden_sizes=(16, 16), replay_ratio=2, batch_size=16, num_critics=2)
    agent = SACAgent(5, 3, cfg, plasticity=PlasticityConfig(
        interventions=["partial_reset"], partial_reset={"every": 1000, "layers": layers, "networks": list(networks)}))
    agent.update(sac_batch())
    iv = agent.intervention("partial_reset")
    before = {n: snapshot(m) for n, m in (("actor", agent.actor.net), ("critic", agent.critic.net),
                                          ("target", agent.critic_target.net))}
    torch.manual_seed(5)
    iv.after_update(agent.plasticity_updates, None)
    after = {n: snapshot(m) for n, m in (("actor", agent.actor.net), ("critic", agent.critic.net),
                                         ("target", agent.critic_target.net))}
    # Which keys: the last `layers` linear layers (and LayerNorms after the first of them).
    for name, net in (("actor", agent.actor.net), ("critic", agent.critic.net)):
        keys = list(before[name])
        linear_keys = [k for k in keys if k.endswith("weight") and before[name][k].dim() >= 2]
        first = linear_keys[-layers].rsplit(".", 1)[0]
        chosen = set(keys[keys.index(first + ".weight"):]) if name in networks else set()
        for k in keys:
            changed = not torch.equal(before[name][k], after[name][k])
            if k in chosen and not k.endswith("bias") and "norm" not in k:
                assert changed, f"{name}.{k}"
            if k not in chosen:
                assert not changed, f"{name}.{k}"
        for k in chosen:  # optimizer state of reset tensors cleared, step 0
            p = dict(net.named_parameters())[k]
            st = agent.optimizer.state[p]
            assert float(st["step"]) == 0 and torch.all(st["exp_avg"] == 0) and torch.all(st["exp_avg_sq"] == 0)
    # The fresh weights are the layer's initial distribution, drawn in module order.
    if networks == ("critic",):
        torch.manual_seed(5)
        last = list(agent.critic.net.modules())
        head = [m for m in last if hasattr(m, "weight") and m.weight.dim() == 3][-1]
        w, b = fresh_weight(head), fresh_bias(head)
        assert torch.equal(head.weight, w) and torch.equal(head.bias, b)
    # The target critic's reset layers equal the new critic's; its other layers are untouched.
    for k in before["target"]:
        if "critic" in networks and k in chosen_critic_keys(before["critic"], layers):
            assert torch.equal(after["target"][k], after["critic"][k]), k
        else:
            assert torch.equal(after["target"][k], before["target"][k]), k
    agent.update(sac_batch(seed=1))  # still trains
    assert all(torch.isfinite(p).all() for p in agent.critic.parameters())


def chosen_critic_keys(state, layers):
    keys = list(state)
    linear_keys = [k for k in keys if k.endswith("weight") and state[k].dim() >= 2]
    first = linear_keys[-layers].rsplit(".", 1)[0]
    return set(keys[keys.index(first + ".weight"):])


def test_partial_reset_names_unknown_networks():
    with pytest.raises(ConfigError, match="Valid choices: actor, critic"):
        SACAgent(5, 3, SACConfig(hidden_sizes=(8,)), plasticity=PlasticityConfig(
            interventions=["partial_reset"], partial_reset={"networks": ["encoder"]}))


# -- continual backprop ---------------------------------------------------------------------------
def test_cbp_moves_the_replaced_units_mean_contribution_into_the_next_bias():
    """Same batch every update, so the bias-corrected running mean of h_j is its batch mean: the
    batch-mean output is unchanged by a replacement, and a unit constant over the batch leaves
    every output unchanged."""
    torch.manual_seed(0)
    net = policy_mlp(4, (8,), 3, layer_norm=False, head_gain=1.0)
    first, head = net[0], net[2]
    with torch.no_grad():
        first.bias.fill_(3.0)
        first.weight[5] = 0.0
        first.bias[5] = 0.7          # unit 5: h = 0.7 for every input (constant) ...
        head.weight[:, 5] = 1e-3     # ... and the lowest contribution
    x = torch.randn(64, 4)
    cbp = ContinualBackprop(net, replacement_rate=1.0 / 8, maturity=4, decay=0.9)
    for _ in range(4):  # ages 1..4: nobody mature yet
        assert cbp.step(features(net, x)) == 0
    out_before = net(x).detach()
    torch.testing.assert_close(cbp.mean_act[0][0, 5] / (1 - 0.9 ** 4), torch.tensor(0.7))
    assert cbp.step(features(net, x)) == 1  # age 5 > 4: one unit, unit 5
    assert torch.all(head.weight[:, 5] == 0) and first.bias[5] == 0
    torch.testing.assert_close(net(x), out_before, rtol=0, atol=1e-6)

    # A varying unit: the batch mean of the output is kept, not each sample.
    torch.manual_seed(1)
    net = policy_mlp(4, (8,), 3, layer_norm=False, head_gain=1.0)
    with torch.no_grad():
        net[0].bias.fill_(3.0)
        net[2].weight[:, 2] = 1e-3
    cbp = ContinualBackprop(net, replacement_rate=1.0 / 8, maturity=2, decay=0.5)
    for _ in range(2):
        cbp.step(features(net, x))
    out_before = net(x).detach()
    assert cbp.step(features(net, x)) == 1
    out_after = net(x).detach()
    torch.testing.assert_close(out_after.mean(0), out_before.mean(0), rtol=0, atol=1e-6)
    assert not torch.allclose(out_after, out_before, atol=1e-6)


def test_cbp_replaced_weights_take_a_fresh_adams_first_step():
    """Per-element Adam step (AdamGnT): the first update of a replaced entry moves it by lr·g/|g|
    (m̂ = g, v̂ = g²), not by the damped step a tensor-wide count would give."""
    torch.manual_seed(0)
    net = policy_mlp(4, (8,), 3, layer_norm=False, head_gain=1.0)
    with torch.no_grad():
        net[0].bias.fill_(3.0)
        net[2].weight[:, 5] = 1e-3
    holder = Holder(net, lr=1e-2, cbp=True, cbp_replacement_rate=1.0 / 8, cbp_maturity=9, cbp_decay=0.0)
    x = torch.randn(32, 4)
    for _ in range(10):
        holder.train_step(x)
    assert holder._cbp["net"].replaced_total == 1
    unit = int((holder._cbp["net"].age[0][0] == 0).nonzero())
    w_out = net[2].weight[:, unit].detach().clone()
    assert torch.all(w_out == 0)
    holder.train_step(x)
    # Its outgoing weights get gradient h_j·∂L/∂y ≠ 0 (the fresh unit fires on this batch) and move
    # by lr (a tensor-wide step count of 11 would give 0.1/(1−0.9¹¹) / √(0.001/(1−0.999¹¹)) lr ≈ 0.48 lr).
    moved = (net[2].weight[:, unit] - w_out).abs()
    torch.testing.assert_close(moved, torch.full_like(moved, 1e-2), rtol=1e-5, atol=0)


def test_adam_element_steps_match_an_adam_with_a_step_per_element():
    """Fixed gradients g_k; entries reset at step 4 follow a per-element Adam (float64 reference)
    exactly to float32 rounding, the others torch's Adam bitwise."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(4, 3))
    q = nn.Parameter(p.detach().clone())  # plain Adam twin
    opt = torch.optim.Adam([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, fused=True)
    twin = torch.optim.Adam([q], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, fused=True)
    steps = AdamElementSteps([opt])
    grads = [torch.randn(4, 3) for _ in range(10)]
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[1] = True
    mask[3, 2] = True
    ref_p, ref_m, ref_v = p.detach().double().clone(), torch.zeros(4, 3, dtype=torch.float64), None
    ref_v = torch.zeros_like(ref_m)
    ref_s = torch.zeros_like(ref_m)
    for k, g in enumerate(grads):
        if k == 4:
            steps.reset(p, mask)
            ref_m[mask], ref_v[mask], ref_s[mask] = 0.0, 0.0, 0.0
            with torch.no_grad():
                p[mask] = 0.5
                ref_p[mask] = 0.5
        p.grad, q.grad = g.clone(), g.clone()
        steps.before_step()
        opt.step()
        steps.after_step()
        twin.step()
        g64 = g.double()
        ref_s += 1
        ref_m = 0.9 * ref_m + 0.1 * g64
        ref_v = 0.999 * ref_v + 0.001 * g64.square()
        ref_p -= 1e-2 / (1 - 0.9 ** ref_s) * ref_m / (ref_v.sqrt() / (1 - 0.999 ** ref_s).sqrt() + 1e-8)
        torch.testing.assert_close(p.detach().double(), ref_p, rtol=0, atol=2e-6)
        if k < 4:
            assert torch.equal(p, q)
        else:
            assert torch.equal(p[~mask], q[~mask])
    # First step after the reset moved the reset entries by lr·sign(g).
    assert p.detach()[mask].sub(0.5).abs().max() > 0


def test_adam_element_steps_a_parameter_reset_just_before_an_update_without_its_gradient():
    """Both parameters tracked, `a` reset at this step and not stepped by the next update (no
    gradient): `a` keeps its values exactly (no NaN from the bias corrections of s = 0), and the
    stepped parameter `b` gets its per-element update."""
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))
    opt = torch.optim.Adam([a, b], lr=1e-2)
    steps = AdamElementSteps([opt])

    def update(with_a: bool) -> None:
        opt.zero_grad(set_to_none=True)
        loss = b.square().sum() + (a.square().sum() if with_a else 0.0)
        loss.backward()
        steps.before_step()
        opt.step()
        steps.after_step()

    for _ in range(3):
        update(True)
    mask_a = torch.zeros(4, 3, dtype=torch.bool)
    mask_a[0] = True
    steps.reset(a, mask_a)
    steps.reset(b, torch.tensor([True, False, False, False, False]))
    a_before, b_before = a.detach().clone(), b.detach().clone()
    update(False)
    assert torch.equal(a.detach(), a_before)
    # b[0]'s first step after its reset is a fresh Adam's: exactly lr·sign(g) to float rounding.
    assert torch.allclose(b_before[0] - b.detach()[0], 1e-2 * torch.sign(2 * b_before[0]), rtol=1e-4)


def test_adam_element_steps_leave_at_the_horizon_and_skip_parameters_without_gradient():
    """Two parameters reset at different steps (two cohorts in one, one in the other); one of them
    gets no gradient on some updates (the optimizer does not step it, neither does the correction).
    Every entry follows a float64 per-element Adam; a cohort leaves the tracking at the first step
    with max(β₁, β₂)^s < 2⁻²⁵ (s = 165 at β₂ = 0.9), after which torch's update is the same."""
    torch.manual_seed(0)
    p, q = nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(6))
    # Two groups with different ε: the per-cohort ε path of the correction.
    opt = torch.optim.Adam([{"params": [p]}, {"params": [q], "eps": 1e-3}], lr=1e-2, betas=(0.5, 0.9), eps=1e-8,
                           fused=True)
    steps = AdamElementSteps([opt])
    eps = {"p": 1e-8, "q": 1e-3}
    refs = {}
    for name, t in (("p", p), ("q", q)):
        refs[name] = {"x": t.detach().double().clone(), "m": torch.zeros(t.shape, dtype=torch.float64),
                      "v": torch.zeros(t.shape, dtype=torch.float64), "s": torch.zeros(t.shape, dtype=torch.float64)}
    masks = {3: ("p", torch.arange(20).reshape(5, 4) % 3 == 0), 7: ("q", torch.arange(6) < 2),
             9: ("p", torch.arange(20).reshape(5, 4) % 3 == 1)}
    left_at = {}
    for k in range(230):
        if k in masks:
            name, mask = masks[k]
            t = p if name == "p" else q
            steps.reset(t, mask)
            r = refs[name]
            r["m"][mask], r["v"][mask], r["s"][mask] = 0.0, 0.0, 0.0
        skip_q = k % 5 == 4
        p.grad = torch.randn(5, 4)
        q.grad = None if skip_q else torch.randn(6)
        steps.before_step()
        opt.step()
        steps.after_step()
        for name, t in (("p", p), ("q", q)):
            if t.grad is None:
                continue
            r, g = refs[name], t.grad.double()
            r["s"] += 1
            r["m"] = 0.5 * r["m"] + 0.5 * g
            r["v"] = 0.9 * r["v"] + 0.1 * g.square()
            r["x"] -= 1e-2 / (1 - 0.5 ** r["s"]) * r["m"] / (r["v"].sqrt() / (1 - 0.9 ** r["s"]).sqrt() + eps[name])
            torch.testing.assert_close(t.detach().double(), r["x"], rtol=0, atol=2e-6)
        for name, t in (("p", p), ("q", q)):
            if name not in left_at and k > 9 and t not in steps.tracked:
                left_at[name] = k
        cohorts = {len(set(steps.tracked[p][1].tolist()))} if p in steps.tracked else {0}
        if k == 170:
            assert cohorts == {1}  # the cohort of step 3 left, the one of step 9 is still young
    # p's last cohort was reset before step 9 (t0 = 9) and leaves after the step with s = 165;
    # q (reset at t0 = 7, not stepped on one update in five) leaves later, after its own 165 steps.
    assert left_at["p"] == 9 + 165 - 1
    assert left_at["q"] == [k for k in range(7, 230) if k % 5 != 4][165 - 1]


# -- composition, config, checkpoints, seeds ------------------------------------------------------
def test_unknown_intervention_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown intervention 'foo'.*Valid choices: cbp, er_step, injection, partial_reset, "
                                          r"redo, reset, shrink_perturb"):
        PlasticityConfig(name="spectral", interventions=["redo", "foo"])
    with pytest.raises(ConfigError, match="plasticity.redo.tau must be >= 0"):
        PlasticityConfig(interventions=["redo"], redo={"tau": -1.0})
    with pytest.raises(ConfigError, match="unknown key plasticity.redo.period"):
        PlasticityConfig(interventions=["redo"], redo={"period": 3})


def test_legacy_flags_and_presets_are_interventions():
    assert PlasticityConfig(name="cbp").interventions == ("cbp",)
    assert PlasticityConfig(name="l2_er").interventions == ("er_step",)
    cfg = PlasticityConfig(name="cbp_l2", interventions=["redo"])
    assert cfg.interventions == ("cbp", "redo") and cfg.cbp and cfg.coef == 1e-4
    agent = SACAgent(5, 3, SACConfig(hidden_sizes=(8,), reset_interval=7), plasticity=cfg)
    assert [iv.name for iv in agent.interventions] == ["cbp", "redo", "reset"]
    with pytest.raises(ConfigError, match="both ask for full resets"):
        SACAgent(5, 3, SACConfig(hidden_sizes=(8,), reset_interval=7),
                 plasticity=PlasticityConfig(interventions=["reset"]))


FAST = {"redo": {"interventions": ["redo"], "redo": {"every": 2, "tau": 0.3}},
        "shrink_perturb": {"interventions": ["shrink_perturb"], "shrink_perturb": {"every": 3}},
        "partial_reset": {"interventions": ["partial_reset"], "partial_reset": {"every": 3, "layers": 2}},
        "cbp": {"interventions": ["cbp"], "cbp_maturity": 2, "cbp_replacement_rate": 0.2},
        "er_step": {"interventions": ["er_step"], "er_lr": 1e-3, "er_batch": 8},
        "reset": {"interventions": ["reset"], "reset": {"every": 5}},
        "injection": {"interventions": ["injection"], "injection": {"at": 3}}}


def test_every_intervention_is_covered_here():
    assert set(FAST) == set(INTERVENTIONS)


def _fast(name):
    """FAST[name], or for 'a+b+…' the interventions a, b, … together with their keys."""
    merged = {"interventions": []}
    for part in name.split("+"):
        for key, value in FAST[part].items():
            merged[key] = merged[key] + value if key == "interventions" else value
    return merged


@pytest.mark.parametrize("name,fused", [(name, True) for name in sorted(FAST)] + [
    ("injection", False), ("injection+redo+partial_reset+shrink_perturb", True),
    ("injection+redo+partial_reset+shrink_perturb", False)])
def test_checkpoint_round_trip_gives_bitwise_equal_next_updates(name, fused):
    cfg = SACConfig(hidden_sizes=(16, 16), replay_ratio=2, batch_size=16, fused=fused)
    pcfg = PlasticityConfig(name="l2", coef=1e-3, **_fast(name))
    torch.manual_seed(0)
    a = SACAgent(5, 3, cfg, plasticity=pcfg, seed=0)
    for i in range(3):
        a.update(sac_batch(seed=i))
    state = copy.deepcopy(a.state_dict())
    if name in ("cbp", "redo") or "+redo" in name:
        assert state["plasticity"]["adam_element_steps"]  # re-initialised entries are being corrected
    if "injection" in name:
        assert state["plasticity"]["interventions"]["injection"]["injected"]
    torch.manual_seed(1)
    b = SACAgent(5, 3, cfg, plasticity=pcfg, seed=1)
    b.load_state_dict(state)
    for i in range(3, 7):
        torch.manual_seed(100 + i)
        a.update(sac_batch(seed=i))
        torch.manual_seed(100 + i)
        b.update(sac_batch(seed=i))
    for x, y in zip(list(a.actor.parameters()) + list(a.critic.parameters()),
                    list(b.actor.parameters()) + list(b.critic.parameters())):
        assert torch.equal(x, y)
    assert a.plasticity_state_dict().keys() == b.plasticity_state_dict().keys()


def test_old_checkpoints_with_top_level_cbp_state_load():
    """Checkpoints from before interventions.py kept CBP at plasticity.cbp (no mean activations)."""
    cfg = SACConfig(hidden_sizes=(8,), replay_ratio=2, batch_size=16)
    pcfg = PlasticityConfig(name="cbp", cbp_maturity=2, cbp_replacement_rate=0.2)
    a = SACAgent(5, 3, cfg, plasticity=pcfg)
    a.update(sac_batch())
    state = copy.deepcopy(a.state_dict())
    old = state["plasticity"]
    cbp = old.pop("interventions")["cbp"]
    old.pop("adam_element_steps")
    for s in cbp.values():
        s.pop("mean_act")
    old["cbp"], old["er_optimizers"] = cbp, {}
    b = SACAgent(5, 3, cfg, plasticity=pcfg)
    b.load_state_dict(state)
    assert torch.equal(b._cbp["actor"].age[0], a._cbp["actor"].age[0])
    assert torch.equal(b._cbp["critic"].utility[0], a._cbp["critic"].utility[0])
    assert torch.all(b._cbp["actor"].mean_act[0] == 0)


def sac_seed_difference(pcfg):
    """Largest parameter difference between seed group members and single-seed agents."""
    cfg = SACConfig(hidden_sizes=(16, 16), num_critics=2, replay_ratio=3, batch_size=16)
    seeds = [3, 4, 5]
    single, single_rngs = _agents(cfg, pcfg, seeds)
    batched, rngs = _agents(cfg, pcfg, seeds)
    group = SACSeedGroup(batched, rngs)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        batches = [Batch(torch.randn(3, 16, 5, generator=g), torch.rand(3, 16, 3, generator=g) * 2 - 1,
                         torch.randn(3, 16, generator=g), torch.randn(3, 16, 5, generator=g),
                         torch.zeros(3, 16)) for _ in seeds]
        group.update(batches)
        for agent, batch, rng in zip(single, batches, single_rngs):
            with rng:
                agent.update(batch)
    worst = 0.0
    for a, b in zip(single, batched):
        for net in ("actor", "critic", "critic_target"):
            for v, w in zip(getattr(a, net).state_dict().values(), getattr(b, net).state_dict().values()):
                worst = max(worst, (v - w).abs().max().item())
    return worst


def ppo_seed_difference(pcfg):
    cfg = PPOConfig(rollout_steps=32, num_minibatches=4, epochs=2, hidden_sizes=(16, 16))
    seeds = [3, 4, 5]
    single, single_rngs = _agents(cfg, pcfg, seeds, PPOAgent, (6, 2))
    batched, rngs = _agents(cfg, pcfg, seeds, PPOAgent, (6, 2))
    group = PPOSeedGroup(batched, rngs)
    data = np.random.default_rng(0)
    for _ in range(2):
        rollouts = [_rollout(data, 32) for _ in seeds]
        group.update(rollouts)
        for agent, rollout, rng in zip(single, rollouts, single_rngs):
            with rng:
                agent.update(rollout)
    worst = 0.0
    for a, b in zip(single, batched):
        for net in ("actor", "critic"):
            for v, w in zip(getattr(a, net).state_dict().values(), getattr(b, net).state_dict().values()):
                worst = max(worst, (v - w).abs().max().item())
    return worst


@pytest.mark.parametrize("kind", ["sac", "ppo"])
@pytest.mark.parametrize("name", sorted(FAST) + ["injection+reset"])  # a reset after the injection: stacked anew
def test_seed_groups_equal_single_seed_runs(kind, name):
    pcfg = PlasticityConfig(**_fast(name))
    difference = (sac_seed_difference if kind == "sac" else ppo_seed_difference)(pcfg)
    assert difference < 1e-5


@pytest.mark.parametrize("kind", ["sac", "ppo"])
@pytest.mark.parametrize("name", ["redo", "shrink_perturb", "partial_reset", "cbp", "reset"])
def test_seed_equality_fails_when_randomness_is_not_declared(kind, name, monkeypatch):
    """The check above has teeth: an intervention that draws without saying so draws from the
    process's generator instead of its seed's, and the seeds no longer equal their single runs."""
    monkeypatch.setattr(INTERVENTIONS[name], "draws_random", lambda self, next_update: False)
    pcfg = PlasticityConfig(**FAST[name])
    difference = (sac_seed_difference if kind == "sac" else ppo_seed_difference)(pcfg)
    assert difference > 1e-3


@pytest.mark.parametrize("agent", ["sac", "ppo"])
def test_cli_composes_a_regularizer_with_two_interventions(agent, tmp_path):
    common = ["plasticity.interventions=[redo,shrink_perturb]", "plasticity.redo.every=4", "plasticity.redo.tau=0.5",
              "plasticity.shrink_perturb.every=6", "eval.episodes=0", "log.every=100", "checkpoint.every=100000",
              f"run_dir={tmp_path}"]
    if agent == "sac":
        args = ["agent=sac", "env=gym", "env.id=Pendulum-v1", "plasticity=spectral", "total_steps=200",
                "agent.prefill_steps=100", "agent.replay_ratio=2", "agent.batch_size=32", "agent.hidden_sizes=[32,32]"]
    else:
        args = ["agent=ppo", "env=slippery-ant", "env.change_every=100", "plasticity=l2", "total_steps=256",
                "agent.rollout_steps=128", "agent.num_minibatches=4", "agent.epochs=1", "agent.hidden_sizes=[32,32]"]
    result = train(*args, *common)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(sorted((tmp_path / "checkpoints").glob("*.pt"))[-1], weights_only=False)
    ivs = state["agent"]["plasticity"]["interventions"]
    assert set(ivs) == {"redo", "shrink_perturb"}
    assert sum(ivs["redo"]["recycled"].values()) > 0
    assert ivs["shrink_perturb"]["count"] >= 1
    assert state["config"]["plasticity"]["name"] in ("spectral", "l2")


@pytest.mark.parametrize("agent", ["sac", "ppo"])
def test_cli_composes_injection_with_the_unit_level_interventions(agent, tmp_path):
    """From the command line: injection after update 50, then ReDo, partial resets and
    shrink-and-perturb on the injected networks; the checkpoint holds what each did."""
    if agent == "sac":
        args = ["agent=sac", "env=gym", "env.id=Pendulum-v1", "total_steps=200", "agent.prefill_steps=100",
                "agent.replay_ratio=2", "agent.batch_size=32"]  # the fused update
    else:
        args = ["agent=ppo", "env=slippery-ant", "env.change_every=100", "total_steps=256", "agent.rollout_steps=128",
                "agent.num_minibatches=4", "agent.epochs=25"]  # 200 minibatch updates
    result = train(*args, "plasticity=l2", "agent.hidden_sizes=[32,32]",
                   "plasticity.interventions=[injection,redo,partial_reset,shrink_perturb]",
                   "plasticity.injection.at=50", "plasticity.redo.every=40", "plasticity.redo.tau=0.5",
                   "plasticity.partial_reset.every=70", "plasticity.shrink_perturb.every=60", "eval.episodes=0",
                   "log.every=100", "checkpoint.every=100000", f"run_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(sorted((tmp_path / "checkpoints").glob("*.pt"))[-1], weights_only=False)
    ivs = state["agent"]["plasticity"]["interventions"]
    assert ivs["injection"]["injected"]
    assert sum(ivs["redo"]["recycled"].values()) > 0
    assert ivs["partial_reset"]["count"] >= 2 and ivs["shrink_perturb"]["count"] >= 3


def test_cli_names_valid_interventions_on_one_line():
    result = train("plasticity=spectral", "plasticity.interventions=[redo,bogus]")
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "unknown intervention 'bogus'" in lines[0] and "shrink_perturb" in lines[0]


def test_shrink_perturb_follows_the_slippery_ant_friction_switch(tmp_path):
    """The on-policy loop tells the agent about each friction change: with no period, shrink-and-
    perturb runs only after changes (and not at all with task_change=false)."""
    counts = {}
    for flag in ("true", "false"):
        run_dir = tmp_path / flag
        result = train("agent=ppo", "env=slippery-ant", "env.change_every=100", "total_steps=512",
                       "agent.rollout_steps=128", "agent.num_minibatches=2", "agent.epochs=1",
                       "agent.hidden_sizes=[16,16]", "plasticity.interventions=[shrink_perturb]",
                       f"plasticity.shrink_perturb.task_change={flag}", "eval.episodes=0", "log.every=128",
                       "checkpoint.every=100000", f"run_dir={run_dir}")
        assert result.returncode == 0, result.stderr[-3000:]
        state = torch.load(sorted((run_dir / "checkpoints").glob("*.pt"))[-1], weights_only=True)
        counts[flag] = state["agent"]["plasticity"]["interventions"]["shrink_perturb"]["count"]
    assert counts["true"] >= 1 and counts["false"] == 0


def test_intervention_presets_compose(tmp_path):
    sac = train("-m", "+experiment=sac_redo,sac_shrink_perturb,sac_partial_reset", "env=gym", "env.id=Pendulum-v1",
                "total_steps=30", "agent.prefill_steps=20", "agent.replay_ratio=1", "agent.batch_size=16",
                "agent.buffer_size=1000", "agent.hidden_sizes=[16,16]", "eval.episodes=0", "log.every=10",
                f"hydra.sweep.dir={tmp_path / 'sac'}", timeout=900)
    assert sac.returncode == 0, sac.stderr[-3000:]
    ppo = train("-m", "+experiment=ppo_redo,ppo_shrink_perturb", "agent=ppo", "total_steps=128", "agent.rollout_steps=64",
                "agent.num_minibatches=4", "agent.epochs=1", "agent.hidden_sizes=[16,16]", "eval.episodes=0",
                "log.every=64", f"hydra.sweep.dir={tmp_path / 'ppo'}", timeout=900)
    assert ppo.returncode == 0, ppo.stderr[-3000:]
    configs = {}
    for group in ("sac", "ppo"):
        for run in (tmp_path / group).iterdir():
            if run.is_dir():
                c = torch.load(sorted((run / "checkpoints").glob("*.pt"))[-1], weights_only=True)["config"]
                configs[(c["agent"]["name"], tuple(c["plasticity"]["interventions"]))] = c
    assert set(configs) == {("sac", ("redo",)), ("sac", ("shrink_perturb",)), ("sac", ("partial_reset",)),
                            ("ppo", ("redo",)), ("ppo", ("shrink_perturb",))}
    assert configs[("sac", ("redo",))]["plasticity"]["redo"] == {"every": 1000, "tau": 0.025}
    assert configs[("ppo", ("redo",))]["plasticity"]["redo"] == {"every": 100, "tau": 0.1}
    assert configs[("ppo", ("redo",))]["plasticity"]["coef"] == 1e-4
    assert configs[("sac", ("partial_reset",))]["plasticity"]["partial_reset"]["every"] == 2_560_000


# -- plasticity injection -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sac", "sac_fused", "ppo"])
@pytest.mark.parametrize("regularizer", ["l2", "spectral", "wasserstein", "parseval"])
def test_injection_new_parameters_are_in_the_optimizer_and_train(kind, regularizer):
    """Also: a regularizer's closed-form gradient (added in place, not by autograd) leaves the
    frozen heads without a gradient, as autograd would (PPO's max_grad_norm clips over them all)."""
    torch.manual_seed(0)
    pcfg = PlasticityConfig(name=regularizer, coef=1e-4, interventions=["injection"], injection={"at": 2, "layers": 2})
    if kind in ("sac", "sac_fused"):
        agent = SACAgent(5, 3, SACConfig(hidden_sizes=(16, 16), replay_ratio=1, batch_size=16,
                                         fused=kind == "sac_fused", num_critics=2), plasticity=pcfg)
        nets = {"actor": agent.actor.net, "critic": agent.critic.net}
        step = lambda i: agent.update(sac_batch(updates=1, seed=i))  # noqa: E731
    else:
        agent = PPOAgent(6, 2, PPOConfig(rollout_steps=16, num_minibatches=4, epochs=1, hidden_sizes=(16, 16)),
                         plasticity=pcfg)
        nets = {"actor": agent.actor, "critic": agent.critic}
        data = np.random.default_rng(0)
        step = lambda i: agent.update(_rollout(data, 16))  # noqa: E731
    iv = agent.intervention("injection")
    assert not agent.plasticity_draws_random()  # update 1 does not inject
    step(0)  # SAC: update 1; PPO: updates 1-4 (injected after update 2, then trained twice)
    assert iv.injected == (kind == "ppo")
    if kind != "ppo":
        assert agent.plasticity_draws_random()  # update 2 injects: a fresh head is drawn
        step(1)
        assert iv.injected
    heads = {n: (net.layers if hasattr(net, "layers") else net)[-1] for n, net in nets.items()}
    opt_params = {id(p) for g in agent.optimizer.param_groups for p in g["params"]}
    for n, head in heads.items():
        assert all(p.requires_grad and id(p) in opt_params for p in head.fresh.parameters()), n
        for frozen in (head.frozen, head.fresh_frozen):
            assert not any(p.requires_grad or id(p) in opt_params for p in frozen.parameters()), n
            # No gradient left from before the injection (PPO's max_grad_norm clips over them all).
            assert all(p.grad is None for p in frozen.parameters()), n
    frozen_before = {n: [p.detach().clone() for p in h.frozen.parameters()] for n, h in heads.items()}
    for i in range(2, 6):
        step(i)
    for n, head in heads.items():
        # θ' trains away from its frozen copy θ''; θ and θ'' stay where they were.
        assert all(not torch.equal(p, q) for p, q in zip(head.fresh.parameters(), head.fresh_frozen.parameters())), n
        assert all(torch.equal(p, q) for p, q in zip(head.frozen.parameters(), frozen_before[n])), n
        assert all(p.grad is None for f in (head.frozen, head.fresh_frozen) for p in f.parameters()), n
    if kind != "ppo":  # the target critic has the injected head too, and follows the critic
        target_head = agent.critic_target.net.layers[-1]
        assert len(list(target_head.parameters())) == len(list(heads["critic"].parameters()))


def test_injection_leaves_the_output_unchanged_at_injection():
    """On the update it happens at, the networks' outputs before and after `inject()` agree."""
    for kind in ("sac", "ppo"):
        torch.manual_seed(0)
        pcfg = PlasticityConfig(interventions=["injection"], injection={"at": 10, "layers": 2})
        if kind == "sac":
            agent = SACAgent(5, 3, SACConfig(hidden_sizes=(16, 16), layer_norm=True, num_critics=2, fused=False),
                             plasticity=pcfg)
            cases = [(agent.actor.net, (torch.randn(32, 5),)), (agent.critic.net, (torch.randn(32, 8),)),
                     (agent.critic.net, (torch.randn(32, 8), True)), (agent.critic_target.net, (torch.randn(32, 8),))]
        else:
            agent = PPOAgent(6, 2, PPOConfig(hidden_sizes=(16, 16), layer_norm=True), plasticity=pcfg)
            cases = [(agent.actor, (torch.randn(32, 6),)), (agent.critic, (torch.randn(32, 6),))]
        before = [net(*args).detach() for net, args in cases]
        torch.manual_seed(1)
        agent.intervention("injection").inject()
        after = [net(*args).detach() for net, args in cases]
        for b, a in zip(before, after):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        n_before = sum(p.numel() for p in agent.actor.parameters())
        assert n_before > 0


def test_injection_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match="injection.at must be set"):
        PPOAgent(6, 2, PPOConfig(hidden_sizes=(8,)), plasticity=PlasticityConfig(interventions=["injection"]))
    for clash in ("cbp", "er_step"):
        with pytest.raises(ConfigError, match=f"does not compose with '{clash}': .*It composes with any regularizer"):
            PPOAgent(6, 2, PPOConfig(hidden_sizes=(8,)), plasticity=PlasticityConfig(
                interventions=[clash, "injection"], injection={"at": 5}))


def _injected_sac(interventions, **cfg):
    """A SAC agent (no LayerNorm, one critic) with `interventions` after an injection of 2-layer heads."""
    torch.manual_seed(0)
    pcfg = PlasticityConfig(interventions=["injection", *interventions], injection={"at": 10**9, "layers": 2}, **cfg)
    agent = SACAgent(5, 3, SACConfig(hidden_sizes=(16, 16), replay_ratio=1, batch_size=16, fused=False,
                                     num_critics=1), plasticity=pcfg)
    agent.update(sac_batch(updates=1, seed=0))
    agent.intervention("injection").inject()
    agent.update(sac_batch(updates=1, seed=1))
    return agent


def _seq(net):
    return net.layers if hasattr(net, "layers") else net


def _frozen(agent):
    heads = [_seq(n)[-1] for n in (agent.actor.net, agent.critic.net, agent.critic_target.net)]
    return [p.detach().clone() for h in heads for part in (h.frozen, h.fresh_frozen) for p in part.parameters()]


def test_injection_composes_with_shrink_perturb_on_the_trainable_parameters():
    agent = _injected_sac(["shrink_perturb"], shrink_perturb={"every": 10**9})
    frozen = _frozen(agent)
    trainable = [p.detach().clone() for p in agent.actor.net.parameters() if p.requires_grad]
    agent.intervention("shrink_perturb").after_update(agent.plasticity_updates, None)
    assert all(torch.equal(a, b) for a, b in zip(_frozen(agent), frozen))
    now = [p for p in agent.actor.net.parameters() if p.requires_grad]
    assert len(now) == len(trainable) and all(not torch.equal(a, b) for a, b in zip(now, trainable))
    agent.update(sac_batch(updates=2, seed=2))  # and training goes on


def test_injection_composes_with_partial_reset_of_the_fresh_head():
    agent = _injected_sac(["partial_reset"], partial_reset={"every": 10**9, "layers": 1})
    frozen = _frozen(agent)
    head = _seq(agent.critic.net)[-1]
    trunk = [p.detach().clone() for m in list(_seq(agent.critic.net))[:-1] for p in m.parameters()]
    fresh = [p.detach().clone() for p in head.fresh.parameters()]
    torch.manual_seed(5)
    agent.intervention("partial_reset").after_update(agent.plasticity_updates, None)
    assert all(torch.equal(a, b) for a, b in zip(_frozen(agent), frozen))
    assert all(torch.equal(p, q) for p, q in zip((p for m in list(_seq(agent.critic.net))[:-1]
                                                  for p in m.parameters()), trunk))
    last = linear_layers_of(head.fresh)[-1]
    changed = [not torch.equal(p, q) for p, q in zip(head.fresh.parameters(), fresh)]
    assert changed == [any(p is q for q in last.parameters()) for p in head.fresh.parameters()]
    target_last = linear_layers_of(_seq(agent.critic_target.net)[-1].fresh)[-1]
    assert all(torch.equal(p, q) for p, q in zip(last.parameters(), target_last.parameters()))
    agent.update(sac_batch(updates=2, seed=2))


def test_injection_composes_with_redo_on_the_trunk_and_the_fresh_head():
    """A planted dead unit of the fresh head's hidden layer is recycled; one of the trunk's last
    hidden layer (read by the frozen heads too) is not; θ and θ'' do not change."""
    agent = _injected_sac(["redo"], redo={"every": 10**9, "tau": 0.0})
    head, trunk_in = _seq(agent.actor.net)[-1], _seq(agent.actor.net)[0]
    fresh_in, fresh_out = linear_layers_of(head.fresh)
    with torch.no_grad():
        fresh_in.weight[4].zero_()
        fresh_in.bias[4] = -1.0
        trunk_in.weight[7].zero_()
        trunk_in.bias[7] = -1.0
    frozen = _frozen(agent)
    batch = sac_batch(updates=1, seed=3)
    agent.intervention("redo").after_update(agent.plasticity_updates, agent.plasticity_inputs((batch.obs[0], batch.action[0])))
    assert all(torch.equal(a, b) for a, b in zip(_frozen(agent), frozen))
    assert fresh_in.weight[4].abs().sum() > 0 and fresh_in.bias[4] == 0 and torch.all(fresh_out.weight[:, 4] == 0)
    assert torch.all(trunk_in.weight[7] == 0) and trunk_in.bias[7] == -1.0
    assert agent.plasticity_element_steps.tracked  # the recycled entries restart Adam per element
    agent.update(sac_batch(updates=2, seed=2))


def test_injection_keeps_the_per_element_adam_steps_of_earlier_surgery():
    torch.manual_seed(0)
    pcfg = PlasticityConfig(interventions=["redo", "injection"], redo={"every": 1, "tau": 0.5},
                            injection={"at": 10**9, "layers": 1})
    agent = SACAgent(5, 3, SACConfig(hidden_sizes=(16, 16), replay_ratio=1, batch_size=16, fused=False,
                                     num_critics=1), plasticity=pcfg)
    agent.update(sac_batch(updates=1, seed=0))
    before = {id(p): (i.clone(), t.clone()) for p, (i, t) in agent.plasticity_element_steps.tracked.items()}
    trunk = {id(p) for m in list(_seq(agent.actor.net))[:-1] for p in m.parameters()}
    assert trunk & set(before)
    agent.intervention("injection").inject()
    after = {id(p): v for p, v in agent.plasticity_element_steps.tracked.items()}
    for k in trunk & set(before):
        assert torch.equal(after[k][0], before[k][0]) and torch.equal(after[k][1], before[k][1])


@pytest.mark.parametrize("kind", ["sac", "ppo"])
def test_injection_seeds_updated_in_turn_equal_single_seed_runs(kind):
    from rl_plasticity.agents.seeds import SequentialGroup

    pcfg = PlasticityConfig(**FAST["injection"])
    if kind == "sac":
        cfg, dims = SACConfig(hidden_sizes=(16, 16), replay_ratio=2, batch_size=16, fused=False), (5, 3)
        agent_type, requests = SACAgent, [[sac_batch(seed=10 * i + s) for s in range(3)] for i in range(4)]
    else:
        cfg, dims = PPOConfig(rollout_steps=16, num_minibatches=4, epochs=1, hidden_sizes=(16, 16)), (6, 2)
        data = np.random.default_rng(0)
        agent_type, requests = PPOAgent, [[_rollout(data, 16) for _ in range(3)] for _ in range(3)]
    single, single_rngs = _agents(cfg, pcfg, [3, 4, 5], agent_type, dims)
    grouped, rngs = _agents(cfg, pcfg, [3, 4, 5], agent_type, dims)
    group = SequentialGroup(grouped, rngs)
    for reqs in requests:
        group.update(reqs)
        for agent, req, rng in zip(single, reqs, single_rngs):
            with rng:
                agent.update(req)
    for a, b in zip(single, grouped):
        assert a.intervention("injection").injected and b.intervention("injection").injected
        for x, y in zip(a.actor.parameters(), b.actor.parameters()):
            assert torch.equal(x, y)


def _sac_group_batches(g, seeds, updates=3):
    return [Batch(torch.randn(updates, 16, 5, generator=g), torch.rand(updates, 16, 3, generator=g) * 2 - 1,
                  torch.randn(updates, 16, generator=g), torch.randn(updates, 16, 5, generator=g),
                  torch.zeros(updates, 16)) for _ in seeds]


@pytest.mark.parametrize("num_critics,layer_norm,interventions", [
    (1, True, ()), (2, False, ("redo", "partial_reset", "shrink_perturb"))])
def test_injection_in_a_batched_sac_seed_group_equals_single_seed_runs(num_critics, layer_norm, interventions):
    """num_seeds=3 batched: every seed injects at update 3 (a fresh head from its own generators),
    the group stacks the injected networks anew (trunk and three heads) and seed i goes on as the
    single-seed run with seed i, also with redo, partial resets and shrink-and-perturb after it."""
    from rl_plasticity.agents.fused import InjectedPlan

    pcfg = PlasticityConfig(**_fast("+".join(["injection", *interventions])))
    cfg = SACConfig(hidden_sizes=(16, 16), num_critics=num_critics, layer_norm=layer_norm, replay_ratio=3,
                    batch_size=16)
    seeds = [3, 4, 5]
    single, single_rngs = _agents(cfg, pcfg, seeds)
    batched, rngs = _agents(cfg, pcfg, seeds)
    group = SACSeedGroup(batched, rngs)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):  # updates 1-12
        batches = _sac_group_batches(g, seeds)
        group.update(batches)
        for agent, batch, rng in zip(single, batches, single_rngs):
            with rng:
                agent.update(batch)
    assert all(isinstance(plan, InjectedPlan) for plan in (group._fused.actor, group._fused.critic,
                                                           group._fused.target))
    for a, b in zip(single, batched):
        assert a.intervention("injection").injected and b.intervention("injection").injected
        for net in ("actor", "critic", "critic_target"):
            for (key, v), w in zip(getattr(a, net).state_dict().items(), getattr(b, net).state_dict().values()):
                torch.testing.assert_close(w, v, rtol=0, atol=1e-5, msg=f"{net}.{key}")
        fresh = list(b.actor.net[-1].fresh.parameters())
        assert all(p.grad is not None for p in fresh)  # θ' trains in the stacks, θ and θ'' do not
        assert all(p.grad is None for p in b.actor.net[-1].fresh_frozen.parameters())
        for name in interventions:
            assert a.intervention(name).state_dict() == b.intervention(name).state_dict(), name
    # Seeds draw different fresh heads (each from its own generators).
    assert not torch.equal(batched[0].actor.net[-1].fresh[0].weight, batched[1].actor.net[-1].fresh[0].weight)


@pytest.mark.parametrize("kind", ["sac", "ppo"])
def test_seed_equality_after_injection_fails_when_its_draw_is_not_declared(kind, monkeypatch):
    """As test_seed_equality_fails_when_randomness_is_not_declared, for the injection's fresh head."""
    monkeypatch.setattr(INTERVENTIONS["injection"], "draws_random", lambda self, next_update: False)
    pcfg = PlasticityConfig(**FAST["injection"])
    assert (sac_seed_difference if kind == "sac" else ppo_seed_difference)(pcfg) > 1e-3


@pytest.mark.parametrize("layer_norm,interventions", [(True, ()), (False, ("redo", "partial_reset", "shrink_perturb"))])
def test_injection_in_a_batched_ppo_seed_group_equals_single_seed_runs(layer_norm, interventions):
    """The PPO seed group stacks the injected networks anew (its frozen heads are no autograd
    leaves) and seed i goes on as the single-seed run, with gradient clipping on."""
    from rl_plasticity.agents.fused import InjectedPlan

    pcfg = PlasticityConfig(name="l2", coef=1e-3, **_fast("+".join(["injection", *interventions])))
    cfg = PPOConfig(rollout_steps=32, num_minibatches=4, epochs=2, hidden_sizes=(16, 16), layer_norm=layer_norm,
                    max_grad_norm=0.5)
    seeds = [3, 4, 5]
    single, single_rngs = _agents(cfg, pcfg, seeds, PPOAgent, (6, 2))
    batched, rngs = _agents(cfg, pcfg, seeds, PPOAgent, (6, 2))
    group = PPOSeedGroup(batched, rngs)
    data = np.random.default_rng(0)
    for _ in range(2):  # minibatch updates 1-16, injected after 3
        rollouts = [_rollout(data, 32) for _ in seeds]
        group.update(rollouts)
        for agent, rollout, rng in zip(single, rollouts, single_rngs):
            with rng:
                agent.update(rollout)
    assert all(isinstance(plan, InjectedPlan) for plan in group._plans.values())
    for a, b in zip(single, batched):
        assert a.intervention("injection").injected and b.intervention("injection").injected
        for net in ("actor", "critic"):
            for (key, v), w in zip(getattr(a, net).state_dict().items(), getattr(b, net).state_dict().values()):
                torch.testing.assert_close(w, v, rtol=0, atol=1e-5, msg=f"{net}.{key}")
        head = b.actor[-1]
        assert all(not torch.equal(p, q) for p, q in zip(head.fresh.parameters(), head.fresh_frozen.parameters()))
        for name in interventions:
            assert a.intervention(name).state_dict() == b.intervention(name).state_dict(), name


def test_a_batched_sac_seed_group_compiles_its_update_again_after_injection(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # a wrapper that compiles nothing
    from rl_plasticity.agents.seeds import SeedRNG

    agents, rngs = [], []
    for s in (3, 4):
        torch.manual_seed(s)
        agents.append(SACAgent(5, 3, SACConfig(hidden_sizes=(16, 16), replay_ratio=3, batch_size=16),
                               plasticity=PlasticityConfig(**FAST["injection"]), seed=s, compile=True))
        rngs.append(SeedRNG())
    group = SACSeedGroup(agents, rngs)
    before, fused_before = group._losses_and_grads, group._fused
    assert before.compiled == fused_before.losses_and_grads
    group.update(_sac_group_batches(torch.Generator().manual_seed(0), (3, 4)))  # updates 1-3: injected after 3
    assert group._fused is not fused_before and group._losses_and_grads is not before
    assert group._losses_and_grads.compiled == group._fused.losses_and_grads


def test_a_batched_sac_seed_group_refuses_seeds_whose_layouts_part():
    seeds = [3, 4]
    agents, rngs = _agents(SACConfig(hidden_sizes=(16, 16), replay_ratio=1, batch_size=16),
                           PlasticityConfig(interventions=["injection"], injection={"at": 10**6}), seeds)
    group = SACSeedGroup(agents, rngs)
    agents[0].intervention("injection").inject()  # seed 3 alone
    other = [p.clone() for p in agents[1].actor.parameters()]
    with pytest.raises(RuntimeError, match=r"no longer have the same layout \(changed: seed\+0, counted from the "
                                           r"run's first seed\).*batch_seeds=false"):
        group.update(_sac_group_batches(torch.Generator().manual_seed(0), seeds, updates=1))
    assert all(torch.equal(p, q) for p, q in zip(agents[1].actor.parameters(), other))  # refused before updating


def test_a_batched_sac_seed_group_notices_an_injection_made_outside_its_updates():
    """A Python caller injects every seed between two group updates: the next update runs over
    the injected layout (stacked anew before it), so the fresh heads train from that update on."""
    seeds = [3, 4]
    agents, rngs = _agents(SACConfig(hidden_sizes=(16, 16), replay_ratio=1, batch_size=16),
                           PlasticityConfig(interventions=["injection"], injection={"at": 10**6}), seeds)
    group = SACSeedGroup(agents, rngs)
    for agent in agents:
        agent.intervention("injection").inject()
    fresh = [[p.clone() for p in a.actor.net[-1].fresh.parameters()] for a in agents]
    group.update(_sac_group_batches(torch.Generator().manual_seed(0), seeds, updates=1))
    assert type(group._fused.actor).__name__ == "InjectedPlan"
    for agent, before in zip(agents, fresh):
        assert all(not torch.equal(p, q) for p, q in zip(agent.actor.net[-1].fresh.parameters(), before))


def _resumed_agents(first, rngs, cfg, pcfg, *agent_args):
    """New agents (other seeds) loaded with `first`'s saved states, their generators set to the
    saved `rngs`: what a resumed run's seeds start from."""
    states = [copy.deepcopy(a.state_dict()) for a in first]
    second, rngs2 = _agents(cfg, pcfg, [10, 11], *agent_args)
    for agent, state in zip(second, states):
        agent.load_state_dict(state)
    for rng, saved in zip(rngs2, rngs):
        rng.python, rng.numpy, rng.torch, rng.cuda = saved.python, saved.numpy, saved.torch.clone(), saved.cuda
    return second, rngs2


def _assert_injected_and_equal(first, second, nets):
    for a, b in zip(first, second):
        assert b.intervention("injection").injected
        for net in nets:
            for v, w in zip(getattr(a, net).state_dict().values(), getattr(b, net).state_dict().values()):
                assert torch.equal(v, w)


def test_a_batched_sac_seed_group_resumes_after_injection_with_bitwise_equal_updates():
    """Seeds saved after the injection load into new agents (`prepare_load` injects first); a new
    group over them stacks the injected layout, and its next updates equal the first group's."""
    pcfg = PlasticityConfig(name="l2", coef=1e-3, **_fast("injection+redo"))
    cfg = SACConfig(hidden_sizes=(16, 16), num_critics=2, replay_ratio=3, batch_size=16)
    seeds = [3, 4]
    first, rngs = _agents(cfg, pcfg, seeds)
    group = SACSeedGroup(first, rngs)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # updates 1-6: injected after update 3
        group.update(_sac_group_batches(g, seeds))
    second, rngs2 = _resumed_agents(first, rngs, cfg, pcfg)
    resumed = SACSeedGroup(second, rngs2)
    for _ in range(2):
        batches = _sac_group_batches(g, seeds)
        group.update(batches)
        resumed.update(batches)
    _assert_injected_and_equal(first, second, ("actor", "critic", "critic_target"))


def test_a_batched_ppo_seed_group_resumes_after_injection_with_bitwise_equal_updates():
    pcfg = PlasticityConfig(name="l2", coef=1e-3, **_fast("injection+redo"))
    cfg = PPOConfig(rollout_steps=32, num_minibatches=4, epochs=1, hidden_sizes=(16, 16), max_grad_norm=0.5)
    seeds = [3, 4]
    first, rngs = _agents(cfg, pcfg, seeds, PPOAgent, (6, 2))
    group = PPOSeedGroup(first, rngs)
    data = np.random.default_rng(0)
    group.update([_rollout(data, 32) for _ in seeds])  # minibatch updates 1-4: injected after 3
    second, rngs2 = _resumed_agents(first, rngs, cfg, pcfg, PPOAgent, (6, 2))
    resumed = PPOSeedGroup(second, rngs2)
    for _ in range(2):
        rollouts = [_rollout(data, 32) for _ in seeds]
        group.update(rollouts)
        resumed.update(rollouts)
    _assert_injected_and_equal(first, second, ("actor", "critic"))


def test_report_labels_name_the_interventions():
    from rl_plasticity.report import base_label

    config = {"agent.name": "sac", "agent.layer_norm": True, "plasticity.name": "spectral",
              "plasticity.interventions": ["redo", "shrink_perturb"]}
    assert base_label(config) == "sac+LN+spectral+redo+shrink_perturb"
    assert base_label({"agent.name": "ppo", "plasticity.name": "cbp_l2", "plasticity.cbp": True,
                       "plasticity.interventions": ["cbp"]}) == "ppo+cbp_l2"


# Checkpoints written by the code before interventions.py (main at ee9d50b), with the commands below.
OLD_RUNS = {
    "pre_interventions_ppo_cbp_l2.pt": (
        ["agent=ppo", "env=slippery-ant", "env.change_every=100", "plasticity=cbp_l2", "plasticity.cbp_maturity=2",
         "plasticity.cbp_replacement_rate=0.1", "agent.rollout_steps=64", "agent.num_minibatches=4", "agent.epochs=1",
         "agent.hidden_sizes=[8,8]", "eval.episodes=0", "log.every=64", "checkpoint.every=64"], 128, 256),
    "pre_interventions_sac_l2_er_reset.pt": (
        ["env=gym", "env.id=Pendulum-v1", "plasticity=l2_er", "plasticity.er_batch=8", "agent.reset_interval=30",
         "agent.prefill_steps=20", "agent.replay_ratio=1", "agent.batch_size=8", "agent.hidden_sizes=[8,8]",
         "eval.episodes=0", "log.every=20", "checkpoint.every=40", "checkpoint.save_replay=true"], 40, 80),
}


@pytest.mark.parametrize("name", sorted(OLD_RUNS))
def test_a_run_written_before_interventions_resumes(name, tmp_path):
    from pathlib import Path

    args, step, total = OLD_RUNS[name]
    old = torch.load(Path(__file__).parent / "data" / name, weights_only=True)
    assert "interventions" not in old["agent"]["plasticity"] and old["step"] == step
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / f"step_{step:09d}.pt").write_bytes((Path(__file__).parent / "data" / name).read_bytes())
    result = train(*args, f"total_steps={total}", f"run_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    new = torch.load(sorted((tmp_path / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    assert new["step"] == total
    pl, old_pl = new["agent"]["plasticity"], old["agent"]["plasticity"]
    assert pl["updates"] > old_pl["updates"]
    if "cbp" in name:  # CBP's counters continued from the old ones
        assert pl["interventions"]["cbp"]["actor"]["replaced_total"] >= old_pl["cbp"]["actor"]["replaced_total"] > 0
    else:  # the ER optimizers' and the resets' state continued
        # 21 updates before, 61 after: the resets at updates 30 and 60 happened, on the old schedule
        assert old_pl["updates"] == 21 and old_pl["reset_count"] == 0
        assert pl["updates"] == 61 and pl["reset_count"] == 2
        assert set(pl["interventions"]) == {"er_step", "reset"}
