"""Environment steps per second of this package's PPO training against Stable-Baselines3 PPO, measured in one run.

Both sides train on Slippery Ant (gymnasium Ant-v5 with the friction wrapper, built by
`rl_plasticity.envs.make_env`) with Table 8's settings: rollout 2048 steps of 1 env, 10 epochs
of 128 minibatches (16 rows), separate policy and value MLPs 2x256 ReLU, state-independent log
std, lr 2.5e-4, Adam eps 1e-5, gamma 0.99, lambda 0.95, clip 0.2, value coefficient 1, entropy
coefficient 0.01, no gradient clipping (SB3: max_grad_norm=1e9), observation normalisation (ours
built in; SB3 through `VecNormalize(norm_obs=True, norm_reward=False)`), CPU, `--threads` torch
threads.  A round times whole training (collection and updates) of `--steps` env steps from a
fresh agent on each side: our `run_on_policy` (logger into a temp dir, no evaluation, no-op
checkpoints) and SB3's `PPO.learn`; construction is not timed.  The two sides alternate
`--rounds` rounds (which side goes first alternates too); the ratio is the median of the
per-round ratios.  An untimed warm-up run per side comes first and gives the breakdown of where
the time goes.  The last line reads `speedup_vs_sb3 <ratio>`.

With `--plasticity l2_er[,er,...]` the script times the arms of the paper's Slippery Ant comparison
instead of SB3: our PPO with each arm's preset plasticity settings (configs/experiment/ppo_*.yaml:
L2 1e-3, ER lr 1e-7 (er) or 1e-6 (l2_er), er_batch 128, er_step 1 (Table 8), CBP+L2 replacement
rate 1e-7 with L2 1e-4) against the same PPO with `plasticity=none`, alternating rounds; it prints
the wall-time ratio arm / none per arm, and last `max_arm_ratio <ratio> <arm>`.

    python benchmarks/ppo_speed.py [--steps 4096] [--rounds 3] [--threads 2] [--warmup-steps 2048]
    python benchmarks/ppo_speed.py --plasticity l2_er,er [--threads 1]
"""
from __future__ import annotations

import argparse
import collections
import datetime
import gc
import io
import os
import platform
import statistics
import tempfile
import time

import torch

ENV_CFG = {"kind": "slippery_ant", "id": "Ant-v5", "change_every": 2_000_000, "friction_seed": 0,
           "friction": None, "action_repeat": 1}
ROLLOUT = 2048
NEVER = 10**12  # log / checkpoint interval that is never crossed
# The plasticity settings of the Slippery Ant presets (configs/experiment/ppo_*.yaml, Table 7).
ARMS = {"none": {}, "l2": dict(name="l2", coef=1e-3), "er": dict(name="er", er=True, er_lr=1e-7),
        "l2_er": dict(name="l2_er", coef=1e-3, er=True, er_lr=1e-6),
        "cbp_l2": dict(name="cbp_l2", coef=1e-4, cbp=True, cbp_replacement_rate=1e-7)}


