"""Continual backprop (Dohare et al. 2024, "Loss of plasticity in deep continual learning",
Nature; Methods "Continual backpropagation"; their public code, github.com/shibhansh/loss-of-plasticity,
`lop/algos/gnt.py` with `lop/utils/AdamGnT.py`, is the reference).

Generate-and-test on the hidden units of one network.  After every gradient update, per hidden
unit j of every hidden layer, with decay η:

    u_j ← η u_j + (1 − η) · mean_batch |h_j| · mean_k |w_jk|      (contribution utility)
    f_j ← η f_j + (1 − η) · mean_batch h_j                          (mean activation)
    age_j ← age_j + 1

both bias-corrected by 1 − η^age_j.  Among the *mature* units (age > maturity threshold) a
fraction `replacement_rate` per update is replaced (accumulated across updates, so fractional
rates work: their `accumulate=True` mode), the lowest corrected utility first:

- the unit's contribution is moved into the next layer's bias, b_k ← b_k + w_jk · f_j / (1 − η^age_j),
  then its outgoing weights w_jk are zeroed.  The next layer's pre-activation therefore keeps its
  mean over the data the averages saw: unchanged exactly on the batch mean when that is the data
  the running mean was taken over, and per sample when h_j is constant over the batch;
  the per-sample deviation h_j − f̂_j of the old unit is what is lost;
- input weights re-drawn from the layer's initial distribution, input bias zeroed; a LayerNorm
  between the linear layer and the ReLU gets its gain and bias for that unit reset to 1 and 0;
- utility, mean activation and age reset to 0;
- the optimizer's moments of all those entries (input weights and bias, LayerNorm entries,
  outgoing weights) cleared and their Adam step count restarted per element, as AdamGnT does
  (`surgery.AdamElementSteps`), so a replaced weight's first updates are those of a fresh Adam.

One difference from the reference code, on purpose: `gnt.py` zeroes f_j in `test_features`
before `gen_new_features` reads it, so its bias transfer adds 0; the transfer here uses f_j as
the paper's code intends (the line that computes it).  Defaults (Table 8 of
spectral-collapse-l2-er.md; Dohare et al.'s Slippery-Ant config `lop/rl/cfg/sant/cbp.yml`):
replacement rate 1e-4, maturity 1e4, decay 0.99.

The data: h is the hidden features (post-ReLU outputs) of the update's own training forward,
taken before the optimizer step, as in Dohare et al.'s code (repository HEAD 63c35f3):
`lop/algos/rl/ppo.py` `PPO.learn` runs the minibatch's policy forward with
`self.pol.logp_dist(os[ind], acts[ind], to_log_features=True)` (line 129) and its value forward
with `self.vf.value(os[ind], to_log_features=True)` (line 139), steps the optimizer
(`self.opt.step()`, line 147), then calls `self.pol_gnt.gen_and_test(features=
self.pol.get_activations()+[None])` and `self.val_gnt.gen_and_test(features=
self.vf.get_activations()+[None])` (lines 155, 161); `get_activations` returns the outputs the
forward hooks stored during that forward (`lop/nets/policies.py` `setup_feature_logging`, lines
65-82; `lop/nets/valuefs.py` lines 36-50), so the utilities see the pre-step features of the
update's minibatch, not a second forward after the step.  Their supervised learner does the same
(`lop/algos/cbp.py` `ContinualBackprop.learn`, lines 68-80).  Here: PPO (agents/ppo.py and the
seed group) records the policy's and value network's forward of the minibatch, whatever rows
the effective-rank step takes as its block.  Dohare et al. have no SAC; the analogue of their PPO
choice used here (agents/sac.py, the fused path and the seed groups alike) is each network's
forward in its own loss: the actor's on the batch's observations (the actor loss's), the
critic's on the batch's (observation, action) pairs (the TD loss's), not the actor loss's
critic call on (s, ã) nor the target critic's.  A Python-API host records its forward with
`PlasticityMixin.plasticity_record`; a network not recorded gets the features of a forward on the
update's inputs after the step instead (and features computed by any other route may be passed
to `ContinualBackprop.step` directly).

Works on any network whose hidden layers are Linear (or ensemble linear) → [LayerNorm] → ReLU →
Linear; ensemble members are separate layers with their own utilities.
"""
from __future__ import annotations

from typing import Any, Iterable, Union

import torch
from torch import nn

from rl_plasticity.ensemble import EnsembleLayerNorm, fresh_weight
from rl_plasticity.plasticity.surgery import (AdamElementSteps, HiddenLayer, hidden_layers, unit_rows,
                                              vector_rows)

__all__ = ["ContinualBackprop", "HiddenLayer", "hidden_layers", "reinit_units"]


@torch.no_grad()
def reinit_units(layer: HiddenLayer, member: int, units: torch.Tensor, steps: AdamElementSteps) -> None:
    """Input weights of `units` (of ensemble member `member`) re-drawn from the layer's initial
    distribution, input bias 0, LayerNorm gain 1 and bias 0, outgoing weights 0; the optimizer state
    of every one of those entries reset (moments and per-element step)."""
    fresh = unit_rows(fresh_weight(layer.linear_in), layer.ensemble)[member, units]
    layer.input_weights()[member, units] = fresh.to(layer.input_weights().dtype)
    if layer.linear_in.bias is not None:
        vector_rows(layer.linear_in.bias, layer.ensemble)[member, units] = 0.0
    if layer.norm is not None:
        ens = isinstance(layer.norm, EnsembleLayerNorm)
        if layer.norm.weight is not None:
            vector_rows(layer.norm.weight, ens)[member, units] = 1.0
        if layer.norm.bias is not None:
            vector_rows(layer.norm.bias, ens)[member, units] = 0.0
    layer.outgoing_weights()[member, units] = 0.0
    for param, view in layer.touched():
        mask = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
        view(mask)[member, units] = True
        steps.reset(param, mask)


