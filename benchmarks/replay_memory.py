"""Replay buffer memory: bytes per transition, peak resident memory and checkpoint size of a full
1M-transition DMC humanoid-run buffer, in the previous layout (obs and next_obs stored for every
transition) and in this package's (each observation stored once).

Each layout runs in its own subprocess, which reads its peak resident set size (VmHWM in
/proc/self/status) after importing torch, after allocating and filling the buffer, and after
saving the buffer's `state_dict()` with torch.save.  The buffer is filled through `add()` as the
off-policy loop does, with synthetic data of humanoid-run's shapes: episodes of 1000 steps that end
by truncation, each starting from a fresh reset observation.  It is a memory measurement (run it
once); it needs about 2 GB of free RAM and as much free disk under --tmp-dir.

    python benchmarks/replay_memory.py [--capacity 1000000]

Last line: `bytes_per_transition_ratio <old/new>`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch


class PreviousLayoutBuffer:
    """The replay buffer before this change, reduced to what the measurement uses: one obs row and
    one next_obs row per transition."""

    def __init__(self, obs_dim: int, action_dim: int, capacity: int):
        kw = dict(dtype=torch.float32)
        self.obs = torch.zeros((capacity, obs_dim), **kw)
        self.next_obs = torch.zeros((capacity, obs_dim), **kw)
        self.action = torch.zeros((capacity, action_dim), **kw)
        self.reward = torch.zeros((capacity,), **kw)
        self.terminated = torch.zeros((capacity,), **kw)
        self.capacity, self.pos, self.size = capacity, 0, 0
        self.generator = torch.Generator().manual_seed(0)

    @property
    def nbytes(self) -> int:
        fields = (self.obs, self.next_obs, self.action, self.reward, self.terminated)
        return sum(t.numel() * t.element_size() for t in fields)

    def add(self, obs, action, reward, next_obs, terminated) -> None:
        i = self.pos
        self.obs[i] = torch.as_tensor(obs, dtype=torch.float32)
        self.next_obs[i] = torch.as_tensor(next_obs, dtype=torch.float32)
        self.action[i] = torch.as_tensor(action, dtype=torch.float32)
        self.reward[i] = float(reward)
        self.terminated[i] = float(bool(terminated))
        self.pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def state_dict(self) -> dict:
        n = self.size
        return {"obs": self.obs[:n], "next_obs": self.next_obs[:n], "action": self.action[:n],
                "reward": self.reward[:n], "terminated": self.terminated[:n], "pos": self.pos, "size": self.size,
                "capacity": self.capacity, "generator": self.generator.get_state()}


def memory_mib() -> dict[str, float]:
    """Peak (VmHWM) and current (VmRSS) resident memory of this process, in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) / 1024  # kB
    return out


def measure(layout: str, obs_dim: int, action_dim: int, capacity: int, episode: int, tmp_dir: str) -> dict:
    """Runs in the child process: allocate, fill and save one buffer, reading memory on the way."""
    from rl_plasticity.buffers import ReplayBuffer

    rng = np.random.default_rng(0)
    before = memory_mib()
    if layout == "previous":
        buf = PreviousLayoutBuffer(obs_dim, action_dim, capacity)
    else:
        buf = ReplayBuffer(obs_dim, action_dim, capacity, "cpu", seed=0)
    allocated = memory_mib()
    added = 0
    while added < capacity:
        observations = rng.standard_normal((episode + 1, obs_dim), dtype=np.float32)  # reset obs .. final obs
        actions = rng.uniform(-1, 1, (episode, action_dim))  # float64, as the env's action space
        rewards = rng.uniform(0, 1, episode)
        for t in range(min(episode, capacity - added)):  # ends by truncation: terminated stays False
            buf.add(observations[t], actions[t], float(rewards[t]), observations[t + 1], False)
        added += episode
    filled = memory_mib()
    fd, path = tempfile.mkstemp(suffix=".pt", dir=tmp_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(buf.state_dict(), f)
        checkpoint_bytes = os.path.getsize(path)
    finally:
        os.unlink(path)
    saved = memory_mib()
    extra = {}
    if layout != "previous":
        extra = {"final_rows": buf._final_obs.shape[0], "final_rows_in_use": buf._final_count}
    return {"layout": layout, "size": buf.size, "nbytes": buf.nbytes, "checkpoint_bytes": checkpoint_bytes,
            "baseline_hwm_mib": before["VmHWM"], "allocated_hwm_mib": allocated["VmHWM"],
            "filled_hwm_mib": filled["VmHWM"], "filled_rss_mib": filled["VmRSS"], "saved_hwm_mib": saved["VmHWM"],
            **extra}


def humanoid_run_dims() -> tuple[int, int]:
    from rl_plasticity.envs import make_env

    env = make_env({"kind": "dmc", "domain": "humanoid", "task": "run"})
    dims = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    return dims


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--capacity", type=int, default=1_000_000)
    p.add_argument("--episode", type=int, default=1000, help="episode length (ends by truncation)")
    p.add_argument("--obs-dim", type=int, help="default: from the humanoid-run env")
    p.add_argument("--action-dim", type=int, help="default: from the humanoid-run env")
    p.add_argument("--tmp-dir", default=tempfile.gettempdir(), help="where the checkpoints are written, then removed")
    p.add_argument("--child", choices=["previous", "shared_obs"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.obs_dim, args.action_dim, args.capacity, args.episode,
                                 args.tmp_dir)))
        return
    if args.obs_dim is None or args.action_dim is None:
        args.obs_dim, args.action_dim = humanoid_run_dims()
    obs_dim, action_dim, cap = args.obs_dim, args.action_dim, args.capacity
    print(f"humanoid-run: obs {obs_dim}, action {action_dim}; capacity {cap:,}, {args.episode}-step episodes "
          f"(truncated); torch {torch.__version__}", flush=True)
    results = {}
    for layout in ("previous", "shared_obs"):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", layout, "--capacity", str(cap),
               "--episode", str(args.episode), "--obs-dim", str(obs_dim), "--action-dim", str(action_dim),
               "--tmp-dir", args.tmp_dir]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        results[layout] = json.loads(out.strip().splitlines()[-1])

    formula_old = (2 * obs_dim + action_dim + 2) * 4
    formula_new = (obs_dim + action_dim + 2) * 4 + 4
    MiB = 2**20
    print("\n| layout | bytes/transition | buffer (MiB) | peak RSS: import | +allocate | +fill | +save "
          "| checkpoint (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    per_transition = {}
    for layout, r in results.items():
        per_transition[layout] = r["nbytes"] / cap
        formula = formula_old if layout == "previous" else formula_new
        print(f"| {layout} | {per_transition[layout]:.2f} (formula {formula}) | {r['nbytes'] / MiB:.1f} "
              f"| {r['baseline_hwm_mib']:.0f} MiB | +{r['allocated_hwm_mib'] - r['baseline_hwm_mib']:.0f} "
              f"| +{r['filled_hwm_mib'] - r['baseline_hwm_mib']:.0f} | +{r['saved_hwm_mib'] - r['baseline_hwm_mib']:.0f} "
              f"| {r['checkpoint_bytes'] / MiB:.1f} |")
    new = results["shared_obs"]
    print(f"\nshared_obs: {new['final_rows_in_use']} final-observation rows in use of {new['final_rows']} "
          f"allocated; previous-layout bytes/transition by formula (2·{obs_dim}+{action_dim}+2)·4 = {formula_old}")
    print(f"bytes_per_transition_ratio {formula_old / per_transition['shared_obs']:.3f}")


if __name__ == "__main__":
    main()