class _Timers:
    """Wraps bound methods of given objects (instance attributes only) and sums their wall time."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)

    def wrap(self, obj, method: str, label: str) -> None:
        inner = getattr(obj, method)

        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                self.seconds[label] += time.perf_counter() - start

        setattr(obj, method, timed)


def build_ours(args, timers: _Timers | None = None, arm: str = "none"):
    """This package's PPO as `train` builds it (run/experiment.py), with the plasticity settings of
    `arm` (`ARMS`); returns a function that trains and returns seconds."""
    import gymnasium as gym

    from rl_plasticity.agents.ppo import PPOAgent, PPOConfig
    from rl_plasticity.envs import make_env
    from rl_plasticity.envs.nonstationary import episode_metrics
    from rl_plasticity.logging import Logger
    from rl_plasticity.loops import OnPolicySchedule, run_on_policy
    from rl_plasticity.plasticity.mixin import PlasticityConfig

    cfg = PPOConfig(num_envs=1, rollout_steps=ROLLOUT, epochs=10, num_minibatches=128, hidden_sizes=(256, 256),
                    lr=2.5e-4, adam_eps=1e-5, gamma=0.99, gae_lambda=0.95, clip=0.2, vf_coef=1.0, ent_coef=0.01,
                    max_grad_norm=None, normalize_obs=True, init_log_std=0.0)
    envs = gym.vector.SyncVectorEnv([lambda: make_env(ENV_CFG)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    agent = PPOAgent(obs_dim, act_dim, cfg, "cpu", plasticity=PlasticityConfig(**ARMS[arm]), seed=0)
    schedule = OnPolicySchedule(total_steps=args.steps, rollout_steps=ROLLOUT, eval_every=NEVER, eval_episodes=0,
                                log_every=NEVER, checkpoint_every=NEVER, seed=0, gamma=cfg.gamma,
                                gae_lambda=cfg.gae_lambda)
    tmp = tempfile.TemporaryDirectory(prefix="ppo_speed_")
    logger = Logger(tmp.name, args.steps, stream=io.StringIO())
    if timers is not None:
        timers.wrap(envs, "step", "env step")
        timers.wrap(agent, "explore", "policy (act, value, obs norm)")
        timers.wrap(agent, "values", "policy (act, value, obs norm)")
        timers.wrap(agent, "update", "update (10 epochs x 128)")
        timers.wrap(agent, "diagnostics", "plasticity diagnostics (once, at the end)")

    def run() -> float:
        start = time.perf_counter()
        run_on_policy(agent, envs, None, logger, schedule, lambda step, state: None,
                      env_metrics=lambda: [episode_metrics(e) for e in envs.envs])
        seconds = time.perf_counter() - start
        logger.close()
        envs.close()
        tmp.cleanup()
        return seconds

    return run


def build_sb3(args, timers: _Timers | None = None):
    """Stable-Baselines3 PPO with the same settings; same kind of function."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    from rl_plasticity.envs import make_env

    # Monitor: what SB3 adds itself around a plain gym env (episode returns), as our loop logs them.
    inner = DummyVecEnv([lambda: Monitor(make_env(ENV_CFG))])
    env = VecNormalize(inner, norm_obs=True, norm_reward=False, clip_obs=10.0, gamma=0.99)
    model = PPO("MlpPolicy", env, learning_rate=2.5e-4, n_steps=ROLLOUT, batch_size=ROLLOUT // 128, n_epochs=10,
                gamma=0.99, gae_lambda=0.95, clip_range=0.2, ent_coef=0.01, vf_coef=1.0, max_grad_norm=1e9,
                policy_kwargs=dict(net_arch=dict(pi=[256, 256], vf=[256, 256]), activation_fn=torch.nn.ReLU),
                device="cpu", seed=0, verbose=0)
    if timers is not None:
        timers.wrap(inner, "step_wait", "env step")
        timers.wrap(model, "collect_rollouts", "collection (incl. env step)")
        timers.wrap(model, "train", "update (10 epochs x 128)")

    def run() -> float:
        start = time.perf_counter()
        model.learn(total_timesteps=args.steps)
        seconds = time.perf_counter() - start
        assert model.num_timesteps == args.steps, (model.num_timesteps, args.steps)
        env.close()
        return seconds

    return run


def timed_round(build, args) -> float:
    """Env steps per second of one fresh training run (construction untimed)."""
    run = build(args)
    gc.collect()
    return args.steps / run()


def breakdown(build, args, name: str) -> None:
    """One untimed instrumented run (doubles as warm-up): share of wall time per piece."""
    timers = _Timers()
    steps, args.steps = args.steps, args.warmup_steps
    try:
        total = build(args, timers)()
    finally:
        args.steps = steps
    s = timers.seconds
    if "collection (incl. env step)" in s:  # SB3: split the collection into env and the rest
        s["collection other (policy, VecNormalize, buffer, GAE)"] = s.pop("collection (incl. env step)") - s["env step"]
    s["other (loop, buffer, GAE, logging)" if name == "ours" else "other (learn setup, logging)"] = total - sum(s.values())
    parts = ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in s.items())
    print(f"breakdown {name:<5} {args.warmup_steps / total:7.1f} steps/s over {args.warmup_steps} steps "
          f"({total:.1f} s): {parts}", flush=True)


