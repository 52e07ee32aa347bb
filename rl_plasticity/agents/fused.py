"""The fused SAC update: one update's forward and backward written out, without an autograd graph.

At replay ratio 16 on a CPU, the eager update spends about a third of its time outside the
matrix multiplications: autograd bookkeeping, one small kernel per elementwise op, and twice the
matmuls it needs.  This path computes exactly the same losses and gradients (the tests compare it
with the eager path to float tolerance) and saves work where autograd cannot see it:

- the actor runs once on [next_obs; obs] (2B rows) instead of twice, and the critic once on
  [(obs, action); (obs, π(obs))] instead of twice: one matmul per layer on twice the rows;
- the critic's parameter gradient is taken from the first B rows only, while the input gradient
  for the actor's loss flows through the other B rows (the eager path needs a second forward
  through detached parameters for that);
- LayerNorm and ReLU use ATen's fused forward/backward kernels; gradients are written into
  persistent `.grad` buffers with `out=` (no allocation per update);
- nothing synchronises with the host, so the updates of one env step queue back to back.

Networks are walked once (`network_plan`: an `MLPPlan`, or after plasticity injection an
`InjectedPlan`, a trunk and three heads) and read through their modules at every call, so the
plan stays valid across optimizer steps; a reset or an injection builds new modules and a new plan.
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import nn

from rl_plasticity.agents.formulas import (actor_loss as sac_actor_loss, critic_td_loss, min_over_critics,
                                           soft_td_target, squash_log_std, squash_log_std_backward,
                                           tanh_gaussian_backward, tanh_gaussian_sample, temperature_loss,
                                           temperature_loss_backward)
from rl_plasticity.ensemble import Block, EnsembleLinear, chain_blocks, crelu
from rl_plasticity.optim import adam_step, adam_step_many  # noqa: F401  (re-exported: their old home)
from rl_plasticity.plasticity.interventions import InjectedHead

aten = torch.ops.aten


def _grad_buffer(p: torch.Tensor) -> torch.Tensor:
    """`p.grad`, allocated once and then overwritten in place."""
    if p.grad is None or p.grad.shape != p.shape:
        p.grad = torch.empty_like(p)
    return p.grad


def crelu_backward(d: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Gradient at the pre-activation z of `ensemble.crelu` from the gradient `d` at
    a = [relu(z), relu(−z)]: d₁·[z > 0] − d₂·[z < 0], each half masked where its output is
    positive (as autograd's relu)."""
    w = a.shape[-1] // 2
    return aten.threshold_backward(d[..., :w], a[..., :w], 0) - aten.threshold_backward(d[..., w:], a[..., w:], 0)


class StackedLinear:
    """The same linear layer of several networks (seeds), its parameters stacked along a leading
    dimension: weight (members, in, out), or (members, out, in) with `transposed` (a stack of
    `nn.Linear` weights); bias (members, 1, out).  Gradients live in the tensors' `.grad`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, transposed: bool):
        self.weight, self.bias, self.transposed = weight, bias, transposed
        self.num_members = weight.shape[0]


class StackedNorm:
    """LayerNorm gains and biases of several networks stacked as (members, 1, width)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, eps: float):
        self.weight, self.bias, self.eps = weight, bias, eps


