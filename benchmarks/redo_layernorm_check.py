"""Does a ReDo recycle revive a dormant unit of a trained LayerNorm network?  (Sokar et al. 2023,
Algorithm 1, as `rl_plasticity.plasticity.interventions.ReDo` applies it.)

Loads the newest checkpoint of a SAC run (its replay buffer included: `checkpoint.save_replay`,
the default), scores every hidden unit on 256 replay samples (s_i ≤ τ: dormant), recycles the
dormant units with the package's own surgery (`reinit_units`: fresh incoming weights, bias 0,
LayerNorm gain 1 and bias 0, outgoing weights 0), scores them again and prints how many are still
dormant, with the pre-LayerNorm statistics that decide it: LayerNorm subtracts the mean μ over the
layer's units, so a fresh unit whose pre-activation h is small against μ stays below zero.

    python benchmarks/redo_layernorm_check.py runs/reproduce/continual-dmc/redo/seed_0
"""
from __future__ import annotations

import argparse

import torch

from rl_plasticity.checkpoint import list_checkpoints, load_checkpoint
from rl_plasticity.evaluate import _build_agent
from rl_plasticity.plasticity.cbp import reinit_units
from rl_plasticity.plasticity.interventions import ReDo, _features
from rl_plasticity.plasticity.surgery import hidden_layers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--tau", type=float, default=None, help="default: the run's plasticity.redo.tau, else 0.025")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    found = list_checkpoints(f"{args.run_dir}/checkpoints")
    if not found:
        raise SystemExit(f"error: {args.run_dir}: no checkpoints in {args.run_dir}/checkpoints (a SAC run dir of train)")
    state = load_checkpoint(found[-1])
    agent = _build_agent(state, state["config"], "cpu")
    replay = state.get("replay")
    if not replay:
        raise SystemExit(f"error: {args.run_dir}: its newest checkpoint holds no replay buffer (checkpoint.save_replay=false)")
    tau = args.tau if args.tau is not None else state["config"]["plasticity"].get("redo", {}).get("tau", 0.025)
    torch.manual_seed(args.seed)
    idx = torch.randint(0, int(replay["pos"]), (256,))
    inputs = agent.plasticity_inputs((replay["obs"][idx].float(), replay["action"][idx].float()))
    print(f"{args.run_dir}: step {state['step']}, tau {tau}")
    for name, net in agent._plasticity_networks.items():
        for li, layer in enumerate(hidden_layers(net)):
            with torch.no_grad():
                dormant = (ReDo.scores(_features(net, inputs[name])[li]) <= tau)[0].nonzero().flatten()
                line = f"  {name} hidden layer {li}: {dormant.numel()} of {layer.linear_in.out_features} units dormant"
                if dormant.numel() == 0 or layer.norm is None:
                    print(line)
                    continue
                reinit_units(layer, 0, dormant, agent.plasticity_element_steps)
                pre: dict[str, torch.Tensor] = {}
                hook = layer.linear_in.register_forward_hook(lambda m, i, o: pre.__setitem__("h", o))
                feats = _features(net, inputs[name])[li][0]
                hook.remove()
            h = pre["h"].reshape(-1, pre["h"].shape[-1])
            mu, sd = h.mean(-1, keepdim=True), h.std(-1, keepdim=True)
            still = int((ReDo.scores(feats[None])[0, dormant] <= tau).sum())
            print(f"{line}; after recycling {still} still dormant, active on "
                  f"{(feats[:, dormant] > 0).float().mean():.1%} of (sample, unit) pairs; pre-LayerNorm: "
                  f"median μ/σ over samples {(mu / sd).median():.3f}, median |h|/σ of the recycled units "
                  f"{(h[:, dormant].abs() / sd).median():.3f}, of all units {(h.abs() / sd).median():.3f}")


if __name__ == "__main__":
    main()
