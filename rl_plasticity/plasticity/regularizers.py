"""Plasticity regularizers: penalties added to a network's loss, each with its own state.

Each regularizer is registered by name (`plasticity=<name>` on the command line), is built for
one network, returns the *unscaled* penalty of that network (the mixin multiplies by the
coefficient), and saves and restores its state (initial parameters, power-iteration vectors).
Formulas follow the papers in shared/papers:

- spectral (spectral-regularization.md §4, App. A.7): Σ_W (σ₁(W)^k − 1)² + Σ_b ‖b‖^{2k}
  + Σ_γ Σ_i (γ_i − 1)²; LayerNorm biases count as biases.  σ₁ = uᵀWv from one power-iteration
  step per call with persistent u, v (detached), so the gradient is that of uᵀWv.  In training
  the gradient is added in closed form (`Spectral.add_penalty_gradient`); `penalty()` is the
  same term through autograd.
- l2: ‖θ‖²;  l2_init (regenerative): ‖θ − θ₀‖²;
- wasserstein (directions-of-curvature.md): per parameter tensor Σ_i (sort(θ)_i − sort(θ₀)_i)².
- er / l2_er (spectral-collapse-l2-er.md §7, App. D.2, Algorithm 1): no loss term for er; l2_er
  adds ‖θ‖².  The effective-rank step itself is `PlasticityMixin.effective_rank_step`, its
  objective in plasticity/effective_rank.py.
- parseval (Chung et al. 2024, "Parseval regularization for continual RL", §3): keeps the
  hidden weight matrices near s × an orthogonal matrix (formula and defaults: `Parseval`).

Regularizers whose gradient has a closed form (`direct_gradient`) add it in place between
backward and the optimizer step; through `penalty()` the same term goes through autograd, and
the mixin makes sure that each update gets it exactly once, whichever way the caller asks.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from rl_plasticity.plasticity.effective_rank import effective_rank  # noqa: F401  (re-exported)
from rl_plasticity.plasticity.layers import WeightMatrix, weights_and_vectors

REGULARIZERS: dict[str, type["Regularizer"]] = {}


def register(name: str) -> Callable[[type["Regularizer"]], type["Regularizer"]]:
    def deco(cls: type["Regularizer"]) -> type["Regularizer"]:
        cls.name = name
        REGULARIZERS[name] = cls
        return cls

    return deco


class Regularizer:
    """Base: no penalty, no state."""

    name = "base"

    def __init__(self, network: nn.Module, k: float = 2.0):
        self.network = network
        self.k = k

    @classmethod
    def build(cls, network: nn.Module, cfg: Any) -> "Regularizer":
        """The regularizer of `network` with the settings of a PlasticityConfig `cfg`."""
        return cls(network, k=cfg.k)

    direct_gradient = False
    """True when the regularizer adds its gradient itself (`add_penalty_gradient`) instead of a loss
    term, to save the autograd overhead at every update; the gradient is the same."""

    def penalty(self) -> torch.Tensor | None:
        """The unscaled penalty of the network, or None when this regularizer adds no loss term."""
        return None

    def add_penalty_gradient(self, coef: float) -> None:
        raise NotImplementedError

    _last_coef = 0.0  # the coefficient of the last closed-form gradient (`add_penalty_gradient` sets it)

    @torch.no_grad()
    def last_value(self) -> torch.Tensor:
        """coef · penalty at the current parameters (for `losses/plasticity`), for a regularizer
        that adds its gradient itself."""
        return self._last_coef * self.penalty()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@register("none")
class NoRegularizer(Regularizer):
    pass


@register("er")
class EffectiveRankOnly(Regularizer):
    """ER has no loss term: its own optimizer maximises effective rank (see EffectiveRankStep)."""


def _trained_grads(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(parameters, their `.grad`) of the trained ones among `params` (frozen ones, e.g. the heads
    plasticity injection froze, get no gradient, as through autograd); a missing `.grad` is zeros."""
    trained = [p for p in params if p.requires_grad]
    for p in trained:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return trained, [p.grad for p in trained]