class MLPPlan:
    """Hand-written forward and backward of an `mlp(...)` (nn.Sequential), an `EnsembleMLP`, or
    a stack of either (`MLPPlan.stacked`: one network per seed, batched like ensemble members).

    Shapes: one member works on (rows, dim) with addmm; `members` > 1 (or a stack) on
    (members, rows, dim) with baddbmm, the first layer taking a shared (rows, in) input or
    per-member rows.
    """

    def __init__(self, network: Optional[nn.Module] = None, blocks: Optional[list[Block]] = None):
        if blocks is None:
            blocks = self._walk(network)
        self.blocks = blocks
        first = blocks[0].linear
        self.stacked = isinstance(first, StackedLinear)
        self.members = first.num_members if isinstance(first, (EnsembleLinear, StackedLinear)) else 1
        self.batched = self.stacked or self.members > 1

    @staticmethod
    def _walk(network: nn.Module) -> list[Block]:
        blocks = chain_blocks(network, strict="fused path")
        for block in blocks:
            if not isinstance(block.linear, (nn.Linear, EnsembleLinear)):
                raise TypeError(f"fused path: unexpected layer {type(block.linear).__name__}")
        return blocks

    @classmethod
    def stacked_blocks(cls, network: nn.Module, weights: Iterable[torch.Tensor]) -> "MLPPlan":
        """A plan over stacked parameters: `weights` are the stacked tensors, in the order of
        `network.parameters()`, each (seeds · members, ...) as agents/seeds.py lays them out (an
        iterator is consumed up to this network's last tensor)."""
        it = iter(weights)
        blocks = []
        for block in cls._walk(network):
            transposed = isinstance(block.linear, nn.Linear)
            linear = StackedLinear(next(it), next(it), transposed)
            norm = StackedNorm(next(it), next(it), block.norm.eps) if block.norm is not None else None
            blocks.append(Block(linear, norm, block.activation))
        return cls(blocks=blocks)

    # -- parameter views ----------------------------------------------------------------------
    def _weight(self, lin) -> torch.Tensor:
        """(in, out) for one member, (members, in, out) otherwise."""
        if isinstance(lin, nn.Linear):
            return lin.weight.t()
        if isinstance(lin, StackedLinear):
            return lin.weight.transpose(1, 2) if lin.transposed else lin.weight
        return lin.weight[0] if self.members == 1 else lin.weight

    def _bias(self, lin) -> torch.Tensor:
        if isinstance(lin, nn.Linear):
            return lin.bias
        return lin.bias[0, 0] if not self.batched else lin.bias

    def _norm_params(self, norm) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(norm, nn.LayerNorm) or self.batched:
            return norm.weight, norm.bias
        return norm.weight[0, 0], norm.bias[0, 0]

    # -- forward ------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, x: torch.Tensor, keep: bool = True) -> tuple[torch.Tensor, list]:
        """Output ((rows, out) or (members, rows, out)) and, with `keep`, what backward needs."""
        cache = []
        h = x
        m = self.members
        batched = self.batched
        for block in self.blocks:
            w, b = self._weight(block.linear), self._bias(block.linear)
            if not batched:
                z = torch.addmm(b, h, w)
            elif h.dim() == 2:
                z = torch.baddbmm(b, h.expand(m, *h.shape), w)
            else:
                z = torch.baddbmm(b, h, w)
            mean = rstd = xhat = None
            y = z
            if block.norm is not None:
                g, beta = self._norm_params(block.norm)
                width = z.shape[-1]
                if not batched:
                    y, mean, rstd = aten.native_layer_norm(z, [width], g, beta, block.norm.eps)
                else:
                    xhat, mean, rstd = aten.native_layer_norm(z, [width], None, None, block.norm.eps)
                    y = torch.addcmul(beta, xhat, g)
            a = crelu(y) if block.crelu else torch.relu_(y) if block.relu else y
            if keep:
                cache.append((h, z, mean, rstd, xhat, a))
            h = a
        return h, cache

    # -- backward -----------------------------------------------------------------------------
    @torch.no_grad()
    def backward(self, cache: list, grad_out: torch.Tensor, start: int = 0, param_rows: Optional[int] = None,
                 input_rows: Optional[slice] = None, input_cols: Optional[slice] = None,
                 param_grads: bool = True) -> Optional[torch.Tensor]:
        """Write parameter gradients into `.grad` and return the input gradient if asked.

        The cached forward rows from `start` on are the ones `grad_out` belongs to; parameter
        gradients come from the first `param_rows` of them (all when None), so rows that only
        carry an input gradient (a loss reading the network through fixed parameters) add
        nothing to them.  The input gradient is returned for `input_rows` × `input_cols`
        (summed over members when the input was shared), or None when neither is given.  Without
        `param_grads` (frozen parameters: the heads θ, θ'' of plasticity injection) only the input
        gradient is computed and no `.grad` is touched.
        """
        # Per block, from the output back (d: the gradient at the block's output a):
        #   activation  a = relu(y): d_y = d·[a > 0]; CReLU: `crelu_backward`;
        #   LayerNorm   y = x̂ γ + β, x̂ = (z − mean)·rstd: d_γ = Σ_rows d_y x̂, d_β = Σ_rows d_y,
        #               d_x̂ = d_y γ, and d_z = rstd (d_x̂ − mean(d_x̂) − x̂ mean(d_x̂ x̂)) over the
        #               width, which ATen's native_layer_norm_backward computes;
        #   linear      z = h W + b (W (in, out)): d_W = hᵀ d_z, d_b = Σ_rows d_z, d_h = d_z Wᵀ
        #               (an nn.Linear stores Wᵀ (out, in), whose gradient is d_zᵀ h).
        # Parameter gradients sum over the first `param_rows` rows only; d_h flows through all.
        batched = self.batched
        rows = slice(start, None)
        d = grad_out
        n_blocks = len(self.blocks)
        result = None
        for index in range(n_blocks - 1, -1, -1):
            block = self.blocks[index]
            h, z, mean, rstd, xhat, a = (None if t is None else t[rows] if t.dim() == 2 else t[:, rows]
                                         for t in cache[index])
            p = d.shape[-2] if param_rows is None else param_rows
            if block.crelu:
                d = crelu_backward(d, a)
            elif block.relu:
                d = aten.threshold_backward(d, a, 0)
            if block.norm is not None:
                g, beta = self._norm_params(block.norm)
                width = z.shape[-1]
                if not batched:
                    if param_grads and p == d.shape[0]:
                        d, dg, db = aten.native_layer_norm_backward(d, z, [width], mean, rstd, g, beta, [True, True, True])
                    else:
                        if param_grads:
                            _, dg, db = aten.native_layer_norm_backward(d[:p], z[:p], [width], mean[:p], rstd[:p], g,
                                                                        beta, [False, True, True])
                        d = aten.native_layer_norm_backward(d, z, [width], mean, rstd, g, beta, [True, False, False])[0]
                    if param_grads:
                        _grad_buffer(block.norm.weight).view(-1).copy_(dg)
                        _grad_buffer(block.norm.bias).view(-1).copy_(db)
                else:
                    if param_grads:
                        torch.sum(d[:, :p] * xhat[:, :p], dim=1, keepdim=True, out=_grad_buffer(block.norm.weight))
                        torch.sum(d[:, :p], dim=1, keepdim=True, out=_grad_buffer(block.norm.bias))
                    # The row slice of a (members, rows, 1) statistic is not contiguous, and the
                    # kernel reads it as if it were (wrong rows for every member after the first).
                    d = aten.native_layer_norm_backward(d * g, z, [width], mean.contiguous(), rstd.contiguous(), None,
                                                        None, [True, False, False])[0]
            lin = block.linear
            w = self._weight(lin)
            if param_grads:
                gw, gbias = _grad_buffer(lin.weight), _grad_buffer(lin.bias)
                if not batched:
                    dp, hp = d[:p], h[:p]
                    if isinstance(lin, nn.Linear):
                        torch.mm(dp.t(), hp, out=gw)
                    else:
                        torch.mm(hp.t(), dp, out=gw[0])
                    torch.sum(dp, dim=0, out=gbias.view(-1))
                else:
                    dp = d[:, :p]
                    if getattr(lin, "transposed", False):  # stacked nn.Linear weights: (members, out, in)
                        hp = h[:p].expand(dp.shape[0], -1, -1) if h.dim() == 2 else h[:, :p]
                        torch.bmm(dp.transpose(1, 2), hp, out=gw)
                    elif h.dim() == 2:
                        torch.matmul(h[:p].t(), dp, out=gw)
                    else:
                        torch.bmm(h[:, :p].transpose(1, 2), dp, out=gw)
                    torch.sum(dp, dim=1, keepdim=True, out=gbias)
            if index > 0:
                wt = w.t() if not batched else w.transpose(1, 2)
                # One output unit (a critic's head): an outer product, which as a matmul with
                # inner size 1 runs ten times slower than the same products broadcast.
                d = d * wt if d.shape[-1] == 1 else torch.mm(d, wt) if not batched else torch.bmm(d, wt)
            elif input_rows is not None or input_cols is not None:
                r = input_rows or slice(None)
                c = input_cols or slice(None)
                if not batched:
                    result = torch.mm(d[r], w[c].t())
                else:
                    result = torch.bmm(d[:, r], w[:, c].transpose(1, 2))
                    if h.dim() == 2:
                        result = result.sum(0)
        return result


