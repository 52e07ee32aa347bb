"""The effective-rank step's fast route against today's autograd reference (issue 19).

`reference_effective_rank_step` below is the ER step as the package computed it before the Gram
route: per network, autograd through `torch.linalg.svdvals` of each hidden layer's features, a
backward, and a (non-fused) Adam step.  The current step must give the same gradients to float
tolerance and take the same step.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rl_plasticity.agents.networks import EnsembleMLP
from rl_plasticity.plasticity.effective_rank import effective_rank, gram_effective_rank, layer_effective_ranks
from rl_plasticity.plasticity.layers import FeatureRecorder
from rl_plasticity.plasticity.mixin import PlasticityConfig, PlasticityMixin


def reference_er_objective(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """−mean over hidden layers of ER(features), through svdvals (the code before issue 19)."""
    with FeatureRecorder(net, detach=False) as rec:
        net(x)
    return -torch.stack([effective_rank(f).mean() for f in rec.features]).mean()


def reference_effective_rank_step(nets: dict[str, nn.Module], inputs: dict[str, torch.Tensor],
                                  optimizers: dict[str, torch.optim.Optimizer], er_batch: int) -> None:
    for name, net in nets.items():
        loss = reference_er_objective(net, inputs[name][:er_batch].detach())
        opt = optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


class Holder(PlasticityMixin):
    def __init__(self, nets, **cfg):
        self.init_plasticity(PlasticityConfig(**cfg))
        self.register_networks(nets)

    def plasticity_inputs(self, batch):
        return batch


def networks(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    nets = {"plain": nn.Sequential(nn.Linear(6, 40), nn.LayerNorm(40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                                   nn.Linear(40, 2)),
            "ensemble": EnsembleMLP(2, 7, [40, 40], 1, layer_norm=False)}
    return {k: v.to(dtype) for k, v in nets.items()}


def inputs(dtype, rows=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"plain": torch.randn(rows + 8, 6, generator=g, dtype=dtype),
            "ensemble": torch.randn(rows + 8, 7, generator=g, dtype=dtype)}


@pytest.mark.parametrize("shape", [(3, 24, 40), (2, 60, 16), (1, 20, 20)])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_gram_route_equals_svdvals_value_and_gradient(shape, dtype, rtol):
    """Wide (with dead units: zero columns), tall and square features of full rank: equal value
    and gradient (float64: to 1e-9; float32 inputs: float32 tolerance, the reference's own
    accuracy).  Rank-deficient features: the next test."""
    g = torch.Generator().manual_seed(0)
    f = torch.relu(torch.randn(*shape, generator=g, dtype=dtype))
    if shape[1] < shape[2]:
        f[..., :2] = 0.0  # dead units; rank still min(rows, width)
    weights = torch.randn(shape[0], generator=g, dtype=dtype)
    a, b = f.clone().requires_grad_(), f.clone().requires_grad_()
    value_ref, value = (effective_rank(a) * weights).sum(), (gram_effective_rank(b) * weights).sum()
    value_ref.backward()
    value.backward()
    torch.testing.assert_close(value, value_ref, rtol=rtol, atol=0)
    torch.testing.assert_close(b.grad, a.grad, rtol=rtol, atol=rtol * a.grad.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rank_deficient_features_agree_on_the_row_and_column_spaces(dtype):
    """More dead units than rows: σ = 0 is a kink of ER and svdvals' gradient there adds
    g_i u_i v_iᵀ along LAPACK's null-space basis; the Gram route leaves those out.  On the column
    and row spaces of F (projectors P_c, P_r) the two agree, and the Gram gradient lies there."""
    g = torch.Generator().manual_seed(3)
    f = torch.relu(torch.randn(2, 30, 24, generator=g, dtype=dtype))
    f[..., :8] = 0.0  # rank ≤ 16 < 24
    a, b = f.clone().requires_grad_(), f.clone().requires_grad_()
    effective_rank(a).sum().backward()
    gram_effective_rank(b).sum().backward()
    torch.testing.assert_close(gram_effective_rank(f), effective_rank(f), rtol=1e-5, atol=0)
    u, s, vh = torch.linalg.svd(f.double(), full_matrices=False)
    keep = (s > 1e-6 * s[..., :1]).double()
    pc = (u * keep.unsqueeze(-2)) @ u.mT
    pr = (vh.mT * keep.unsqueeze(-2)) @ vh
    ref, new = pc @ a.grad.double() @ pr, b.grad.double()
    scale = new.abs().max().item()
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(new, ref, rtol=0, atol=tol * scale)
    torch.testing.assert_close(pc @ new @ pr, new, rtol=0, atol=tol * scale)


def test_layer_effective_ranks_batches_by_shape_in_order():
    g = torch.Generator().manual_seed(0)
    feats = [torch.rand(1, 16, 8, generator=g), torch.rand(2, 16, 12, generator=g), torch.rand(3, 16, 8, generator=g)]
    for got, f in zip(layer_effective_ranks(feats), feats):
        torch.testing.assert_close(got, effective_rank(f), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_effective_rank_step_takes_the_reference_step(dtype, rtol):
    """Two ER steps of the mixin (plain network with LayerNorm, 2-member ensemble) against the
    reference: same gradients before each step, same parameters after; task gradients kept."""
    nets_ref, nets = networks(dtype), networks(dtype)
    x = inputs(dtype)
    er_lr = 1e-3
    holder = Holder(nets, name="er", er=True, er_lr=er_lr, er_batch=24)
    ref_opts = {n: torch.optim.Adam(net.parameters(), lr=er_lr) for n, net in nets_ref.items()}
    task = {n: [torch.randn_like(p) for p in net.parameters()] for n, net in nets.items()}
    for n, net in nets.items():
        for p, t in zip(net.parameters(), task[n]):
            p.grad = t.clone()
    for _ in range(2):
        for n in nets:  # the gradients the step is about to take
            params_ref, params = list(nets_ref[n].parameters()), list(nets[n].parameters())
            g_ref = torch.autograd.grad(reference_er_objective(nets_ref[n], x[n][:24]), params_ref, allow_unused=True)
            with FeatureRecorder(nets[n], detach=False) as rec:
                nets[n](x[n][:24])
            objective = -torch.stack([r.mean() for r in layer_effective_ranks(rec.features)]).mean()
            g_new = torch.autograd.grad(objective, params, allow_unused=True)
            for a, b in zip(g_new, g_ref):
                assert (a is None) == (b is None)
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())
        reference_effective_rank_step(nets_ref, x, ref_opts, 24)
        holder.effective_rank_step(x)
        for n in nets:
            for a, b in zip(nets[n].parameters(), nets_ref[n].parameters()):
                torch.testing.assert_close(a, b, rtol=rtol, atol=er_lr * 1e-3)
    for n, net in nets.items():
        for p, t in zip(net.parameters(), task[n]):
            assert torch.equal(p.grad, t)


def test_er_optimizer_state_from_before_the_fused_step_loads():
    """A checkpoint whose ER optimizers were plain (foreach) Adams loads and continues with the
    same moments: one more step from it equals one more step of the plain Adam, to tolerance."""
    nets_old, nets_new = networks(), networks()
    x = inputs(torch.float32)
    old_opts = {n: torch.optim.Adam(net.parameters(), lr=1e-3) for n, net in nets_old.items()}
    reference_effective_rank_step(nets_old, x, old_opts, 24)
    state = Holder(nets_old, name="er", er=True, er_lr=1e-3, er_batch=24).plasticity_state_dict()
    state["er_optimizers"] = {n: o.state_dict() for n, o in old_opts.items()}
    assert state["er_optimizers"]["plain"]["param_groups"][0]["fused"] is None
    for n in nets_new:
        nets_new[n].load_state_dict(nets_old[n].state_dict())
    holder = Holder(nets_new, name="er", er=True, er_lr=1e-3, er_batch=24)
    holder.load_plasticity_state_dict(state)
    assert all(o.param_groups[0]["fused"] for o in holder._er_optimizers.values())
    reference_effective_rank_step(nets_old, x, old_opts, 24)
    holder.effective_rank_step(x)
    for n in nets_new:
        for a, b in zip(nets_new[n].parameters(), nets_old[n].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