def compare_arms(args) -> None:
    """Whole training with each arm of `--plasticity` against `plasticity=none`, alternating rounds."""
    arms = args.plasticity.split(",")
    unknown = [a for a in arms if a not in ARMS or a == "none"]
    if unknown:
        raise SystemExit(f"error: unknown arm(s) {', '.join(unknown)}; valid: {', '.join(a for a in ARMS if a != 'none')}")
    if args.warmup_steps:  # untimed: imports, MuJoCo and the first allocations
        timed_round(lambda a: build_ours(a, arm=arms[0]), args)
    ratios: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(args.rounds):
        for arm in arms:
            sides = [("none", None), (arm, None)] if r % 2 == 0 else [(arm, None), ("none", None)]
            seconds = {}
            for name, _ in sides:
                seconds[name] = args.steps / timed_round(lambda a, n=name: build_ours(a, arm=n), args)
            ratios[arm].append(seconds[arm] / seconds["none"])
            print(f"round {r + 1}: none {seconds['none']:.1f} s, {arm} {seconds[arm]:.1f} s, ratio "
                  f"{ratios[arm][-1]:.2f}, load average {os.getloadavg()[0]:.2f}", flush=True)
    for arm in arms:
        print(f"arm_ratio {arm} {statistics.median(ratios[arm]):.2f} (rounds {', '.join(f'{x:.2f}' for x in ratios[arm])})")
    worst = max(arms, key=lambda a: statistics.median(ratios[a]))
    print(f"max_arm_ratio {statistics.median(ratios[worst]):.2f} {worst}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2 * ROLLOUT, help=f"env steps per round and side (multiple of {ROLLOUT})")
    p.add_argument("--rounds", type=int, default=3, help="rounds alternating the two sides")
    p.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    p.add_argument("--warmup-steps", type=int, default=ROLLOUT,
                   help="untimed instrumented run per side before the rounds (0: none, no breakdown)")
    p.add_argument("--plasticity", default=None,
                   help=f"comma-separated arms ({', '.join(a for a in ARMS if a != 'none')}): time them against "
                        f"plasticity=none instead of SB3")
    args = p.parse_args()
    if args.steps < ROLLOUT or args.steps % ROLLOUT or args.warmup_steps % ROLLOUT:
        p.error(f"--steps and --warmup-steps must be multiples of the rollout ({ROLLOUT}); SB3 only stops between rollouts")
    torch.set_num_threads(args.threads)

    import importlib.metadata

    import gymnasium
    import mujoco

    try:  # --plasticity compares our arms only: SB3 (the bench extra) is not needed then
        sb3 = importlib.metadata.version("stable-baselines3")
    except importlib.metadata.PackageNotFoundError:
        if not args.plasticity:
            p.error("stable-baselines3 is not installed: pip install -c constraints-cpu.txt -e '.[bench]'")
        sb3 = "not installed"
    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}, device cpu "
          f"({platform.processor() or platform.machine()}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"sb3 {sb3}, gymnasium {gymnasium.__version__}, mujoco {mujoco.__version__}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"env slippery-ant (Ant-v5), rollout {ROLLOUT} x 1 env, 10 epochs x 128 minibatches of {ROLLOUT // 128}, "
          f"2x256 ReLU pi/vf, obs normalisation, {args.steps} env steps per round and side, {args.rounds} rounds",
          flush=True)
    # Torch's intra-op threads slow down many times over when other processes hold the cores
    # they wait on: keep the machine otherwise idle (see the load average above).
    if args.plasticity:
        compare_arms(args)
        return
    if args.warmup_steps:
        breakdown(build_ours, args, "ours")
        breakdown(build_sb3, args, "sb3")
    # Alternate short rounds (and which side goes first) so that both sides see the same machine
    # load; the ratio is the median of the per-round ratios.
    ours, sb3 = [], []
    for r in range(args.rounds):
        if r % 2 == 0:
            ours.append(timed_round(build_ours, args))
            sb3.append(timed_round(build_sb3, args))
        else:
            sb3.append(timed_round(build_sb3, args))
            ours.append(timed_round(build_ours, args))
        assert torch.get_num_threads() == args.threads, "a side changed the number of torch threads"
        print(f"round {r + 1}: ours {ours[-1]:7.1f} steps/s, sb3 {sb3[-1]:7.1f} steps/s, ratio {ours[-1] / sb3[-1]:.2f}, "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
    ratios = sorted(o / s for o, s in zip(ours, sb3))
    o, s = statistics.median(ours), statistics.median(sb3)
    print(f"rl_plasticity  {o:8.1f} steps/s  ({1e3 / o:.3f} ms/step)  rounds: {', '.join(f'{x:.0f}' for x in ours)}")
    print(f"sb3            {s:8.1f} steps/s  ({1e3 / s:.3f} ms/step)  rounds: {', '.join(f'{x:.0f}' for x in sb3)}")
    print(f"ratio median {statistics.median(ratios):.2f} (min {ratios[0]:.2f}, max {ratios[-1]:.2f}, {len(ratios)} rounds)")
    print(f"speedup_vs_sb3 {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