class InjectedPlan:
    """Forward and backward of a network after plasticity injection (Nikishin et al. 2023, §3,
    Eq. 1; `interventions.InjectedHead`): a trunk, then three heads on its output z, summed as
    h_θ(z) + h_θ'(z) − h_θ''(z).  Each part is an `MLPPlan` and runs its own forward and backward
    (the per-layer formulas live there); this class only wires them: forward sums the heads in
    the order the module does, backward sends ±(the output gradient) into each head, takes
    parameter gradients from the fresh head θ' alone (θ and θ'' are frozen: input gradients only),
    adds the three input gradients at z and passes the sum through the trunk.  Without a trunk
    (the head is the whole network) the heads' input gradients are the network's.

    Same call signatures as `MLPPlan.forward` / `MLPPlan.backward`, so `FusedSAC` takes either.
    """

    SIGNS = (1.0, 1.0, -1.0)      # θ, θ', θ''
    TRAINED = (False, True, False)

    def __init__(self, trunk: Optional[MLPPlan], heads: tuple[MLPPlan, MLPPlan, MLPPlan]):
        self.trunk, self.heads = trunk, heads
        first = trunk if trunk is not None else heads[0]
        self.stacked, self.members, self.batched = first.stacked, first.members, first.batched

    @torch.no_grad()
    def forward(self, x: torch.Tensor, keep: bool = True) -> tuple[torch.Tensor, tuple]:
        z, trunk_cache = self.trunk.forward(x, keep) if self.trunk is not None else (x, None)
        (a, ca), (b, cb), (c, cc) = (head.forward(z, keep) for head in self.heads)
        return InjectedHead.combine(a, b, c), (trunk_cache, (ca, cb, cc))

    @torch.no_grad()
    def backward(self, cache: tuple, grad_out: torch.Tensor, start: int = 0, param_rows: Optional[int] = None,
                 input_rows: Optional[slice] = None, input_cols: Optional[slice] = None,
                 param_grads: bool = True) -> Optional[torch.Tensor]:
        """As `MLPPlan.backward`."""
        trunk_cache, head_caches = cache
        # The heads' input is z (all its rows wanted), or without a trunk the network's input.
        rows, cols = (input_rows, input_cols) if self.trunk is None else (slice(None), None)
        wants_input = rows is not None or cols is not None
        d_z = None
        for head, head_cache, sign, trained in zip(self.heads, head_caches, self.SIGNS, self.TRAINED):
            own = trained and param_grads
            if not (own or wants_input):
                continue  # a frozen head whose input gradient nobody reads
            g = head.backward(head_cache, grad_out if sign > 0 else -grad_out, start, param_rows, rows, cols,
                              param_grads=own)
            if g is not None:
                d_z = g if d_z is None else d_z + g
        if self.trunk is None:
            return d_z
        return self.trunk.backward(trunk_cache, d_z, start, param_rows, input_rows, input_cols, param_grads)


