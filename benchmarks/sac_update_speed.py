"""Updates per second of this package's SAC against Stable-Baselines3 SAC, measured in one run.

Both agents train on the same env (default DMC cheetah-run) with the same settings: 2x256 ReLU
MLPs, batch 256, `--num-critics` critics, 16 gradient updates per call, LayerNorm off on our side
(SB3 has none).  Each side fills its replay buffer with `--fill` random transitions, warms up,
then the two sides alternate `--rounds` rounds of `--calls` calls of 16 updates (batch sampling
included); the ratio is the median of the per-round ratios.  It also prints how close our
update comes to the matmul-bound floor: the FLOPs of one update (torch.utils.flop_counter) over
this machine's measured rate for a 256x256x256 matmul, divided by the measured time per update
(`floor_fraction`; 1.0 would be an update that is nothing but matmuls at full speed).  The last
line reads `speedup_vs_sb3 <ratio>`.

    python benchmarks/sac_update_speed.py [--env cheetah-run] [--num-critics 1] [--layer-norm]
                                          [--reference] [--compile] [--cudagraphs] [--device cuda]
                                          [--rounds 9]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def _fill_env(env, n: int, seed: int):
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    for _ in range(n):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        yield obs, action, reward, next_obs, terminated
        obs = env.reset()[0] if (terminated or truncated) else next_obs


def build_ours(env_cfg, args):
    """This package's SAC with a filled buffer; returns a function that times `calls` calls."""
    from rl_plasticity.agents.sac import SACAgent, SACConfig
    from rl_plasticity.buffers import ReplayBuffer
    from rl_plasticity.envs import make_env

    env = make_env(env_cfg)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    cfg = SACConfig(num_critics=args.num_critics, layer_norm=args.layer_norm, batch_size=256, replay_ratio=16,
                    fused=not args.reference)
    agent = SACAgent(obs_dim, act_dim, cfg, args.device, compile=args.compile, cudagraphs=args.cudagraphs)
    buffer = ReplayBuffer(obs_dim, act_dim, args.fill, args.device, seed=0)
    for transition in _fill_env(env, args.fill, 0):
        buffer.add(*transition)

    def run(calls: int) -> float:
        _sync(args.device)
        start = time.perf_counter()
        for _ in range(calls):
            metrics = agent.update(buffer.sample(16, 256))
        float(metrics["losses/critic"])  # one sync at the end, as at log time
        return calls * 16 / (time.perf_counter() - start)

    def flops() -> float:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            agent.update(buffer.sample(1, 256))
        return float(counter.get_total_flops())

    run.flops = flops
    return run


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(n: int = 256, seconds: float = 1.0, device: str = "cpu") -> float:
    """FLOP/s of an n x n x n float32 matmul on `device` (best of 5 short runs)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(20):
        torch.mm(a, b)
    best = 0.0
    for _ in range(5):
        _sync(device)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 5:
            for _ in range(10):
                torch.mm(a, b)
            count += 10
        _sync(device)
        best = max(best, 2 * n ** 3 * count / (time.perf_counter() - start))
    return best


def build_sb3(env_cfg, args):
    """Stable-Baselines3 SAC with the same settings and a filled buffer; same timing function."""
    from stable_baselines3 import SAC

    from rl_plasticity.envs import make_env

    env = make_env(env_cfg)
    model = SAC("MlpPolicy", env, buffer_size=args.fill + 10, learning_starts=args.fill, batch_size=256,
                train_freq=1, gradient_steps=16, policy_kwargs=dict(net_arch=[256, 256], n_critics=args.num_critics),
                device=args.device, seed=0, verbose=0)
    model.learn(total_timesteps=args.fill + 1)  # fills the buffer with random actions, sets up the logger

    def run(calls: int) -> float:
        _sync(args.device)
        start = time.perf_counter()
        for _ in range(calls):
            model.train(gradient_steps=16, batch_size=256)
        _sync(args.device)
        return calls * 16 / (time.perf_counter() - start)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="cheetah-run", help="DMC <domain>-<task>")
    p.add_argument("--num-critics", type=int, default=1, help="1 as in the paper; SB3 gets the same")
    p.add_argument("--layer-norm", action="store_true", help="LayerNorm on our side (SB3 has none)")
    p.add_argument("--reference", action="store_true", help="our autograd reference update (agent.fused=false)")
    p.add_argument("--compile", action="store_true", help="compile=true (torch.compile of the fused update)")
    p.add_argument("--cudagraphs", action="store_true", help="cudagraphs=true (CUDA only)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    p.add_argument("--fill", type=int, default=5000)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--calls", type=int, default=10, help="calls of 16 updates per round and side")
    p.add_argument("--rounds", type=int, default=9, help="rounds alternating the two sides")
    args = p.parse_args()
    domain, task = args.env.split("-", 1)
    env_cfg = {"kind": "dmc", "domain": domain, "task": task}
    path = "reference (autograd)" if args.reference else ("fused" + (" + compile" if args.compile else "")
                                                          + (" + cudagraphs" if args.cudagraphs else ""))
    name = (torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda"
            else platform.processor() or platform.machine())
    print(f"device {args.device} ({name}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, env {args.env}, critics {args.num_critics}, "
          f"layer norm {args.layer_norm}, update path {path}, batch 256, 16 updates/call")
    ours_run, sb3_run = build_ours(env_cfg, args), build_sb3(env_cfg, args)
    update_flops = ours_run.flops()
    ours_run(args.warmup)
    sb3_run(args.warmup)
    # Alternate short rounds so that both sides see the same machine load; the ratio is the
    # median of the per-round ratios.
    ours, sb3 = [], []
    for _ in range(args.rounds):
        ours.append(ours_run(args.calls))
        sb3.append(sb3_run(args.calls))
    ratios = sorted(o / s for o, s in zip(ours, sb3))
    o, s = statistics.median(ours), statistics.median(sb3)
    print(f"rl_plasticity  {o:8.1f} updates/s  ({1e3 / o:.2f} ms/update)  rounds: {', '.join(f'{x:.0f}' for x in ours)}")
    print(f"sb3            {s:8.1f} updates/s  ({1e3 / s:.2f} ms/update)  rounds: {', '.join(f'{x:.0f}' for x in sb3)}")
    rate = matmul_rate(device=args.device)
    floor_ms = update_flops / rate * 1e3
    print(f"floor: {update_flops / 1e9:.3f} GFLOP per update / {rate / 1e9:.0f} GFLOP/s (256^3 matmul) = "
          f"{floor_ms:.2f} ms; floor_fraction {floor_ms / (1e3 / o):.2f}")
    print(f"speedup_vs_sb3 {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