@register("l2")
class L2(Regularizer):
    """‖θ‖² over every parameter of the network (weight decay as a loss term, coef · ‖θ‖²: the L2
    of spectral-collapse-l2-er.md §7 and Algorithm 1, λ‖W‖²₂; Dohare et al. 2024's L2).

    In training its gradient 2 · coef · θ is added directly (`add_penalty_gradient`, one foreach
    op over the trained parameters), which is what autograd through `penalty()` computes, without
    a graph per update.
    """

    def __init__(self, network: nn.Module, k: float = 2.0):
        super().__init__(network, k)
        self.params = list(network.parameters())

    def penalty(self) -> torch.Tensor:
        return torch.stack([p.square().sum() for p in self.params]).sum()

    direct_gradient = True

    @torch.no_grad()
    def add_penalty_gradient(self, coef: float) -> None:
        """Add ∇(coef · ‖θ‖²) = 2 · coef · θ to the trained parameters' `.grad` in place."""
        trained, grads = _trained_grads(self.params)
        if trained:
            torch._foreach_add_(grads, trained, alpha=2.0 * coef)
        self._last_coef = coef


@register("l2_er")
class L2ER(L2):
    """L2 term in the loss; the effective-rank step runs beside it (Algorithm 1)."""


@register("cbp")
class ContinualBackpropOnly(Regularizer):
    """No loss term: continual backprop replaces units after each update (plasticity/cbp.py)."""


@register("cbp_l2")
class ContinualBackpropL2(L2):
    """L2 term in the loss with continual backprop beside it (CBP+L2, Dohare et al. 2024)."""


class _InitialParams(Regularizer):
    """Keeps a copy of θ₀ (restored with the state)."""

    def __init__(self, network: nn.Module, k: float = 2.0):
        super().__init__(network, k)
        self.params = list(network.parameters())
        self.initial = [p.detach().clone() for p in self.params]

    def state_dict(self) -> dict[str, Any]:
        return {"initial": [t.clone() for t in self.initial]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for dst, src in zip(self.initial, state["initial"]):
            dst.copy_(src)


@register("l2_init")
class L2Init(_InitialParams):
    """‖θ − θ₀‖² over every parameter (L2 towards the initial parameters, "L2 Init" of Kumar et al.
    2023, a baseline of spectral-regularization.md §5).  In training its gradient
    2 · coef · (θ − θ₀) is added directly (`add_penalty_gradient`), as autograd through
    `penalty()` computes it."""

    def penalty(self) -> torch.Tensor:
        return torch.stack([(p - p0).square().sum() for p, p0 in zip(self.params, self.initial)]).sum()

    direct_gradient = True

    @torch.no_grad()
    def add_penalty_gradient(self, coef: float) -> None:
        """Add ∇(coef · ‖θ − θ₀‖²) = 2 · coef · (θ − θ₀) to the trained parameters' `.grad` in place."""
        pairs = [(p, p0) for p, p0 in zip(self.params, self.initial) if p.requires_grad]
        trained, grads = _trained_grads([p for p, _ in pairs])
        if trained:
            torch._foreach_add_(grads, torch._foreach_sub(trained, [p0 for _, p0 in pairs]), alpha=2.0 * coef)
        self._last_coef = coef


def _member_rows(p: torch.Tensor, ensemble: bool) -> torch.Tensor:
    return p.reshape(p.shape[0], -1) if ensemble else p.reshape(1, -1)


_RADIX_MIN = 8192  # float32 CPU tensors from this size sort as int32 keys (torch's radix sort)


def sort_order(values: torch.Tensor) -> torch.Tensor:
    """Indices that sort the 1-D tensor `values` ascending.

    Large float32 tensors on a CPU are sorted as order-preserving int32 keys (the IEEE bits, with
    the magnitude bits of negative numbers flipped), for which torch's CPU sort is a radix sort:
    about 10× faster than its float sort at 65,536 entries (a 256×256 weight).  The same order
    except among exactly equal values, which may come in another order (any order sorts them),
    and −0.0, which comes before +0.0.
    """
    if values.dtype == torch.float32 and values.device.type == "cpu" and values.numel() >= _RADIX_MIN:
        bits = values.view(torch.int32)
        return torch.sort(torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits), stable=True).indices
    return torch.sort(values).indices


