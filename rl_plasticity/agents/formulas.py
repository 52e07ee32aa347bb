"""The SAC and PPO formulas, each written once, as pure functions of tensors.

Used by the autograd reference (networks.py, sac.py, ppo.py, their curvature losses), the
hand-written fused SAC update (fused.py) and the seed groups (seeds.py, which run fused.py and
ppo.py's loss).  Where fused.py needs a formula's derivative, the derivative is written right
after the formula (`*_backward`), with its derivation, so the two cannot drift apart.

Haarnoja et al. 2018a: "Soft Actor-Critic: Off-Policy Maximum Entropy Deep Reinforcement Learning
with a Stochastic Actor"; 2018b: "Soft Actor-Critic Algorithms and Applications".

Every function works on any leading dimensions (critic members, seeds); rows are the
second-to-last dimension of actions and the last of per-row scalars.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
LOG_2 = math.log(2.0)


# -- Gaussian policies ------------------------------------------------------------------------
def gaussian_log_prob(z: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(x; μ, σ) summed over the action dimension, from z = (x − μ)/σ and log σ:
    Σ_i (−½ z_i² − log σ_i − ½ log 2π).  PPO's policy (Schulman et al. 2017, §5) and the
    Gaussian under SAC's tanh (Haarnoja et al. 2018a, App. C)."""
    return (-0.5 * z.square() - log_std - HALF_LOG_2PI).sum(-1)


