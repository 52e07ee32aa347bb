"""Many seeds in one process: aggregate SAC updates/s of N seeds batched (`num_seeds=N`) against
the same N agents updated one after the other (`batch_seeds=false`), measured in one run.

Each seed is a full `SACAgent` (paper settings unless changed: 2x256 MLPs with LayerNorm, one
critic, batch 256, replay ratio 16) with its own replay buffer of random cheetah-run-sized
transitions.  The batched side is `SACSeedGroup.update` (what `num_seeds=N` runs: one fused
forward/backward over a leading seed dimension, one Adam call, one target lerp); the peer is
each agent's own fused `update`, called in turn (N single-seed processes sharing one device,
without their process overhead).  Sides alternate for `--rounds` rounds; reported: aggregate
single-seed updates per second (seeds × updates / time), per side, and the median ratio.
Last line: `seed_batching_speedup <ratio at the largest N>`.

    python benchmarks/seed_scaling.py [--seeds 1 2 4] [--device cpu|cuda] [--compile] [--cudagraphs]
                                      [--no-layer-norm] [--rounds 5] [--calls 4]

On a GPU, `--seeds 1 5 10 20 --compile --cudagraphs` gives the issue's N-seed table.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

OBS, ACT = 17, 6  # cheetah-run
SIDE_ORDER = ("batched", "separate")  # build order of the two sides


def build(n: int, args, device: torch.device):
    from rl_plasticity.agents.sac import SACAgent, SACConfig
    from rl_plasticity.agents.seeds import SACSeedGroup, SeedRNG
    from rl_plasticity.buffers import ReplayBuffer

    cfg = SACConfig(layer_norm=not args.no_layer_norm, num_critics=args.num_critics, batch_size=256, replay_ratio=16)
    sides = {}
    for side in SIDE_ORDER:
        agents, rngs, buffers = [], [], []
        for s in range(n):
            torch.manual_seed(s)
            agents.append(SACAgent(OBS, ACT, cfg, device, seed=s, compile=args.compile, cudagraphs=args.cudagraphs))
            rngs.append(SeedRNG())
            buf = ReplayBuffer(OBS, ACT, args.fill, device, seed=s)
            g = torch.Generator().manual_seed(s)
            obs = torch.randn(args.fill + 1, OBS, generator=g).numpy()
            act = (torch.rand(args.fill, ACT, generator=g) * 2 - 1).numpy()
            rew = torch.randn(args.fill, generator=g).numpy()
            for t in range(args.fill):
                buf.add(obs[t], act[t], float(rew[t]), obs[t + 1], False)
            buffers.append(buf)
        if side == "batched":
            group = SACSeedGroup(agents, rngs)

            def step(group=group, buffers=buffers):
                return group.update([b.sample(16, 256) for b in buffers])[-1]
        else:
            def step(agents=agents, buffers=buffers):
                m = None
                for a, b in zip(agents, buffers):
                    m = a.update(b.sample(16, 256))
                return m
        sides[side] = step

    def timed(step, calls: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            metrics = step()
        float(metrics["losses/critic"])  # one host sync at the end, as at log time
        return n * calls * 16 / (time.perf_counter() - start)

    return sides, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-critics", type=int, default=1)
    parser.add_argument("--no-layer-norm", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cudagraphs", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=4, help="calls of 16 updates per round and side")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--fill", type=int, default=5000)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"LayerNorm {not args.no_layer_norm}, critics {args.num_critics}, compile {args.compile}, "
          f"cudagraphs {args.cudagraphs}")
    print(f"{'seeds':>5} | {'batched upd/s':>13} | {'separate upd/s':>14} | ratio (median of rounds)")
    ratio = float("nan")
    for n in args.seeds:
        sides, timed = build(n, args, device)
        for side in sides.values():
            timed(side, args.warmup)
        rates = {"batched": [], "separate": []}
        for _ in range(args.rounds):
            for key in ("batched", "separate"):
                rates[key].append(timed(sides[key], args.calls))
        ratios = [b / s for b, s in zip(rates["batched"], rates["separate"])]
        ratio = statistics.median(ratios)
        print(f"{n:>5} | {statistics.median(rates['batched']):>13.0f} | {statistics.median(rates['separate']):>14.0f} | "
              f"{ratio:.2f} ({min(ratios):.2f}-{max(ratios):.2f})", flush=True)
    print(f"seed_batching_speedup {ratio:.3f}")


if __name__ == "__main__":
    main()
