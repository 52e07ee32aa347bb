"""Console progress: a line at least every `log.progress_seconds` on a slow run, and an ETA that
is measured on the learning phase, never on the random prefill."""
import io
import re
import time

import gymnasium as gym

from rl_plasticity.agents.sac import SACAgent, SACConfig
from rl_plasticity.buffers import ReplayBuffer
from rl_plasticity.envs import make_env
from rl_plasticity.logging import ConsoleProgress, Logger
from rl_plasticity.loops import OffPolicySchedule, run_off_policy


class Slow(gym.Wrapper):
    def step(self, action):
        time.sleep(0.02)
        return self.env.step(action)


def test_a_slow_run_prints_progress_on_a_time_basis(tmp_path):
    env = Slow(make_env({"kind": "gym", "id": "Pendulum-v1"}))
    agent = SACAgent(3, 1, SACConfig(hidden_sizes=(16, 16), batch_size=16, replay_ratio=1))
    buffer = ReplayBuffer(3, 1, 1000)
    stream = io.StringIO()
    logger = Logger(str(tmp_path), 60, stream=stream, progress_every_s=0.25)
    sched = OffPolicySchedule(total_steps=60, prefill_steps=30, replay_ratio=1, batch_size=16, eval_every=10**6,
                              eval_episodes=0, log_every=10**6, checkpoint_every=10**6, seed=0)
    run_off_policy(agent, buffer, env, env, logger, sched, lambda step, state: None)
    logger.close()
    lines = stream.getvalue().splitlines()
    # 60 steps of >= 20 ms with no log.every step in between but the last: lines come from the clock.
    assert len(lines) >= 4, lines
    prefill = [ln for ln in lines if int(re.search(r"step\s+(\d+)/", ln).group(1)) < 30]
    learning = [ln for ln in lines[:-1] if int(re.search(r"step\s+(\d+)/", ln).group(1)) > 31]
    assert prefill and all("ETA after prefill (learning starts at step 30)" in ln for ln in prefill)
    assert learning and all(re.search(r"ETA \d+m\d\ds$", ln) for ln in learning), learning
    assert lines[-1].startswith("step        60/60 (100.0%)") and lines[-1].endswith("ETA 0m00s")


def test_eta_comes_from_the_learning_rate_not_the_prefill_rate(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    console = ConsoleProgress(every_s=30)
    now[0] = 1.0   # prefill: 999 steps in a second
    line = console.line(999, 0, 100_000, 1000, None)
    assert "999.0 steps/s" in line and "ETA after prefill (learning starts at step 1,000)" in line
    console.observe(1000, 1000)
    now[0] = 11.0  # learning: 100 steps in 10 s, so 10 steps/s and 98,900 steps left
    assert console.line(1100, 1600, 100_000, 1000, 12.5).endswith("ETA 2h44m")
    assert not console.due()
    now[0] = 41.0
    assert console.due()
