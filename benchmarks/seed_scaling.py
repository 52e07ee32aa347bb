"""Many seeds in one process: aggregate update throughput of N seeds batched (`num_seeds=N`,
`batch_seeds=true`) against the same N agents updated one after the other (`batch_seeds=false`),
measured in one run.

SAC (default): each seed is a full `SACAgent` (paper settings unless changed: 2x256 MLPs with
LayerNorm, one critic, batch 256, replay ratio 16) with its own replay buffer of random
cheetah-run-sized transitions.  The batched side is `SACSeedGroup.update` (one fused
forward/backward over a leading seed dimension, one Adam call, one target lerp); the peer is
each agent's own fused `update`, called in turn (N single-seed processes sharing one device,
without their process overhead).  Unit: single-seed gradient updates per second, summed over seeds.

PPO (`--agent ppo`): each seed is a `PPOAgent` with Table 8's settings (2x256 ReLU policy and
value MLPs, rollout 2048, 10 epochs x 128 minibatches of 16) updating on its own random
Slippery-Ant-sized rollout (obs 105, action 8); batched is `PPOSeedGroup.update`.  Unit:
minibatch steps per second, summed over seeds (one call = one rollout's 1,280 steps per seed).

Sides alternate for `--rounds` rounds; reported per side is the median rate, and the median
of the per-round ratios.  Last line: `seed_batching_speedup <ratio at the largest N>`.

    python benchmarks/seed_scaling.py [--agent sac|ppo] [--seeds 1 2 4] [--device cpu|cuda]
                                      [--compile] [--cudagraphs] [--no-layer-norm] [--rounds 5] [--calls 4]

On a GPU, `--seeds 1 5 10 20 --compile --cudagraphs` (SAC) and `--agent ppo --seeds 1 5 10 20`
give the issue's N-seed tables.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

OBS, ACT = 17, 6  # cheetah-run
SIDE_ORDER = ("batched", "separate")  # build order of the two sides


PPO_OBS, PPO_ACT = 105, 8  # Slippery Ant


def timer(per_call: int, metric: str, device: torch.device):
    """A function timing `calls` calls of a side: `per_call` (seeds x updates of one call) per second."""
    def timed(step, calls: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            metrics = step()
        float(metrics[metric])  # one host sync at the end, as at log time
        return calls * per_call / (time.perf_counter() - start)
    return timed


def build_ppo(n: int, args, device: torch.device):
    import numpy as np

    from rl_plasticity.agents.ppo import PPOAgent, PPOConfig
    from rl_plasticity.agents.seeds import PPOSeedGroup, SeedRNG, SequentialGroup

    cfg = PPOConfig(layer_norm=False)
    rows = cfg.rollout_steps * cfg.num_envs
    rollouts = []
    for s in range(n):
        rng = np.random.default_rng(s)
        f32 = np.float32
        rollouts.append({"obs": rng.standard_normal((rows, PPO_OBS)).astype(f32),
                         "action": rng.standard_normal((rows, PPO_ACT)).astype(f32),
                         "log_prob": (rng.standard_normal(rows) - 8.0).astype(f32),
                         "value": rng.standard_normal(rows).astype(f32),
                         "advantage": rng.standard_normal(rows).astype(f32),
                         "return": rng.standard_normal(rows).astype(f32)})
    sides = {}
    for side in SIDE_ORDER:
        agents, rngs = [], []
        for s in range(n):
            torch.manual_seed(s)
            agents.append(PPOAgent(PPO_OBS, PPO_ACT, cfg, device, seed=s))
            rngs.append(SeedRNG())
        group = PPOSeedGroup(agents, rngs) if side == "batched" else SequentialGroup(agents, rngs)
        sides[side] = lambda group=group: group.update(rollouts)[-1]
    return sides, timer(n * cfg.epochs * cfg.num_minibatches, "losses/policy", device)


def build(n: int, args, device: torch.device):
    if args.agent == "ppo":
        return build_ppo(n, args, device)
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

    return sides, timer(n * 16, "losses/critic", device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agent", choices=("sac", "ppo"), default="sac")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-critics", type=int, default=1)
    parser.add_argument("--no-layer-norm", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cudagraphs", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=None,
                        help="calls per round and side: SAC 16 updates each (default 4), PPO one rollout (default 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: SAC 3, PPO 1)")
    parser.add_argument("--fill", type=int, default=5000)
    args = parser.parse_args()
    ppo = args.agent == "ppo"
    if ppo and (args.compile or args.cudagraphs):
        parser.error("--compile and --cudagraphs apply to SAC's fused update only")
    args.calls = args.calls if args.calls is not None else (1 if ppo else 4)
    args.warmup = args.warmup if args.warmup is not None else (1 if ppo else 3)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, agent {args.agent}, "
          + ("Table 8 settings (2x256, no LayerNorm, 1,280 minibatch steps of 16 per rollout)" if ppo else
             f"LayerNorm {not args.no_layer_norm}, critics {args.num_critics}, compile {args.compile}, "
             f"cudagraphs {args.cudagraphs}"))
    unit = "steps/s" if ppo else "upd/s"
    print(f"{'seeds':>5} | {'batched ' + unit:>15} | {'separate ' + unit:>16} | ratio (median of rounds)")
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
        print(f"{n:>5} | {statistics.median(rates['batched']):>15.0f} | {statistics.median(rates['separate']):>16.0f} | "
              f"{ratio:.2f} ({min(ratios):.2f}-{max(ratios):.2f})", flush=True)
    print(f"seed_batching_speedup {ratio:.3f}")


if __name__ == "__main__":
    main()
