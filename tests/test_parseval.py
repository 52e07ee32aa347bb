"""Parseval regularization (Chung et al. 2024, §3) on hand-worked cases and against autograd, and
the two ways of applying a closed-form penalty (loss path, gradient path) giving one gradient."""
import math

import pytest
import torch
from torch import nn

from rl_plasticity.agents.networks import EnsembleMLP
from rl_plasticity.agents.ppo import policy_mlp
from rl_plasticity.config import ConfigError
from rl_plasticity.plasticity.mixin import PlasticityConfig
from rl_plasticity.plasticity.regularizers import Parseval
from tests.test_plasticity import Holder


def two_layer(w1, w2=((1.0, 2.0),)):
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(w1))
        net[2].weight.copy_(torch.tensor(w2))
        net[0].bias.fill_(3.0)
    return net


def test_hand_worked_penalty_and_gradient():
    """W = [[1, 1], [0, 1]]: WWᵀ − 2I = [[0, 1], [1, −1]], ‖·‖²_F = 3; gradient 4(WWᵀ − 2I)W =
    [[0, 4], [4, 0]].  The output layer and the biases are not regularized."""
    net = two_layer([[1.0, 1.0], [0.0, 1.0]])
    reg = Parseval(net, s=2.0, width=None)
    assert reg.penalty().item() == pytest.approx(3.0)
    reg.add_penalty_gradient(coef=0.5)
    torch.testing.assert_close(net[0].weight.grad, torch.tensor([[0.0, 2.0], [2.0, 0.0]]))
    assert net[2].weight.grad is None and net[0].bias.grad is None
    assert reg.last_value().item() == pytest.approx(1.5)
    # The width rule: × (64 / 2)² for a layer of 2 output units.
    assert Parseval(net, s=2.0, width=64).penalty().item() == pytest.approx(3.0 * 32**2)
    # s = 1 and an orthonormal W: no penalty.
    c, s_ = math.cos(0.3), math.sin(0.3)
    assert Parseval(two_layer([[c, -s_], [s_, c]]), s=1.0, width=None).penalty().item() == pytest.approx(0.0, abs=1e-12)


def test_orthogonal_init_with_gain_sqrt2_has_zero_penalty_at_s_2():
    """PPO's hidden layers (orthogonal, gain √2, no more rows than columns): WWᵀ = 2I exactly."""
    torch.manual_seed(0)
    net = policy_mlp(16, (8, 8), 3, False, 0.01)
    assert Parseval(net, s=2.0).penalty().item() == pytest.approx(0.0, abs=1e-9)
    assert Parseval(net, s=1.0).penalty().item() > 1.0


def perturbed():
    torch.manual_seed(1)
    nets = [nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)),
            EnsembleMLP(3, 5, [8, 7], 1, layer_norm=True),
            nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))]
    with torch.no_grad():
        for net in nets:
            for p in net.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return nets


@pytest.mark.parametrize("width", [None, 64.0])
def test_closed_form_gradient_equals_autograd(width):
    for net in perturbed():
        params = list(net.parameters())
        task = [torch.randn_like(p) for p in params]
        reg = Parseval(net, s=2.0, width=width)
        expected = torch.autograd.grad(0.7 * reg.penalty(), params, allow_unused=True)
        for p, g in zip(params, task):
            p.grad = g.clone()
        reg.add_penalty_gradient(coef=0.7)
        for p, g, e in zip(params, task, expected):
            torch.testing.assert_close(p.grad, g if e is None else g + e, rtol=1e-5, atol=1e-5)
        assert sum(e is not None for e in expected) == len(reg.weights) == len(reg.params)


def test_ensemble_members_are_regularized_as_separate_matrices():
    """Member m of an EnsembleLinear (in, out) is the matrix Wₘᵀ: its own ‖WₘWₘᵀ − sI‖²."""
    ens = perturbed()[1]
    reg = Parseval(ens, s=2.0, width=None)
    expected = 0.0
    for layer in (ens.layers[0], ens.layers[3]):  # hidden layers; the head (last) is left out
        for w in layer.weight.detach():
            rows = w.t()
            expected += (rows @ rows.t() - 2.0 * torch.eye(rows.shape[0])).square().sum().item()
    assert reg.penalty().item() == pytest.approx(expected, rel=1e-5)


def test_config_defaults_and_validation():
    cfg = PlasticityConfig(name="parseval")
    assert (cfg.coef, cfg.parseval_s, cfg.parseval_width) == (1e-3, 2.0, 64.0)
    with pytest.raises(ConfigError, match="plasticity.parseval_s"):
        PlasticityConfig(name="parseval", parseval_s=0.0)


# -- the loss path and the gradient path (Holder: tests/test_plasticity.py's smallest agent) -----
def _net():
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def _perturb(net):
    """Move away from the initial parameters (which wasserstein measures from)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", ["spectral", "parseval", "wasserstein"])
def test_loss_path_and_gradient_path_apply_the_penalty_once(name):
    """Three ways a user may call the mixin give the same gradient, and it is the penalty's:
    the loss path alone, the gradient path alone, and both (applied once, not twice)."""
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))

    def grads(loss_path: bool, gradient_path: bool, penalty: bool = True):
        torch.manual_seed(9)  # the same power-iteration start for every holder
        net = _net()
        holder = Holder(net, name=name, coef=0.3 if penalty else 0.0)
        _perturb(net)
        loss = net(x).square().mean()
        if loss_path:
            loss = holder.add_plasticity_losses(loss, ("net",))
        loss.backward()
        if gradient_path:
            holder.plasticity_before_step()
        return [p.grad.clone() for p in net.parameters()], holder

    task_only, _ = grads(False, False, penalty=False)
    loss_only, holder = grads(True, False)
    step_only, _ = grads(False, True)
    both, _ = grads(True, True)
    for a, b, c, t in zip(loss_only, step_only, both, task_only):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(a, t) for a, t in zip(loss_only, task_only)), "the penalty changes the gradient"
    # The next update: the loss path again applies it (the mark of the last update is gone).
    assert holder.plasticity_loss("net") is not None


@pytest.mark.parametrize("preset", ["sac_parseval", "ppo_parseval"])
def test_parseval_presets_run_with_the_papers_values(preset, tmp_path):
    from rl_plasticity.checkpoint import list_checkpoints
    from tests.test_cli import train

    if preset == "sac_parseval":
        args = ["env=gym", "env.id=Pendulum-v1", "total_steps=30", "agent.prefill_steps=20", "agent.replay_ratio=1",
                "agent.batch_size=16", "agent.buffer_size=1000", "agent.hidden_sizes=[32,32]"]
    else:
        args = ["agent=ppo", "total_steps=64", "agent.rollout_steps=64", "agent.num_minibatches=4", "agent.epochs=1",
                "agent.hidden_sizes=[32,32]"]
    result = train(f"+experiment={preset}", *args, "eval.episodes=0", "log.every=10", "plasticity.log_every=2",
                   f"run_dir={tmp_path}", timeout=900)
    assert result.returncode == 0, result.stderr
    state = torch.load(list_checkpoints(tmp_path / "checkpoints")[-1], weights_only=True)
    p = state["config"]["plasticity"]
    assert (p["name"], p["coef"], p["parseval_s"], p["parseval_width"]) == ("parseval", 1e-3, 2.0, 64)
    agent = state["config"]["agent"]
    assert agent["name"] == preset[:3]
    if preset == "ppo_parseval":
        assert agent["lr"] == 1e-4 and state["config"]["env"]["name"] == "slippery-ant"
    else:
        assert agent["layer_norm"] and agent["replay_ratio"] == 1  # the command line beats the preset
