"""SAC updates per second with 1 and with N torch threads, alternating in one process.

Torch's intra-op threads spin while they wait for each other, so when other processes hold the
cores, more threads can be many times slower than one.  This measures the ratio on this machine
as it is now (idle or busy): rounds of `--calls` calls of 16 updates (2x256 LayerNorm, batch 256,
one critic, the defaults), alternating 1 thread and `--threads N`; prints the median updates/s of
each and the median per-round ratio.  Start it beside your other work to see what sharing does.

    python benchmarks/threads.py [--threads 2] [--rounds 7] [--calls 10]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch


def main() -> None:
    from rl_plasticity.agents.sac import SACAgent, SACConfig
    from rl_plasticity.buffers import ReplayBuffer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="the thread count compared with 1")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=10, help="calls of 16 updates per round and side")
    args = p.parse_args()
    obs_dim, act_dim = 17, 6  # cheetah-run's sizes
    agent = SACAgent(obs_dim, act_dim, SACConfig(batch_size=256, replay_ratio=16), "cpu")
    buffer = ReplayBuffer(obs_dim, act_dim, 20_000, "cpu", seed=0)
    rng = np.random.default_rng(0)
    obs = rng.standard_normal(obs_dim).astype(np.float32)
    for _ in range(20_000):
        nxt = rng.standard_normal(obs_dim).astype(np.float32)
        buffer.add(obs, rng.uniform(-1, 1, act_dim).astype(np.float32), 0.1, nxt, False)
        obs = nxt
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}", flush=True)
    rates: dict[int, list[float]] = {1: [], args.threads: []}
    for _ in range(args.rounds):
        for threads in rates:
            torch.set_num_threads(threads)
            agent.update(buffer.sample(16, 256))  # settle the thread pool
            start = time.perf_counter()
            for _ in range(args.calls):
                metrics = agent.update(buffer.sample(16, 256))
            float(metrics["losses/critic"])
            rates[threads].append(16 * args.calls / (time.perf_counter() - start))
    for threads, values in rates.items():
        print(f"threads {threads}: median {statistics.median(values):.1f} updates/s "
              f"(rounds: {', '.join(f'{v:.0f}' for v in values)})")
    ratio = statistics.median([b / a for a, b in zip(rates[1], rates[args.threads])])
    print(f"ratio_{args.threads}_threads_vs_1 {ratio:.2f}")


if __name__ == "__main__":
    main()