def squash_log_std(raw: torch.Tensor, log_std_min: float, log_std_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log σ = lo + ½(hi − lo)(tanh(raw) + 1): the actor's raw output mapped smoothly into
    [log_std_min, log_std_max] (the bound of Yarats & Kostrikov's SAC implementation, which DrQ
    builds on; SAC's papers leave σ unbounded).  Returns (log σ, t = tanh(raw)); t is what
    `squash_log_std_backward` needs."""
    t = torch.tanh(raw)
    return torch.add(t, 1.0).mul_(0.5 * (log_std_max - log_std_min)).add_(log_std_min), t


def squash_log_std_backward(d_log_std: torch.Tensor, t: torch.Tensor, log_std_min: float,
                            log_std_max: float) -> torch.Tensor:
    """d/d raw from d/d log σ (overwrites `d_log_std`): d log σ/d raw = ½(hi − lo)(1 − tanh²(raw))."""
    return d_log_std.mul_((1.0 - t.square()).mul_(0.5 * (log_std_max - log_std_min)))


def tanh_gaussian_sample(mean: torch.Tensor, log_std: torch.Tensor,
                         noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAC's reparameterised squashed-Gaussian action a = tanh(u), u = μ + σ ε (Haarnoja et al.
    2018a, §4.2 Eq. 11 and App. C), and its log-probability (App. C, Eq. 21)

        log π(a|s) = log N(u; μ, σ) − Σ_i log(1 − tanh²(u_i)),

    with log(1 − tanh²(u)) = 2(log 2 − u − softplus(−2u)), which stays finite where tanh(u)
    rounds to ±1.  `noise` ε is standard normal, shaped like `mean`.  Returns (a, log π, σ); σ is
    what `tanh_gaussian_backward` needs."""
    std = log_std.exp()
    u = torch.addcmul(mean, std, noise)
    log_prob = gaussian_log_prob(noise, log_std)
    log_prob = log_prob - (2.0 * (LOG_2 - u - F.softplus(-2.0 * u))).sum(-1)
    return torch.tanh(u), log_prob, std


def tanh_gaussian_backward(d_action: torch.Tensor, d_log_prob: torch.Tensor, action: torch.Tensor,
                           std: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients at μ and log σ of a loss L(a, log π) through `tanh_gaussian_sample`, the
    noise ε held fixed (the reparameterisation), given g_a = ∂L/∂a (rows, |A|) and
    g_π = ∂L/∂log π (broadcast over a row's action entries).

    With a = tanh(u), u = μ + σε, σ = exp(log σ) and
    log π = Σ_i(−½ε_i² − log σ_i − ½ log 2π) − Σ_i log(1 − a_i²):

        ∂a/∂u = 1 − a²,  ∂log π/∂u = −∂log(1 − a²)/∂u = 2a   (log π reads u only through a),
        ∂u/∂μ = 1,       ∂u/∂log σ = σε,   and log π reads log σ directly with slope −1, so

        g_u     = g_a (1 − a²) + 2a g_π            (= ∂L/∂μ)
        g_log σ = g_u σ ε − g_π.

    Returns (g_μ, g_log σ)."""
    du = torch.addcmul(d_action * (1.0 - action.square()), action, 2.0 * d_log_prob.expand_as(action))
    return du, torch.sub(du * std * noise, d_log_prob)


# -- SAC's losses ---------------------------------------------------------------------------
def min_over_critics(q: torch.Tensor) -> torch.Tensor:
    """Clipped double-Q (Fujimoto et al. 2018, §4.2, Eq. 10): the minimum over the critic
    dimension, q (..., critics, rows) -> (..., rows); a plain view for one critic."""
    return q[..., 0, :] if q.shape[-2] == 1 else q.min(-2).values


def soft_td_target(reward: torch.Tensor, terminated: torch.Tensor, next_q: torch.Tensor,
                   next_log_prob: torch.Tensor, alpha: torch.Tensor | float, gamma: float) -> torch.Tensor:
    """The soft Bellman target (Haarnoja et al. 2018b, §4.2: the soft Q-function's target with the
    soft value V(s') = Q(s', a') − α log π(a'|s')):  r + γ (1 − terminated) (Q̄(s', a') − α log π(a'|s')),
    a' ~ π(·|s'), Q̄ the target critics' `min_over_critics`.  Only a true termination stops
    bootstrapping; a time-limit truncation is stored as terminated = 0."""
    return reward + gamma * (1.0 - terminated) * (next_q - alpha * next_log_prob)


def critic_td_loss(q: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over critics of the mean squared TD error (Haarnoja et al. 2018b, §4.2, the soft Bellman
    residual without its ½): q (..., critics, rows), target (..., rows).  Returns (loss, q − target); the
    loss's gradient at q is 2(q − target)/rows."""
    diff = q - target.unsqueeze(-2)
    return diff.square().mean(-1).sum(-1), diff


def actor_loss(alpha: torch.Tensor, log_prob: torch.Tensor, q_pi: torch.Tensor) -> torch.Tensor:
    """E[α log π(ã|s) − Q(s, ã)], ã = tanh(μ + σε) (Haarnoja et al. 2018b, §4.2, the policy
    objective), mean over rows; `q_pi` the `min_over_critics` of the critics read through fixed
    parameters."""
    return (alpha * log_prob - q_pi).mean(-1)


def temperature_loss(log_alpha: torch.Tensor, log_prob: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """−E[log α (log π(ã|s) + H̄)] (Haarnoja et al. 2018b, §5, the temperature objective,
    with log α as the trained variable, as their implementation does); `log_prob` detached."""
    return -(log_alpha * (log_prob + target_entropy)).mean(-1)


def temperature_loss_backward(log_prob: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """∂ `temperature_loss` / ∂ log α = −E[log π(ã|s) + H̄]."""
    return -(log_prob + target_entropy).mean(-1)


# -- PPO --------------------------------------------------------------------------------------
def normalize_advantages(advantage: torch.Tensor) -> torch.Tensor:
    """(A − mean A)/(std A + 1e-8) over the rows (last dimension): PPO's per-minibatch
    normalisation (as in OpenAI baselines' PPO2, the reference implementation of Schulman et al. 2017)."""
    return (advantage - advantage.mean(-1, keepdim=True)) / (advantage.std(-1, keepdim=True) + 1e-8)


def gaussian_sample(mean: torch.Tensor, log_std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """a = μ + σ ε with σ = exp(log σ), ε ~ N(0, I): PPO's diagonal-Gaussian policy (Schulman et
    al. 2017, §6.1: state-independent log σ); `gaussian_log_prob(noise, log_std)` is its log π."""
    return mean + log_std.exp() * noise


def value_loss(value: torch.Tensor, ret: torch.Tensor) -> torch.Tensor:
    """½ (V(s) − R)² per row: PPO's value loss (Schulman et al. 2017, §5, L^VF as a squared error)."""
    return 0.5 * (value - ret).square()


def clipped_surrogate(advantage: torch.Tensor, ratio: torch.Tensor, clip: float) -> torch.Tensor:
    """PPO's clipped objective per row, as a loss (Schulman et al. 2017, §3 Eq. 7):
    −min(r A, clip(r, 1 − ε, 1 + ε) A) = max(−A r, −A clip(r, 1 − ε, 1 + ε))."""
    return torch.max(-advantage * ratio, -advantage * ratio.clamp(1.0 - clip, 1.0 + clip))
