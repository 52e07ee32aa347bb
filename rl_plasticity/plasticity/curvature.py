"""Curvature diagnostics of one network's (unregularized) loss.

What the three papers measure when they explain loss of plasticity by curvature:

* **Empirical-Fisher Hessian rank** (directions-of-curvature.md §4, §4.1): H ≈ Ĥ = Σᵢ gᵢgᵢᵀ = GGᵀ
  from m per-sample gradients; its 99 % effective rank (srank: the fewest singular values holding
  more than 99 % of their sum) is computed from the m×m Gram matrix GᵀG (same non-zero spectrum)
  and divided by the largest possible rank min(m, P).
* **Gradient diversity** (spectral-regularization.md §3.3): the effective rank exp(H(σ/Σσ)) (Roy &
  Vetterli 2007) and the condition number σ₁/σ_min(m,P) of the per-example gradient matrix G.
* **ε-Hessian rank and the Hessian eigenvalue density** (spectral-collapse-l2-er.md §5, App. F.1):
  stochastic Lanczos quadrature (Ghorbani et al. 2019) on exact Hessian-vector products gives
  nodes ℓⱼ and weights ωⱼ per probe vector v ~ N(0, I/P); the density is ψ_σ(u) ≈ mean_v Σⱼ ωⱼ
  N(u; ℓⱼ, σ²) and the normalised ε-rank #{i : |λᵢ| > ε}/P ≈ mean_v Σⱼ ωⱼ 1[|ℓⱼ| > ε] (the paper
  normalises by the number of eigenvalues P and uses ε = 0.1).
* **Sharpness**: the largest Hessian eigenvalue (the largest Ritz value; Lanczos converges to the
  extremes first).
* **Gradient–Hessian overlap** gᵀHg / (‖g‖ ‖Hg‖) (directions-of-curvature.md §6.2), both with the
  full Hessian and with the paper's top-subspace convention (footnote 6: eigenvalues below the
  Hessian's 99 % effective rank zeroed, i.e. H replaced by H_k, k = srank₉₉(|λ|)).  Both come from
  a Lanczos run started at g: its Ritz values θⱼ and weights ωⱼ = (e₁ᵀyⱼ)² are g's spectral measure,
  so gᵀH_kg/(‖g‖‖H_kg‖) = Σ_top θⱼωⱼ / (Σ_top θⱼ²ωⱼ)^½ (exact for the full H after two steps; for
  H_k exact when the run resolves H's distinct eigenvalues, otherwise an approximation).  The
  threshold k is estimated from the SLQ spectrum (multiplicities P·ωⱼ).

Implementation: PyTorch's own `torch.func` (`vmap(grad(...))` for per-sample gradients,
forward-over-reverse `jvp(grad(...))` for Hessian-vector products, `functional_call` to evaluate
the registered module at given parameters).  It is maintained with PyTorch, handles the package's
ensemble layers and LayerNorm without special cases, and adds no dependency; curvature libraries
(BackPACK, curvlinops, PyHessian) either support only nn.Sequential of known layers or reimplement
the same two primitives.  The Lanczos recurrence (with full re-orthogonalisation, in float64) is
the few lines below.

A loss is given as `loss(forward, data) -> (n,)` per-sample losses, where `forward(x)` evaluates
the network at the parameters being differentiated and every tensor in `data` has the sample
dimension first; the network's loss is their mean.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Optional

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

PerSampleLoss = Callable[[Callable[[torch.Tensor], torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor]


def srank(values: torch.Tensor, threshold: float = 0.99) -> int:
    """min{k : Σ_{i≤k} σᵢ / Σᵢ σᵢ > threshold} over `values` sorted in decreasing order
    (directions-of-curvature.md §4; Kumar et al. 2021); 0 when all are zero."""
    v = values.detach().abs().double().flatten().sort(descending=True).values
    total = v.sum()
    if total <= 0:
        return 0
    return int((v.cumsum(0) / total <= threshold).sum().item()) + 1 if v.numel() else 0


def entropy_rank(values: torch.Tensor) -> float:
    """exp of the entropy of σ/Σσ (Roy & Vetterli 2007), as in spectral-regularization.md §3.3."""
    v = values.detach().abs().double().flatten()
    total = v.sum()
    if total <= 0:
        return 0.0
    p = v / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


# -- the network as a function of a flat parameter vector -------------------------------------
class FlatProblem:
    """A module's loss on `data` as a function of its trainable parameters, flattened."""

    def __init__(self, module: nn.Module, loss: PerSampleLoss, data: Mapping[str, torch.Tensor]):
        self.module, self.loss, self.data = module, loss, dict(data)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in named])
        self.buffers = {n: b.detach() for n, b in module.named_buffers()}
        self.n = next(iter(self.data.values())).shape[0]

    @property
    def dim(self) -> int:
        return self.theta.numel()

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, theta.split(self.numels), self.shapes)}

    def forward_at(self, theta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        params = {**self.unflatten(theta), **self.buffers}
        return lambda x: functional_call(self.module, params, (x,))

    def mean_loss(self, theta: torch.Tensor, data: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
        return self.loss(self.forward_at(theta), self.data if data is None else data).mean()

    def gradient(self) -> torch.Tensor:
        return grad(self.mean_loss)(self.theta)

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H v, exactly (forward-over-reverse: the directional derivative of the gradient)."""
        return jvp(grad(self.mean_loss), (self.theta,), (v.to(self.theta.dtype),))[1]

    def per_sample_gradients(self, m: int) -> torch.Tensor:
        """G with rows gᵢ = ∇θ ℓ(θ; xᵢ) of the first `m` samples: (m, P)."""
        data = {k: v[:m] for k, v in self.data.items()}

        def one(theta, sample):
            return self.mean_loss(theta, {k: t.unsqueeze(0) for k, t in sample.items()})

        return vmap(grad(one), in_dims=(None, 0), randomness="error")(self.theta, data)

    def hessian(self) -> torch.Tensor:
        """The exact P×P Hessian (torch.func.hessian): for tests and tiny networks only."""
        return torch.func.hessian(self.mean_loss)(self.theta)


# -- per-sample gradient statistics -----------------------------------------------------------
def fisher_rank(G: torch.Tensor, threshold: float = 0.99) -> tuple[int, float]:
    """srank₉₉ of the empirical Fisher Σᵢ gᵢgᵢᵀ (P×P) of the rows gᵢ of `G` (m, P), computed from
    the m×m Gram matrix G Gᵀ (same non-zero eigenvalues), and that rank divided by min(m, P)
    (directions-of-curvature.md §4.1)."""
    gram = (G.double() @ G.double().T)
    eig = torch.linalg.eigvalsh(gram).clamp_min(0.0)
    rank = srank(eig, threshold)
    return rank, rank / min(G.shape)


def gradient_diversity(G: torch.Tensor) -> tuple[float, float]:
    """(effective rank, condition number σ₁/σ_min(m,P)) of the per-example gradient matrix
    (spectral-regularization.md §3.3); the condition number is inf when G is rank-deficient."""
    s = torch.linalg.svdvals(G.double())
    smallest = float(s[-1])
    cond = float(s[0]) / smallest if smallest > 1e-12 * max(float(s[0]), 1e-300) else math.inf
    return entropy_rank(s), cond


# -- Lanczos --------------------------------------------------------------------------------
def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, steps: int,
            tol: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """`steps` Lanczos iterations from v0 with full re-orthogonalisation (float64).

    Returns the Ritz values θⱼ and their weights ωⱼ = (e₁ᵀyⱼ)² (the Gauss quadrature of v0's
    spectral measure, Σ ωⱼ = 1).  Stops early when the Krylov space becomes invariant.
    """
    dtype = v0.dtype
    q = (v0 / v0.norm()).double()
    Q = [q]
    alphas, betas = [], []
    scale = 0.0
    for j in range(min(steps, v0.numel())):
        w = matvec(Q[-1].to(dtype)).double()
        alpha = torch.dot(w, Q[-1])
        alphas.append(alpha)
        basis = torch.stack(Q)
        for _ in range(2):  # full re-orthogonalisation, twice is enough
            w = w - basis.T @ (basis @ w)
        beta = w.norm()
        scale = max(scale, float(alpha.abs()), float(beta))
        if j == steps - 1 or j == v0.numel() - 1 or float(beta) <= tol * max(scale, 1e-300):
            break
        betas.append(beta)
        Q.append(w / beta)
    k = len(alphas)
    T = torch.diag(torch.stack(alphas))
    if k > 1:
        b = torch.stack(betas[: k - 1])
        T = T + torch.diag(b, 1) + torch.diag(b, -1)
    theta, Y = torch.linalg.eigh(T)
    return theta, Y[0].square()


@dataclasses.dataclass
class Spectrum:
    """SLQ estimate of a Hessian's spectrum: per probe vector, Ritz values and weights."""

    nodes: list[torch.Tensor]
    weights: list[torch.Tensor]
    dim: int

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All nodes, and weights normalised to sum to 1 over all probe vectors."""
        return torch.cat(self.nodes), torch.cat(self.weights) / len(self.weights)

    def epsilon_rank(self, epsilon: float) -> float:
        """Normalised ε-rank: the estimate of #{i : |λᵢ| > ε} / P (spectral-collapse-l2-er.md §5)."""
        nodes, weights = self.flat()
        return float(weights[nodes.abs() > epsilon].sum())

    def density(self, grid: torch.Tensor, sigma: float) -> torch.Tensor:
        """ψ_σ(u) on `grid` (App. F.1's Gaussian relaxation of the eigenvalue density)."""
        nodes, weights = self.flat()
        z = (grid.double()[:, None] - nodes[None, :]) / sigma
        return (weights[None, :] * torch.exp(-0.5 * z.square())).sum(1) / (sigma * math.sqrt(2 * math.pi))

    def top_threshold(self, threshold: float = 0.99) -> float:
        """|λ| of the k-th largest |eigenvalue|, k = srank₉₉(|λ|), from the estimated spectrum
        (each node stands for P·ω eigenvalues): eigenvalues below it are what
        directions-of-curvature.md §6.2 footnote 6 zeroes out."""
        nodes, weights = self.flat()
        mag = nodes.abs()
        order = mag.argsort(descending=True)
        mass = (mag * weights)[order]
        total = mass.sum()
        if total <= 0:
            return math.inf
        cum = mass.cumsum(0) / total
        k = int((cum <= threshold).sum()) + 1
        return float(mag[order][min(k, len(order)) - 1])


def slq(matvec: Callable[[torch.Tensor], torch.Tensor], dim: int, steps: int, vectors: int,
        generator: torch.Generator, device: torch.device | str = "cpu", dtype=torch.float32) -> Spectrum:
    """Stochastic Lanczos quadrature with `vectors` Gaussian probe vectors drawn from `generator`."""
    nodes, weights = [], []
    for _ in range(vectors):
        v = torch.randn(dim, generator=generator, device=generator.device).to(device=device, dtype=dtype)
        theta, w = lanczos(matvec, v, steps)
        nodes.append(theta)
        weights.append(w)
    return Spectrum(nodes, weights, dim)


def overlap_from_measure(theta: torch.Tensor, omega: torch.Tensor, cut: float = 0.0) -> float:
    """gᵀH'g / (‖g‖‖H'g‖) from g's spectral measure (θⱼ, ωⱼ), H' keeping |θ| ≥ `cut`."""
    keep = theta.abs() >= cut
    num = (theta[keep] * omega[keep]).sum()
    den = (theta[keep].square() * omega[keep]).sum().sqrt()
    return float(num / den) if float(den) > 0 else 0.0


@dataclasses.dataclass
class CurvatureSettings:
    samples: int = 64          # m per-sample gradients (empirical Fisher, gradient diversity)
    lanczos_steps: int = 32
    lanczos_vectors: int = 1
    epsilon: float = 0.1       # ε of the ε-rank (spectral-collapse-l2-er.md, Fig. 2: 0.1)
    threshold: float = 0.99    # srank threshold


def curvature_diagnostics(module: nn.Module, loss: PerSampleLoss, data: Mapping[str, torch.Tensor],
                          settings: CurvatureSettings, generator: torch.Generator
                          ) -> tuple[dict[str, float], Spectrum]:
    """Every curvature metric of `module`'s loss on `data` (see the module docstring), and the SLQ
    spectrum (for the eigenvalue density).  Metric names are those of the `curvature/<net>/` tags."""
    problem = FlatProblem(module, loss, data)
    out: dict[str, float] = {}
    m = min(settings.samples, problem.n)
    G = problem.per_sample_gradients(m)
    rank, normalised = fisher_rank(G, settings.threshold)
    out["fisher_rank"] = normalised
    out["fisher_rank_count"] = float(rank)
    out["grad_erank"], out["grad_condition"] = gradient_diversity(G)
    del G
    spectrum = slq(problem.hvp, problem.dim, settings.lanczos_steps, settings.lanczos_vectors, generator,
                   problem.theta.device, problem.theta.dtype)
    nodes, _ = spectrum.flat()
    out["epsilon_rank"] = spectrum.epsilon_rank(settings.epsilon)
    out["sharpness"] = float(nodes.max())
    out["lambda_min"] = float(nodes.min())
    g = problem.gradient()
    out["grad_norm"] = float(g.norm())
    if float(g.norm()) > 0:
        theta, omega = lanczos(problem.hvp, g, settings.lanczos_steps)
        out["overlap"] = overlap_from_measure(theta, omega)
        # Ritz values of the two runs approximate the same eigenvalue to a few digits: a small slack
        # keeps the eigenvalue at the cut itself.
        cut = spectrum.top_threshold(settings.threshold) * (1.0 - 1e-3)
        out["overlap_top"] = overlap_from_measure(theta, omega, cut)
    else:
        out["overlap"] = out["overlap_top"] = 0.0
    return out, spectrum


def density_histogram(spectrum: Spectrum, bins: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """ψ_σ on `bins` buckets over the estimated support (σ = range/bins), as (right bucket limits,
    probability mass per bucket): what the loops write as a TensorBoard histogram for the report."""
    nodes, _ = spectrum.flat()
    lo, hi = float(nodes.min()), float(nodes.max())
    width = max(hi - lo, 1e-12)
    sigma = width / bins
    edges = torch.linspace(lo - 3 * sigma, hi + 3 * sigma, bins + 1, dtype=torch.float64)
    centres = 0.5 * (edges[1:] + edges[:-1])
    mass = spectrum.density(centres, sigma) * (edges[1] - edges[0])
    return edges[1:], mass
