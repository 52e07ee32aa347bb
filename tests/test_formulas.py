"""agents/formulas.py: each hand-derived derivative the fused SAC update uses equals autograd's
derivative of the formula it sits next to."""
import torch

from rl_plasticity.agents import formulas


def test_tanh_gaussian_backward_is_the_derivative_of_the_sample():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    log_std = (torch.rand(7, 3, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    noise = torch.randn(7, 3, generator=g, dtype=torch.float64)
    d_action = torch.randn(7, 3, generator=g, dtype=torch.float64)
    d_log_prob = torch.rand(7, 1, generator=g, dtype=torch.float64)  # per row, broadcast over |A|
    action, log_prob, std = formulas.tanh_gaussian_sample(mean, log_std, noise)
    loss = (d_action * action).sum() + (d_log_prob.squeeze(-1) * log_prob).sum()
    want_mean, want_log_std = torch.autograd.grad(loss, (mean, log_std))
    d_mean, d_log_std = formulas.tanh_gaussian_backward(d_action, d_log_prob, action.detach(), std.detach(), noise)
    torch.testing.assert_close(d_mean, want_mean)
    torch.testing.assert_close(d_log_std, want_log_std)


def test_squash_log_std_backward_is_the_derivative_of_the_squash():
    raw = torch.linspace(-4, 4, 17, dtype=torch.float64, requires_grad=True)
    log_std, t = formulas.squash_log_std(raw, -5.0, 2.0)
    assert float(log_std.detach().min()) > -5.0 and float(log_std.detach().max()) < 2.0
    d = torch.linspace(-1, 1, 17, dtype=torch.float64)
    want, = torch.autograd.grad((d * log_std).sum(), raw)
    torch.testing.assert_close(formulas.squash_log_std_backward(d.clone(), t.detach(), -5.0, 2.0), want)


def test_temperature_loss_backward_is_its_derivative():
    log_alpha = torch.tensor(-0.3, dtype=torch.float64, requires_grad=True)
    log_prob = torch.randn(9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want, = torch.autograd.grad(formulas.temperature_loss(log_alpha, log_prob, -3.0), log_alpha)
    torch.testing.assert_close(formulas.temperature_loss_backward(log_prob, -3.0), want)


def test_min_over_critics_and_td_target():
    q = torch.tensor([[1.0, 5.0], [2.0, 4.0]])  # (critics, rows)
    assert formulas.min_over_critics(q).tolist() == [1.0, 4.0]
    assert formulas.min_over_critics(q[:1]).tolist() == [1.0, 5.0]
    target = formulas.soft_td_target(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0]),
                                     torch.tensor([-1.0, -1.0]), 0.5, 0.9)
    assert target.tolist() == [1.0 + 0.9 * (2.0 + 0.5), 1.0]
