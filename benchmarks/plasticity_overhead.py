"""Cost of plasticity regularizers and diagnostics on the SAC update, measured in one run.

For each regularizer, times SAC updates (paper settings: 2x256, LayerNorm, one critic, batch
256, 16 updates per call) against `plasticity=none` in alternating rounds, and prints the added
time per update as a percentage (median of per-round ratios).  Also times one diagnostics call
on a 256-sample probe batch and reports its share at the default frequency
(`plasticity.log_every` = 16,000 updates), and one curvature measurement (plasticity/curvature.py
at the default curvature_* keys, on both networks) with the smallest `plasticity.curvature_every`
that keeps it at or under 2 % of training time.  Last line: `spectral_overhead <percent>`.

    python benchmarks/plasticity_overhead.py [--methods spectral,l2,...] [--rounds 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from rl_plasticity.agents.sac import SACAgent, SACConfig
from rl_plasticity.buffers import Batch
from rl_plasticity.plasticity.mixin import PlasticityConfig

OBS, ACT = 17, 6  # cheetah-run
ER = {"er": 1e-7, "l2_er": 1e-6}


def make(name: str) -> SACAgent:
    cfg = PlasticityConfig(name=name, coef=0.0 if name == "none" else 1e-4, er=name in ER, er_lr=ER.get(name, 0.01))
    torch.manual_seed(0)
    return SACAgent(OBS, ACT, SACConfig(), "cpu", plasticity=cfg)


def batches(n: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    return Batch(torch.randn(n, 256, OBS, generator=g), torch.rand(n, 256, ACT, generator=g) * 2 - 1,
                 torch.randn(n, 256, generator=g), torch.randn(n, 256, OBS, generator=g), torch.zeros(n, 256))


def timed(agent: SACAgent, batch: Batch, calls: int) -> float:
    """Seconds per update."""
    start = time.perf_counter()
    for _ in range(calls):
        metrics = agent.update(batch)
    float(metrics["losses/critic"])
    return (time.perf_counter() - start) / (calls * batch.obs.shape[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="spectral,l2,l2_init,wasserstein,l2_er")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=5, help="calls of 16 updates per round and side")
    args = p.parse_args()
    batch = batches(16)
    base = make("none")
    timed(base, batch, 2)
    print(f"device cpu, torch {torch.__version__}, threads {torch.get_num_threads()}, SAC 2x256 LayerNorm, "
          f"1 critic, batch 256")
    results = {}
    for name in args.methods.split(","):
        agent = make(name)
        timed(agent, batch, 2)
        ratios, t_base, t_reg = [], [], []
        for _ in range(args.rounds):
            a, b = timed(base, batch, args.calls), timed(agent, batch, args.calls)
            t_base.append(a)
            t_reg.append(b)
            ratios.append(b / a)
        results[name] = 100 * (statistics.median(ratios) - 1)
        print(f"{name:12s} none {1e3 * statistics.median(t_base):.2f} ms/update, {name} "
              f"{1e3 * statistics.median(t_reg):.2f} ms/update, overhead {results[name]:+.1f}%")
    probe = Batch(*(t[0] for t in batch))
    base.diagnostics(probe)
    start = time.perf_counter()
    for _ in range(5):
        {k: float(v) for k, v in base.diagnostics(probe).items()}
    diag = (time.perf_counter() - start) / 5
    per_update = timed(base, batch, args.calls)
    share = 100 * diag / (16_000 * per_update)
    print(f"diagnostics: {1e3 * diag:.1f} ms per call; at plasticity.log_every=16000 updates that is "
          f"{share:.3f}% of training time")
    base.plasticity_curvature(probe, 0)
    start = time.perf_counter()
    for i in range(3):
        base.plasticity_curvature(probe, i)
    curv = (time.perf_counter() - start) / 3
    every = curv / (0.02 * per_update)
    cfg = base.plasticity_cfg
    print(f"curvature: {1e3 * curv:.0f} ms per measurement (samples {cfg.curvature_samples}, Lanczos "
          f"{cfg.curvature_lanczos_steps} steps x {cfg.curvature_lanczos_vectors} vector(s) + the overlap run) = "
          f"{curv / per_update:.0f} updates; <= 2% of training time needs plasticity.curvature_every >= {every:,.0f}")
    print(f"spectral_overhead {results.get('spectral', float('nan')):.1f}")


if __name__ == "__main__":
    main()