class ContinualBackprop:
    """Utilities, mean activations, ages and the replacement counter of every hidden layer of one network."""

    def __init__(self, network: nn.Module, replacement_rate: float, maturity: int, decay: float):
        self.layers = hidden_layers(network)
        self.replacement_rate = float(replacement_rate)
        self.maturity = int(maturity)
        self.decay = float(decay)
        self.utility: list[torch.Tensor] = []
        self.mean_act: list[torch.Tensor] = []
        # Ages live on the host: they change only by +1 per step and by resets the host decides,
        # so counting the mature units never waits for the device.
        self.age: list[torch.Tensor] = []
        self.to_replace: list[torch.Tensor] = []  # accumulated fractional replacements, per member
        # Per layer, an upper bound on its units' ages (the oldest's, not lowered by replacements):
        # while it is at most the maturity no unit is eligible and the bookkeeping of
        # replacements has nothing to do (the first `maturity` updates of a run).
        self.oldest: list[int] = []
        for layer in self.layers:
            rows = layer.input_weights()
            members, width = rows.shape[0], rows.shape[1]
            self.utility.append(torch.zeros(members, width, device=rows.device))
            self.mean_act.append(torch.zeros(members, width, device=rows.device))
            self.age.append(torch.zeros(members, width, dtype=torch.long))
            self.to_replace.append(torch.zeros(members, dtype=torch.float64))
            self.oldest.append(0)
        self.replaced_total = 0

    @torch.no_grad()
    def step(self, features: list[torch.Tensor],
             optimizers: Union[AdamElementSteps, Iterable[torch.optim.Optimizer]] = ()) -> int:
        """Update utilities and mean activations from this update's hidden `features`
        (members, batch, width) per layer, age every unit, replace the due ones; returns how many
        units were replaced.  The features are the layers' ReLU outputs (h ≥ 0, so mean|h| is
        mean h, one reduction for both averages).  `optimizers`: the `AdamElementSteps` of the
        network's optimizers (or the optimizers themselves: moments cleared, step corrections
        only while that object lives)."""
        if len(features) != len(self.layers):
            raise ValueError(f"continual backprop: {len(features)} feature tensors for {len(self.layers)} hidden layers")
        steps = None
        replaced = 0
        for i, (layer, h) in enumerate(zip(self.layers, features)):
            out_w = layer.outgoing_weights()
            mean_h = h.mean(1)  # = mean |h|: ReLU outputs
            self.utility[i].mul_(self.decay).add_(mean_h * out_w.abs().mean(-1), alpha=1.0 - self.decay)
            self.mean_act[i].mul_(self.decay).add_(mean_h, alpha=1.0 - self.decay)
            self.age[i] += 1
            self.oldest[i] += 1
            if self.oldest[i] <= self.maturity:  # nobody mature: nothing to accumulate or replace
                continue
            mature = self.age[i] > self.maturity
            eligible = mature.sum(-1)
            self.to_replace[i] += self.replacement_rate * eligible.double()
            counts = self.to_replace[i].floor().long()
            if int(counts.sum()) == 0:
                continue
            self.to_replace[i] -= counts.double()
            device = self.utility[i].device
            bias = (1.0 - self.decay ** self.age[i].double()).float().clamp_min(1e-12).to(device)
            corrected = (self.utility[i] / bias).masked_fill(~mature.to(device), float("inf"))
            if steps is None:
                steps = optimizers if isinstance(optimizers, AdamElementSteps) else AdamElementSteps(optimizers)
            for member, n in enumerate(counts.tolist()):
                n = min(n, int(eligible[member]))
                if n == 0:
                    continue
                units = torch.topk(corrected[member], n, largest=False).indices
                self._replace(layer, i, member, units, bias[member, units], steps)
                replaced += n
        self.replaced_total += replaced
        return replaced

    def _replace(self, layer: HiddenLayer, i: int, member: int, units: torch.Tensor, correction: torch.Tensor,
                 steps: AdamElementSteps) -> None:
        next_bias = layer.next_bias()
        if next_bias is not None:  # the unit's mean contribution moves into the next layer's bias
            mean = self.mean_act[i][member, units] / correction
            next_bias[member] += (layer.outgoing_weights()[member, units] * mean.unsqueeze(-1)).sum(0)
        reinit_units(layer, member, units, steps)
        self.utility[i][member, units] = 0.0
        self.mean_act[i][member, units] = 0.0
        self.age[i][member, units.cpu()] = 0

    def state_dict(self) -> dict[str, Any]:
        return {"utility": [t.clone() for t in self.utility], "mean_act": [t.clone() for t in self.mean_act],
                "age": [t.clone() for t in self.age], "to_replace": [t.clone() for t in self.to_replace],
                "replaced_total": self.replaced_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Checkpoints from before the bias transfer have no mean activations: they restart at 0.
        mean_act = state.get("mean_act", [torch.zeros_like(t) for t in self.mean_act])
        for dst, src in zip(self.utility + self.mean_act + self.age + self.to_replace,
                            state["utility"] + mean_act + state["age"] + state["to_replace"]):
            dst.copy_(src)
        self.oldest = [int(a.max()) if a.numel() else 0 for a in self.age]
        self.replaced_total = int(state["replaced_total"])
