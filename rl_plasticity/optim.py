"""Adam steps without `optimizer.step()`'s per-call Python work, for one optimizer or one per seed.

Shared by the agents (SAC, PPO, their seed groups) and the plasticity code (the ER step), so it
sits outside both packages.
"""
from __future__ import annotations

import torch


def _fused_adam_supported(group: dict) -> bool:
    return bool(group.get("fused")) and not (group["amsgrad"] or group["maximize"] or group.get("differentiable")
                                             or group.get("capturable") or group.get("decoupled_weight_decay")
                                             or isinstance(group["lr"], torch.Tensor))


def adam_step(optimizer: torch.optim.Optimizer) -> None:
    """`optimizer.step()` of a `torch.optim.Adam(fused=True)` without its per-call Python work.

    The same kernel (`torch._fused_adam_`) on the same state, so the result is bitwise that of
    `optimizer.step()`; which is called instead while some parameter has no state yet (the first
    step creates it) or for settings this shortcut does not cover (amsgrad, maximize, tensor lr,
    gradient scaling, differentiable).
    """
    adam_step_many([optimizer])


def adam_step_many(optimizers: list[torch.optim.Optimizer]) -> None:
    """`adam_step` of several optimizers with the same parameter groups (one per seed) at once:
    one `torch._fused_adam_` call per group over every optimizer's tensors.  Each element's
    update is that of its own optimizer's step; an optimizer without state yet (the first step
    after a reset) takes its own `optimizer.step()`, and so do all of them when a group's
    settings differ between them or are not covered."""
    ready = []
    for opt in optimizers:
        if all(opt.state.get(p) for group in opt.param_groups for p in group["params"] if p.grad is not None):
            ready.append(opt)
        else:
            opt.step()
    if not ready:
        return
    keys = ("lr", "betas", "eps", "weight_decay")
    for groups in zip(*(opt.param_groups for opt in ready)):
        if not _fused_adam_supported(groups[0]) or any(g[k] != groups[0][k] for g in groups for k in keys):
            for opt in ready:
                opt.step()
            return
    for groups in zip(*(opt.param_groups for opt in ready)):
        params = [p for g in groups for p in g["params"] if p.grad is not None]
        if not params:
            continue
        states = [opt.state[p] for opt, g in zip(ready, groups) for p in g["params"] if p.grad is not None]
        steps = [st["step"] for st in states]
        torch._foreach_add_(steps, 1)
        group = groups[0]
        beta1, beta2 = group["betas"]
        torch._fused_adam_(params, [p.grad for p in params], [st["exp_avg"] for st in states],
                           [st["exp_avg_sq"] for st in states], [], steps, amsgrad=False, lr=group["lr"],
                           beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                           maximize=False, grad_scale=None, found_inf=None)