@register("wasserstein")
class Wasserstein(_InitialParams):
    """Σ over parameter tensors (and ensemble members) of Σ_i (sort(θ)_i − sort(θ₀)_i)²: the squared
    2-Wasserstein distance between the empirical distributions of current and initial values.

    In training the gradient is added directly (`add_penalty_gradient`): per tensor (or member),
    2(sort(θ) − sort(θ₀)) scattered back through the sorting permutation, which is what autograd
    through `penalty()` computes (sort's backward is that scatter), without the graph and with the
    faster sort of `sort_order`.
    """

    def __init__(self, network: nn.Module, k: float = 2.0):
        super().__init__(network, k)
        weights, vectors = weights_and_vectors(network)
        ens = {id(w.param) for w in weights if w.kind == "ensemble"} | {id(v.param) for v in vectors if v.ensemble}
        self.ensemble = [id(p) in ens for p in self.params]
        self.sorted_initial = [_member_rows(p0, e).sort(-1).values for p0, e in zip(self.initial, self.ensemble)]

    def penalty(self) -> torch.Tensor:
        terms = [(_member_rows(p, e).sort(-1).values - s0).square().sum()
                 for p, e, s0 in zip(self.params, self.ensemble, self.sorted_initial)]
        return torch.stack(terms).sum()

    direct_gradient = True

    @torch.no_grad()
    def add_penalty_gradient(self, coef: float) -> None:
        """Add ∇(coef · penalty) to the parameters' `.grad` in place (see the class docstring)."""
        for p, e, s0 in zip(self.params, self.ensemble, self.sorted_initial):
            rows = _member_rows(p.detach(), e)
            grad = torch.empty_like(rows)
            for r in range(rows.shape[0]):
                order = sort_order(rows[r])
                grad[r].index_copy_(0, order, rows[r].index_select(0, order) - s0[r])
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(grad.view(p.shape), alpha=2.0 * coef)
        self._last_coef = coef

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.sorted_initial = [_member_rows(p0, e).sort(-1).values for p0, e in zip(self.initial, self.ensemble)]