Plan = Union[MLPPlan, InjectedPlan]


def network_plan(network: nn.Module, weights: Optional[Iterable[torch.Tensor]] = None) -> Plan:
    """The plan of `network` (an nn.Sequential, or a module with `.layers`): an `MLPPlan`, or
    after plasticity injection (its last layer an `InjectedHead`) an `InjectedPlan`.  With
    `weights` (stacked tensors in the order of `network.parameters()`, agents/seeds.py) the plan
    reads those instead of the network's own parameters (`MLPPlan.stacked_blocks`)."""
    it = None if weights is None else iter(weights)

    def plan(part: nn.Module) -> MLPPlan:
        return MLPPlan(part) if it is None else MLPPlan.stacked_blocks(part, it)

    seq = network.layers if isinstance(getattr(network, "layers", None), nn.Sequential) else network
    if not (isinstance(seq, nn.Sequential) and len(seq) and isinstance(seq[-1], InjectedHead)):
        return plan(network)
    head = seq[-1]
    trunk = plan(nn.Sequential(*list(seq)[:-1])) if len(seq) > 1 else None
    return InjectedPlan(trunk, (plan(head.frozen), plan(head.fresh), plan(head.fresh_frozen)))


class FusedSAC:
    """The fused update of one `SACAgent` (see the module docstring); same maths as
    `SACAgent._update_once`, which stays the reference.

    With `seeds` (agents/seeds.py) the plans are stacks of several agents' networks and every
    tensor carries a leading seed dimension: obs (seeds, B, obs_dim), noise (seeds, 2, B, |A|),
    `log_alpha` (seeds,); the critics of all seeds are one ensemble of seeds · num_critics
    members, and each metric comes back per seed, shape (seeds,).
    """

    def __init__(self, agent=None, *, plans: Optional[tuple[Plan, Plan, Plan]] = None,
                 log_alpha: Optional[torch.Tensor] = None, seeds: Optional[int] = None, template=None):
        template = agent if agent is not None else template
        self.cfg = template.cfg
        self.action_dim, self.obs_dim = template.action_dim, template.obs_dim
        self.target_entropy = template.target_entropy
        self.log_std_min, self.log_std_max = template.actor.log_std_min, template.actor.log_std_max
        self.num_critics = template.cfg.num_critics
        self.seeds = seeds
        if agent is not None:
            self.actor = network_plan(agent.actor.net)
            self.critic = network_plan(agent.critic.net)
            self.target = network_plan(agent.critic_target.net)
            # A reset builds a new temperature tensor and, with it, a new FusedSAC.
            self.log_alpha = agent.log_alpha
            if self.actor.members != 1:
                raise ValueError("fused path: the actor must be a single network")
        else:
            self.actor, self.critic, self.target = plans
            self.log_alpha = log_alpha

    def _critic_input(self, x: torch.Tensor) -> torch.Tensor:
        """Per seed (seeds, rows, d) -> per critic member (seeds · num_critics, rows, d)."""
        C = self.num_critics
        if self.seeds is None or C == 1:
            return x
        return x.unsqueeze(1).expand(x.shape[0], C, *x.shape[1:]).reshape(-1, *x.shape[1:])

    @staticmethod
    def hidden_features(plan: MLPPlan, cache: list, rows: slice) -> list[torch.Tensor]:
        """The post-activation outputs of `plan`'s hidden layers kept in `cache` by its forward,
        rows `rows` of them, as (members, rows, width): views, no copies (nothing writes into a
        cached activation afterwards, the backward included)."""
        out = []
        for block, (_, _, _, _, _, a) in zip(plan.blocks, cache):
            if block.relu:
                out.append(a[rows].unsqueeze(0) if a.dim() == 2 else a[:, rows])
        return out

    @torch.no_grad()
    def losses_and_grads(self, obs: torch.Tensor, action: torch.Tensor, reward: torch.Tensor, next_obs: torch.Tensor,
                         terminated: torch.Tensor, noise: torch.Tensor,
                         features: bool = False) -> tuple[dict[str, torch.Tensor], Optional[dict[str, list]]]:
        """Write d(critic + actor + alpha loss)/dθ into every `.grad`; return the update's metrics
        and, with `features`, the hidden features continual backprop reads (else None).

        `noise` (2, B, |A|) (with seeds: (seeds, 2, B, |A|)): standard normal draws for the next
        action and the policy action.  The features are those `SACAgent._autograd_gradients`
        records, taken from this forward's caches (`hidden_features`): the actor's on obs (the
        last B rows of its pass), the critic's on (obs, action) (the first B rows of its pass),
        {"actor": [...], "critic": [...]}, each (members, B, width) (with seeds: seeds, or
        seeds · num_critics members).  Under CUDA graphs (`accelerate`) they are the graph's
        outputs, valid until its next replay: read before the next call, as the update does.
        """
        cfg = self.cfg
        lead = () if self.seeds is None else (self.seeds,)
        B, A, C = obs.shape[-2], self.action_dim, self.num_critics
        log_alpha = self.log_alpha
        alpha = log_alpha.detach().exp()
        alpha_col = alpha.unsqueeze(-1)  # against (..., B)
        lo, hi = self.log_std_min, self.log_std_max

        # Actor on [next_obs; obs]: the sample for the target and the policy sample in one pass.
        head, actor_cache = self.actor.forward(torch.cat([next_obs, obs], dim=-2))
        mean, raw = head[..., :A], head[..., A:]
        log_std, t = squash_log_std(raw, lo, hi)
        eps = noise.reshape(*lead, 2 * B, A)
        a, log_prob, std = tanh_gaussian_sample(mean, log_std, eps)
        next_a, pi_a = a[..., :B, :], a[..., B:, :]
        next_lp, lp = log_prob[..., :B], log_prob[..., B:]

        # TD target through the target critic.
        q_next, _ = self.target.forward(self._critic_input(torch.cat([next_obs, next_a], dim=-1)), keep=False)
        next_q = min_over_critics(q_next.reshape(*lead, C, B))
        target = soft_td_target(reward, terminated, next_q, next_lp, alpha_col, cfg.gamma)

        # Critic on [(obs, action); (obs, π(obs))].
        obs2 = torch.cat([obs, obs], dim=-2)
        x = torch.cat([obs2, torch.cat([action, pi_a], dim=-2)], dim=-1)
        q_all, critic_cache = self.critic.forward(self._critic_input(x))
        q_all = q_all.reshape(*lead, C, 2 * B)
        q, q_pi = q_all[..., :B], q_all[..., B:]
        critic_loss, diff = critic_td_loss(q, target)
        # ∂ actor loss / ∂Q(s, ã) = −1/B at the critic that attains the minimum (min_over_critics
        # routes the gradient to its argmin), 0 at the others.
        if C == 1:
            q_pi_min = q_pi[..., 0, :]
            d_q_pi = torch.full_like(q_pi, -1.0 / B)
        else:
            q_pi_min, which = q_pi.min(-2)
            d_q_pi = torch.zeros_like(q_pi).scatter_(-2, which.unsqueeze(-2), -1.0 / B)
        actor_loss = sac_actor_loss(alpha_col, lp, q_pi_min)
        alpha_loss = temperature_loss(log_alpha.detach().unsqueeze(-1), lp, self.target_entropy)

        # Critic backward: parameters from the first B rows, dQ/da from the other B.
        # ∂ critic_td_loss / ∂q = 2(q − target)/B per critic (its mean over rows, summed over critics).
        d_q = torch.cat([diff.mul(2.0 / B), d_q_pi], dim=-1)
        if self.seeds is not None:
            d_q = d_q.reshape(-1, 2 * B, 1)
        else:
            d_q = d_q.reshape(2 * B, 1) if C == 1 else d_q.unsqueeze(-1)
        dq_da = self.critic.backward(critic_cache, d_q, param_rows=B, input_rows=slice(B, None),
                                     input_cols=slice(self.obs_dim, None))
        if self.seeds is not None and C > 1:
            dq_da = dq_da.reshape(self.seeds, C, B, A).sum(1)

        # Actor backward through the squashed Gaussian (noise fixed: the reparameterisation).
        # The actor loss mean_b(α log π_b − min Q(s_b, ã_b)) has ∂/∂ã = dq_da (the −1/B above,
        # carried through the critic's layers to its action input) and ∂/∂log π_b = α/B; from
        # there formulas.tanh_gaussian_backward gives ∂/∂μ and ∂/∂log σ (its docstring derives
        # them), and squash_log_std_backward ∂/∂raw = ∂/∂log σ · ½(hi − lo)(1 − tanh²(raw)).  The
        # head's output is [μ, raw], so [∂/∂μ, ∂/∂raw] is the gradient the actor's layers take.
        # Only the last B rows (the policy sample on obs) reach the actor's loss: the first B
        # (the next action of the TD target) carry no gradient, the target being fixed.
        a_pi, t_pi, std_pi, eps_pi = pi_a, t[..., B:, :], std[..., B:, :], eps[..., B:, :]
        scale = (alpha / B).reshape(*lead, 1, 1) if lead else alpha / B
        du, d_log_std = tanh_gaussian_backward(dq_da, scale, a_pi, std_pi, eps_pi)
        d_raw = squash_log_std_backward(d_log_std, t_pi, lo, hi)
        self.actor.backward(actor_cache, torch.cat([du, d_raw], dim=-1), start=B)

        # Temperature.
        _grad_buffer(log_alpha).copy_(temperature_loss_backward(lp, self.target_entropy))
        hidden = None
        if features:
            hidden = {"actor": self.hidden_features(self.actor, actor_cache, slice(B, None)),
                      "critic": self.hidden_features(self.critic, critic_cache, slice(None, B))}
        return {
            "losses/critic": critic_loss,
            "losses/actor": actor_loss,
            "losses/alpha": alpha_loss,
            "value/alpha": alpha,
            "value/q_mean": q.mean((-2, -1)),
            "value/entropy": -lp.mean(-1),
        }, hidden
