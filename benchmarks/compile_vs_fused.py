"""SAC update speed: the hand-written fused update against the autograd update, eager and under
torch.compile, measured in one run (issue 16: is the fused path worth keeping?).

Four agents with the same settings (the paper's networks by default: 2×256, LayerNorm, one
critic, batch 256, 16 updates per call; `plasticity=none`) on the same random batches:

- `fused`: agent.fused=true, the default (agents/fused.py);
- `autograd`: agent.fused=false, the autograd reference (`SACAgent._autograd_gradients`);
- `autograd+compile`: the same with its loss-and-backward function under torch.compile
  (inductor; dynamo breaks the graph at `backward()`, AOTAutograd compiles the forward and its
  backward), the way LeanRL compiles its updates; the Adam step and the target lerp stay as in
  the other variants (one fused kernel each);
- `fused+compile`: the package's compile=true (torch.compile of the fused update).

`--cudagraphs` (CUDA only) adds mode="reduce-overhead" to both compiled variants.  Rounds
alternate the variants (order rotated each round) so that all see the same machine load; each
variant's rate is the median over rounds, its ratio the median of per-round ratios against
`fused`.  Compilation happens before the rounds and is reported separately.  A sanity line
compares one update of each variant from the same state with the fused path's metrics.  Last
line: `autograd_compile_vs_fused <ratio>`.

    OMP_NUM_THREADS=1 python benchmarks/compile_vs_fused.py --threads 1 [--rounds 7] [--calls 4]
        [--num-critics 1] [--no-layer-norm] [--device cuda [--cudagraphs]]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

OBS, ACT = 17, 6  # cheetah-run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(variant: str, args, device: torch.device):
    from rl_plasticity.agents.sac import SACAgent, SACConfig

    torch.manual_seed(0)
    cfg = SACConfig(num_critics=args.num_critics, layer_norm=not args.no_layer_norm, batch_size=args.batch,
                    replay_ratio=16, fused=variant.startswith("fused"))
    agent = SACAgent(OBS, ACT, cfg, device, seed=0, compile=variant == "fused+compile",
                     cudagraphs=args.cudagraphs and variant == "fused+compile")
    if variant == "autograd+compile":
        mode = "reduce-overhead" if args.cudagraphs else None
        # An instance attribute: `_update_once` looks it up on every update.
        agent._autograd_gradients = torch.compile(agent._autograd_gradients, mode=mode, dynamic=False)
    return agent


def batches(n: int, args, device: torch.device):
    from rl_plasticity.buffers import Batch

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        rows = (16, args.batch)
        out.append(Batch(torch.randn(*rows, OBS, generator=g), torch.rand(*rows, ACT, generator=g) * 2 - 1,
                         torch.randn(*rows, generator=g), torch.randn(*rows, OBS, generator=g),
                         (torch.rand(*rows, generator=g) < 0.01).float()))
    return [Batch(*(t.to(device) for t in b)) for b in out]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the package's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-critics", type=int, default=1)
    p.add_argument("--no-layer-norm", action="store_true")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--cudagraphs", action="store_true", help="CUDA graphs for the compiled variants (CUDA only)")
    p.add_argument("--variants", default="fused,autograd,autograd+compile,fused+compile")
    p.add_argument("--warmup", type=int, default=3, help="calls of 16 updates per variant before timing")
    p.add_argument("--calls", type=int, default=4, help="calls of 16 updates per round and variant")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variants = args.variants.split(",")
    if "fused" not in variants:
        p.error("--variants must include fused (the ratios are against it)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"{datetime.date.today()} device {device} ({name}, {os.cpu_count()} cores), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, critics {args.num_critics}, layer norm {not args.no_layer_norm}, "
          f"batch {args.batch}, 16 updates/call, load average {os.getloadavg()[0]:.1f}")
    data = batches(args.calls, args, device)

    agents, compile_s = {}, {}
    for v in variants:
        agents[v] = build(v, args, device)
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.warmup):
            agents[v].update(data[0])
        _sync(device)
        compile_s[v] = time.perf_counter() - start

    # Sanity: one update from the same state (fresh agents) gives the same metrics as fused.
    fresh = {v: build(v, args, device) for v in variants}
    ref = fresh["fused"].update(data[0])
    for v in variants:
        if v == "fused":
            continue
        m = fresh[v].update(data[0])
        worst = max(float((m[k] - ref[k]).abs().max() / (ref[k].abs().max() + 1e-6)) for k in ref)
        print(f"  sanity {v:17s} max relative metric difference from fused after 16 updates: {worst:.1e}")
    del fresh

    def timed(agent) -> float:
        _sync(device)
        start = time.perf_counter()
        for b in data:
            metrics = agent.update(b)
        float(metrics["losses/critic"])
        return len(data) * 16 / (time.perf_counter() - start)

    rates = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            rates[v].append(timed(agents[v]))
    print(f"{'variant':18s} {'updates/s':>10s} {'ms/update':>10s} {'vs fused':>9s}  warmup (compile) s  rounds")
    ratios = {}
    for v in variants:
        med = statistics.median(rates[v])
        ratios[v] = statistics.median(a / b for a, b in zip(rates[v], rates["fused"]))
        print(f"{v:18s} {med:10.1f} {1e3 / med:10.2f} {ratios[v]:9.2f}  {compile_s[v]:18.1f}  "
              f"{', '.join(f'{x:.0f}' for x in rates[v])}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if "autograd+compile" in ratios:
        print(f"autograd_compile_vs_fused {ratios['autograd+compile']:.2f}")


if __name__ == "__main__":
    main()