@register("spectral")
class Spectral(Regularizer):
    """(σ₁(W)^k − 1)² per weight matrix, ‖b‖^{2k} per bias, (γ − 1)² per LayerNorm gain entry.

    The power-iteration vectors start as normalised Gaussian draws from `generator` (default:
    torch's global generator, which a run seeds with its seed, so every run, seed and reset
    starts from its own vectors), followed by `warm_up()`: enough steps that σ₁ = uᵀWv is
    accurate from the first update (one step from a random start gives about 0.7 σ₁ on a
    256×256 layer).
    """

    WARMUP_TOL = 1e-5     # warm-up stops when 10 steps raise no σ₁ estimate by more than this (relative) ...
    WARMUP_MAX = 2000     # ... or after this many steps

    def __init__(self, network: nn.Module, k: float = 2.0, generator: Optional[torch.Generator] = None):
        super().__init__(network, k)
        self.weights, self.vectors = weights_and_vectors(network)
        plain = [v for v in self.vectors if not v.ensemble]
        self.plain_biases = [v.param for v in plain if v.kind != "ln_gain"]
        self.plain_gains = [v.param for v in plain if v.kind == "ln_gain"]
        self.member_vectors = [v for v in self.vectors if v.ensemble]
        self.params = [w.param for w in self.weights] + [v.param for v in self.vectors]
        self.members_per_weight = [w.matrices().shape[0] for w in self.weights]
        self.single_member = all(m == 1 for m in self.members_per_weight)
        self.u: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for w in self.weights:
            m = w.matrices().detach()
            u = torch.randn(m.shape[0], m.shape[1], generator=generator, dtype=m.dtype).to(m.device)
            v = torch.randn(m.shape[0], m.shape[2], generator=generator, dtype=m.dtype).to(m.device)
            self.u.append(F.normalize(u, dim=-1))
            self.v.append(F.normalize(v, dim=-1))
        self.sigma_cache: list[torch.Tensor] = []
        self.warmup_steps = self.warm_up()

    @torch.no_grad()
    def warm_up(self) -> int:
        """Power-iteration steps until σ₁ has converged; returns how many were taken.

        The estimate ‖Wv‖ = √(vᵀWᵀWv) is the Rayleigh quotient of WᵀW along its power iteration,
        so it never decreases; it is checked every 10 steps and the warm-up stops when no
        matrix's estimate rose by more than `WARMUP_TOL` relative (at most `WARMUP_MAX` steps).
        On the agents' 256-wide layers that takes 100–300 steps and leaves σ₁ within 1e-4 of
        `torch.linalg.matrix_norm(ord=2)` (tests/test_plasticity.py).  Run once at construction
        (a reset builds a new regularizer); the host reads the estimates only here.
        """
        if not self.weights:
            return 0
        previous = torch.cat(self.power_iteration())
        steps = 1
        while steps < self.WARMUP_MAX:
            for _ in range(10):
                sigma = torch.cat(self.power_iteration())
            steps += 10
            if bool(((sigma - previous) <= self.WARMUP_TOL * sigma.abs().clamp_min(1e-12)).all()):
                break
            previous = sigma
        return steps

    @torch.no_grad()
    def power_iteration(self) -> list[torch.Tensor]:
        """One step for every matrix: v ← Wᵀu/‖Wᵀu‖, u ← Wv/‖Wv‖; returns σ₁ = uᵀWv = ‖Wv‖."""
        sigmas = []
        if self.single_member:  # matrix-vector products on plain 2-D views: fewest ops
            for i, w in enumerate(self.weights):
                m = w.matrices().detach()[0]
                v = torch.mv(m.t(), self.u[i][0])
                v = v / v.norm().clamp_min(1e-12)
                wv = torch.mv(m, v)
                sigma = wv.norm()
                self.u[i] = (wv / sigma.clamp_min(1e-12)).unsqueeze(0)
                self.v[i] = v.unsqueeze(0)
                sigmas.append(sigma.reshape(1))
            self.sigma_cache = sigmas
            return sigmas
        for i, w in enumerate(self.weights):
            m = w.matrices().detach()
            v = (self.u[i].unsqueeze(-2) @ m).squeeze(-2)
            v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            wv = (m @ v.unsqueeze(-1)).squeeze(-1)
            sigma = wv.norm(dim=-1)
            self.u[i] = wv / sigma.unsqueeze(-1).clamp_min(1e-12)
            self.v[i] = v
            sigmas.append(sigma)
        self.sigma_cache = sigmas
        return sigmas

    def sigmas(self) -> list[torch.Tensor]:
        """σ₁ estimates uᵀWv per matrix (members,), differentiable in W (autograd reference)."""
        return [torch.einsum("bi,bij,bj->b", u, w.matrices(), v) for w, u, v in zip(self.weights, self.u, self.v)]

    def penalty(self) -> torch.Tensor:
        """One power-iteration step, then the penalty through autograd on uᵀWv."""
        self.power_iteration()
        return self.penalty_autograd()

    direct_gradient = True

    @torch.no_grad()
    def add_penalty_gradient(self, coef: float) -> None:
        """One power-iteration step, then add ∇(coef · penalty) to the parameters' `.grad` in place.

        The gradient `penalty()` sends through autograd (u, v detached: ∂σ₁/∂W = u vᵀ), applied
        without building a graph: a rank-one `addr_` per matrix and foreach ops over biases and
        gains.  Agents call it between backward and the optimizer step (PlasticityMixin does, via
        `plasticity_before_step`), which keeps the per-update cost of the regularizer small.  The
        penalty's value is only computed when asked for (`last_value`).
        """
        self.power_iteration()
        k = self.k
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        sigma = torch.cat(self.sigma_cache)
        sk = sigma.pow(k)
        factors = (coef * 2.0 * k) * sigma.pow(k - 1) * (sk - 1.0)
        if self.single_member:
            for w, u, v, f in zip(self.weights, self.u, self.v, factors.unbind()):
                w.param.grad.view(u.shape[1], v.shape[1]).addr_(u[0] * f, v[0])
        else:
            for w, u, v, f in zip(self.weights, self.u, self.v, factors.split(self.members_per_weight)):
                g = (f.reshape(-1, 1) * u).unsqueeze(-1) * v.unsqueeze(-2)
                w.param.grad.add_(g.reshape(w.param.shape))
        if self.plain_biases:
            sq = torch.stack(torch._foreach_norm(self.plain_biases)).square()
            scales = list(((coef * 2.0 * k) * sq.pow(k - 1)).unbind())
            torch._foreach_add_([b.grad for b in self.plain_biases], torch._foreach_mul(self.plain_biases, scales))
        if self.plain_gains:
            diff = torch._foreach_sub(self.plain_gains, 1.0)
            torch._foreach_add_([g.grad for g in self.plain_gains], diff, alpha=2.0 * coef)
        for vec in self.member_vectors:
            rows = vec.rows()
            if vec.kind == "ln_gain":
                vec.param.grad.add_((2.0 * coef * (rows - 1.0)).reshape(vec.param.shape))
            else:
                sq = rows.square().sum(-1, keepdim=True)
                vec.param.grad.add_((coef * 2.0 * k * sq.pow(k - 1) * rows).reshape(vec.param.shape))
        self._last_coef = coef

    @torch.no_grad()
    def last_value(self) -> torch.Tensor:
        """coef · penalty at the vectors of the last step (for `losses/plasticity`)."""
        sigma = torch.cat([(u.unsqueeze(-2) @ w.matrices() @ v.unsqueeze(-1)).reshape(-1)
                           for w, u, v in zip(self.weights, self.u, self.v)])
        value = (sigma.pow(self.k) - 1.0).square().sum()
        for vec in self.vectors:
            rows = vec.rows()
            if vec.kind == "ln_gain":
                value = value + (rows - 1.0).square().sum()
            else:
                value = value + rows.square().sum(-1).pow(self.k).sum()
        return self._last_coef * value

    def penalty_autograd(self) -> torch.Tensor:
        """The penalty at the current u, v through autograd on uᵀWv (no power-iteration step)."""
        k = self.k
        terms = [(s.pow(k) - 1.0).square().sum() for s in self.sigmas()]
        for vec in self.vectors:
            rows = vec.rows()
            if vec.kind == "ln_gain":
                terms.append((rows - 1.0).square().sum())
            else:  # biases, LayerNorm biases included: ‖b‖^{2k} = (‖b‖²)^k
                terms.append(rows.square().sum(-1).pow(k).sum())
        return torch.stack(terms).sum()

    def state_dict(self) -> dict[str, Any]:
        return {"u": [t.clone() for t in self.u], "v": [t.clone() for t in self.v]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.u = [t.clone().to(u.device) for t, u in zip(state["u"], self.u)]
        self.v = [t.clone().to(v.device) for t, v in zip(state["v"], self.v)]


@register("parseval")
class Parseval(Regularizer):
    """Parseval regularization (Chung, Cherif, Meger and Precup 2024, "Parseval regularization for
    continual reinforcement learning", NeurIPS, §3):

        Σ_W (w₀ / n_W)² ‖W Wᵀ − s I‖²_F

    over every weight matrix W of the network except its last (the output layer, which their
    code leaves out: only the hidden `linear_orthog` layers of `agent.py` are regularized), with
    the rows of W its n_W output units (an ensemble member's (in, out) weight is transposed, a
    conv kernel is (out, in·kh·kw)).  Biases and LayerNorm parameters are not regularized.

    Defaults from the paper and its public code (github.com/wechu/parseval_reg, agent.py and
    main.py): s = 2, the squared gain √2 of the orthogonal initialisation, so that the initial
    hidden weights of an orthogonally initialised ReLU network have zero penalty; coefficient
    λ = 1e-3 (MetaWorld, gridworld; 1e-4 on CARL) tuned at width 64 and multiplied by (64/width)²
    for other widths, which is the factor (w₀/n_W)² with w₀ = `parseval_width` (null: no factor).

    In training the gradient is added in closed form (`add_penalty_gradient`); `penalty()` is
    the same term through autograd.
    """

    def __init__(self, network: nn.Module, k: float = 2.0, s: float = 2.0, width: Optional[float] = 64.0):
        super().__init__(network, k)
        self.s = float(s)
        weights, _ = weights_and_vectors(network)
        self.weights = weights[:-1]
        self.params = [w.param for w in self.weights]
        self.scales = [1.0 if width is None else (float(width) / self._rows(w).shape[-2]) ** 2 for w in self.weights]

    @classmethod
    def build(cls, network: nn.Module, cfg: Any) -> "Parseval":
        return cls(network, k=cfg.k, s=cfg.parseval_s, width=cfg.parseval_width)

    @staticmethod
    def _rows(w: WeightMatrix, tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
        """W as (members, units, inputs): row j holds output unit j's input weights."""
        m = w.matrices(tensor)
        return m.transpose(1, 2) if w.kind == "ensemble" else m

    def _residuals(self, rows: torch.Tensor) -> torch.Tensor:
        """WWᵀ − sI per member (members, units, units)."""
        gram = rows @ rows.transpose(1, 2)
        return gram - self.s * torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)

    def penalty(self) -> torch.Tensor:
        terms = [scale * self._residuals(self._rows(w)).square().sum() for w, scale in zip(self.weights, self.scales)]
        if not terms:
            p = next(iter(self.network.parameters()), None)
            return torch.zeros((), device=None if p is None else p.device)
        return torch.stack(terms).sum()

    direct_gradient = True

    @torch.no_grad()
    def add_penalty_gradient(self, coef: float) -> None:
        """Add ∇(coef · penalty) = 4 coef (w₀/n)² (WWᵀ − sI) W to each regularized weight's `.grad`."""
        for w, scale in zip(self.weights, self.scales):
            rows = self._rows(w, w.param.detach())  # (members, units, inputs)
            if rows.shape[-2] > rows.shape[-1]:  # (WWᵀ − sI)W = W(WᵀW) − sW: the smaller Gram matrix
                grad = torch.baddbmm(rows, rows, rows.transpose(1, 2) @ rows, beta=-self.s)
            else:
                grad = self._residuals(rows) @ rows
            if w.param.grad is None:
                w.param.grad = torch.zeros_like(w.param)
            target = self._rows(w, w.param.grad)  # a view of .grad in the same layout
            target.add_(grad, alpha=4.0 * coef * scale)
        self._last_coef = coef
