"""The effective rank of hidden features and the effective-rank (ER) step of L2-ER.

spectral-collapse-l2-er.md §7 and App. D.1/D.2 (Algorithm 1): ER(F) = exp(H(p)), p = σ/Σσ over the
singular values σ of a (rows, width) feature matrix F (Roy & Vetterli 2007); the ER step takes one
step of a separate optimizer (step size β = `er_lr`) on L_erank = −mean over hidden layers of
ER(F_ℓ).

Two routes to the same number:

- `effective_rank`: singular values by `torch.linalg.svdvals` (autograd through the SVD).  The
  definition, used by the diagnostics and kept as the reference of the tests.
- `gram_effective_rank`: the route the ER step takes.  σ² are the eigenvalues of the smaller Gram
  matrix (FFᵀ when rows ≤ width, else FᵀF), formed and diagonalised in float64 by one batched
  `torch.linalg.eigh` over every layer (and network) of the same shape; the gradient is written
  out: ∂L/∂F = U diag(g) Vᵀ with g = ∂L/∂σ, the gradient of an SVD's singular values, computed as
  U diag(g/σ) Uᵀ F (V = FᵀU diag(1/σ)).  In float64 the Gram's eigenvalues carry an absolute
  error of about rows·ε₆₄·σ₁², so σ to about 1e-7·σ₁: the accuracy of a float32 SVD, hence the
  same value and gradient to float32 tolerance (tests/test_effective_rank.py compares both with
  the svdvals reference, dead units included).  Singular values below `_RANK_TOL`·σ₁ are noise in
  either route; there the objective is not differentiable (σ = 0 is a kink) and svdvals' gradient
  is g_i u_i v_iᵀ along whatever null-space basis LAPACK returns; this route leaves those
  components out (it only differs from the reference in directions orthogonal to the column and
  row spaces of F, the tests check that too).  On rank-deficient features (more dead units than
  rows) that left-out component is large, since g_i grows like −log p_i: in the tests it is a
  hundred times the well-defined part of svdvals' gradient.

The ER step (`PlasticityMixin.effective_rank_step`) runs on a block of `er_batch` input rows at
the current parameters, every `er_step` updates.  App. D.1 describes er_batch as a number of
*steps* whose features are stacked (Algorithm 1's buffer of capacity U); the package's block of
rows is an interpretation kept from before (issue 19 changed the speed, not the objective).
"""
from __future__ import annotations

import torch

_EPS = 1e-12
_RANK_TOL = 1e-7  # singular values below _RANK_TOL · σ₁ count as zero (float64 Gram route)


def effective_rank_of_singular_values(s: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """exp(H(p)), p = s/Σs, over the last dimension of `s` (the formula of App. D.1)."""
    p = s / s.sum(-1, keepdim=True).clamp_min(eps)
    entropy = -(p * torch.log(p.clamp_min(eps))).sum(-1)
    return entropy.exp()


def effective_rank(features: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """exp(H(p)) with p = σ/Σσ over the singular values of each (batch, width) feature matrix.

    `features` is (batch, width) or (members, batch, width); returns a scalar or (members,).
    Differentiable (torch.linalg.svdvals).
    """
    return effective_rank_of_singular_values(torch.linalg.svdvals(features), eps)


class _GramEffectiveRank(torch.autograd.Function):
    """ER of each matrix of a (L, rows, width) stack through the float64 Gram eigenvalues."""

    @staticmethod
    def forward(ctx, features: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        f = features.detach().double()
        tall = f.shape[-2] > f.shape[-1]
        gram = f.mT @ f if tall else f @ f.mT
        lam, vecs = torch.linalg.eigh(gram)  # ascending
        lam = lam.clamp_min(0.0)
        zero = lam <= (_RANK_TOL ** 2) * lam[..., -1:]
        s = torch.where(zero, 0.0, lam.sqrt())
        with torch.enable_grad():
            s_leaf = s.requires_grad_()
            er = effective_rank_of_singular_values(s_leaf)
            (g,) = torch.autograd.grad(er.sum(), s_leaf)
        # g/σ per singular value; components of σ ≈ 0 left out (see the module docstring).
        ctx.save_for_backward(f, vecs, torch.where(zero, 0.0, g / torch.where(zero, 1.0, s)))
        ctx.tall, ctx.dtype = tall, features.dtype
        return er.detach().to(features.dtype)

    @staticmethod
    def backward(ctx, grad_er: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        f, vecs, g_over_s = ctx.saved_tensors
        # ∂L/∂Gram = W diag(c/2) Wᵀ (W: the Gram's eigenvectors, c = g/σ), then through FFᵀ or FᵀF:
        # U diag(g/σ) Uᵀ F = U diag(g) Vᵀ (wide) or F V diag(g/σ) Vᵀ = U diag(g) Vᵀ (tall).
        gram_grad = (vecs * (grad_er.double().unsqueeze(-1) * g_over_s).unsqueeze(-2)) @ vecs.mT
        grad = f @ gram_grad if ctx.tall else gram_grad @ f
        return grad.to(ctx.dtype)


def gram_effective_rank(features: torch.Tensor) -> torch.Tensor:
    """`effective_rank` of each matrix of a (L, rows, width) stack (or one matrix) through the
    float64 Gram route (module docstring): the same value and gradient to float32 tolerance."""
    if features.dim() == 2:
        return _GramEffectiveRank.apply(features.unsqueeze(0))[0]
    return _GramEffectiveRank.apply(features)


def layer_effective_ranks(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """`gram_effective_rank` of each (members, rows, width) matrix stack in `features`, with one
    batched call for all stacks of the same (rows, width); returns (members,) per entry."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, f in enumerate(features):
        by_shape.setdefault(tuple(f.shape[1:]), []).append(i)
    out: list[torch.Tensor] = [features[0]] * len(features)
    for index in by_shape.values():
        stack = features[index[0]] if len(index) == 1 else torch.cat([features[i] for i in index])
        ranks = gram_effective_rank(stack).split([features[i].shape[0] for i in index])
        for i, r in zip(index, ranks):
            out[i] = r
    return out
