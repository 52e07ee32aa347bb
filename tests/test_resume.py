"""Long runs survive: SIGKILL and resume, SIGTERM, exact continuation, config checks, divergence.

Each fault is compared with the same run uninterrupted: the final parameters must be bitwise
equal and the TensorBoard curves must have the same points, none duplicated or missing.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from rl_plasticity.checkpoint import list_checkpoints
from tests.test_cli import read_events, train

SAC = ["env=gym", "env.id=Pendulum-v1", "agent.prefill_steps=100", "agent.replay_ratio=2", "agent.batch_size=32",
       "agent.hidden_sizes=[64,64]", "eval.every=400", "eval.episodes=1", "log.every=100", "checkpoint.every=400",
       "plasticity=spectral"]
PPO = ["agent=ppo", "env=slippery-ant", "env.change_every=300", "plasticity=cbp_l2", "plasticity.cbp_maturity=50",
       "plasticity.cbp_replacement_rate=0.01", "agent.rollout_steps=256", "agent.num_minibatches=8", "agent.epochs=2",
       "agent.hidden_sizes=[64,64]", "eval.every=512", "eval.episodes=1", "log.every=256", "checkpoint.every=512"]


def popen(args, run_dir):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen([sys.executable, "-m", "rl_plasticity.train", *args, f"run_dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(predicate, proc, timeout=300):
    start = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout
        time.sleep(0.02)


def final_agent(run_dir):
    return torch.load(list_checkpoints(run_dir / "checkpoints")[-1], weights_only=True)


def assert_same_parameters(a, b):
    for net in ("actor", "critic"):
        for k, v in a["agent"][net].items():
            assert torch.equal(v, b["agent"][net][k]), f"{net}.{k}"
    assert a["agent"]["update_count"] == b["agent"]["update_count"]
    assert a["step"] == b["step"]


def curves(run_dir, tags):
    acc = read_events(run_dir)
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags}


TAGS = ["charts/episode_return", "eval/return_mean", "losses/critic"]
PPO_TAGS = ["charts/episode_return", "eval/return_mean", "losses/policy", "env/friction"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted runs everything is compared with."""
    runs = {}
    for name, args in (("sac", SAC + ["total_steps=1200"]), ("ppo", PPO + ["total_steps=1536"])):
        run_dir = tmp_path_factory.mktemp(f"ref_{name}")
        result = train(*args, f"run_dir={run_dir}")
        assert result.returncode == 0, result.stderr
        runs[name] = run_dir
    return runs


@pytest.mark.parametrize("kind", ["sac", "ppo"])
def test_sigkill_after_a_checkpoint_then_resume_equals_uninterrupted(kind, reference, tmp_path):
    args = (SAC + ["total_steps=1200"]) if kind == "sac" else (PPO + ["total_steps=1536"])
    first = "step_000000400.pt" if kind == "sac" else "step_000000512.pt"
    proc = popen(args, tmp_path)
    wait_for(lambda: (tmp_path / "checkpoints" / first).exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = train(*args, f"run_dir={tmp_path}")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert_same_parameters(final_agent(tmp_path), final_agent(reference[kind]))
    tags = TAGS if kind == "sac" else PPO_TAGS
    got, want = curves(tmp_path, tags), curves(reference[kind], tags)
    for tag in tags:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag  # no duplicated or missing points
        assert got[tag] == want[tag], tag  # the same values, bit for bit


@pytest.mark.parametrize("kind", ["sac", "ppo"])
def test_sigterm_checkpoints_mid_episode_exits_0_and_resumes_exactly(kind, reference, tmp_path):
    args = (SAC + ["total_steps=1200"]) if kind == "sac" else (PPO + ["total_steps=1536"])
    proc = popen(args, tmp_path)
    # Let it pass its first logged step, then ask it to stop somewhere mid-episode.
    wait_for(lambda: any(tmp_path.glob("events.out.tfevents.*")) and
             (tmp_path / "checkpoints" / ("step_000000400.pt" if kind == "sac" else "step_000000512.pt")).exists(),
             proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "Resume with: python -m rl_plasticity.train" in out and f"run_dir={tmp_path}" in out
    stopped = final_agent(tmp_path)
    total = 1200 if kind == "sac" else 1536
    if stopped["step"] == total:
        pytest.skip("the run finished before the signal arrived")
    resumed = train(*args, f"run_dir={tmp_path}")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_parameters(final_agent(tmp_path), final_agent(reference[kind]))
    tags = TAGS if kind == "sac" else PPO_TAGS
    assert curves(tmp_path, tags) == curves(reference[kind], tags)


def test_resume_false_refuses_an_existing_run_and_touches_nothing(reference, tmp_path):
    run_dir = reference["sac"]
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    result = train(*SAC, "total_steps=1200", "resume=false", f"run_dir={run_dir}")
    assert result.returncode == 2 and "resume=false" in result.stderr
    assert "Traceback" not in result.stderr
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_different_config_is_refused_naming_the_keys(reference):
    run_dir = reference["sac"]
    result = train(*SAC, "total_steps=1200", "agent.replay_ratio=4", f"run_dir={run_dir}")
    assert result.returncode == 2
    assert "agent.replay_ratio (checkpoint: 2, now: 4)" in result.stderr


def test_a_complete_run_is_not_run_again_and_more_steps_extend_it(reference, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(reference["sac"], run_dir)
    again = train(*SAC, "total_steps=1200", f"run_dir={run_dir}")
    assert again.returncode == 0 and "already complete" in again.stdout
    longer = train(*SAC, "total_steps=1400", f"run_dir={run_dir}")
    assert longer.returncode == 0, longer.stderr
    assert final_agent(run_dir)["step"] == 1400


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(reference["sac"], run_dir)
    newest = list_checkpoints(run_dir / "checkpoints")[-1]
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a crash without atomic writes
    result = train(*SAC, "total_steps=1200", f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr
    assert "skipping step_000001200.pt" in result.stderr and "resuming from" in result.stdout
    assert_same_parameters(final_agent(run_dir), final_agent(reference["sac"]))


def test_checkpoint_holds_replay_rng_env_and_loop_state(reference):
    state = final_agent(reference["sac"])
    assert state["replay"]["size"] == 1200 and state["replay"]["obs"].shape[0] == 1200
    assert {"python", "numpy", "torch"} <= set(state["rng"])
    assert state["env"][0]["exact"] and "time_limit" in state["env"][0]
    assert {"obs", "episode_return", "probe", "action_rng"} <= set(state["loop"])
    assert state["agent"]["plasticity"]["regularizers"]["critic"]["u"]  # power-iteration vectors
    ppo = final_agent(reference["ppo"])
    assert ppo["env"][0]["slippery_ant"]["change_every"] == 300 and "mujoco" in ppo["env"][0]
    assert ppo["agent"]["plasticity"]["interventions"]["cbp"]["actor"]["age"]  # CBP utilities and ages


def test_save_replay_false_leaves_the_buffer_out(tmp_path):
    result = train(*SAC, "total_steps=200", "checkpoint.save_replay=false", f"run_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "replay" not in final_agent(tmp_path)


def test_divergence_guard_stops_names_the_loss_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A NaN injected into the critic loss after the first checkpoint stops the run at the next
    check with exit status 3, writes diverged.json and never checkpoints the diverged state."""
    from hydra import compose, initialize_config_module

    from rl_plasticity.agents.sac import SACAgent
    from rl_plasticity.loops import DivergenceError
    from rl_plasticity.train import train as train_fn

    original = SACAgent._fused_step  # the default update path (agent.fused=true)

    def poisoned(self, *args):
        metrics = original(self, *args)
        if self.update_count > 2 * (400 - 100 + 1):  # updates run from step 100: after the step-400 checkpoint
            metrics["losses/critic"] = metrics["losses/critic"] * float("nan")
        return metrics

    monkeypatch.setattr(SACAgent, "_fused_step", poisoned)
    with initialize_config_module(config_module="rl_plasticity.configs", version_base=None):
        cfg = compose("train", overrides=SAC + ["total_steps=1200"])
    with pytest.raises(DivergenceError) as info:
        train_fn(cfg, str(tmp_path))
    assert "losses/critic = nan" in str(info.value) and "env step 500" in str(info.value)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_000000400.pt"]
    record = json.loads((tmp_path / "diverged.json").read_text())
    assert record["step"] == 500 and record["last_good_checkpoint"].endswith("step_000000400.pt")


def test_non_finite_parameters_are_named_by_network():
    from rl_plasticity.agents.ppo import PPOAgent, PPOConfig
    from rl_plasticity.loops import DivergenceError, check_finite

    agent = PPOAgent(3, 1, PPOConfig(hidden_sizes=(8,)))
    check_finite(agent, {"losses/value": torch.tensor(1.0)}, 10)
    with torch.no_grad():
        agent.critic[0].weight[0, 0] = float("inf")
    with pytest.raises(DivergenceError, match="network.s. critic"):
        check_finite(agent, {"losses/value": torch.tensor(1.0)}, 10)


@pytest.mark.parametrize("args, expected", [
    (["agent.batch_size=512", "agent.buffer_size=100"], "must not exceed agent.buffer_size"),
    (["plasticity=l2", "plasticity.coef=-1.0"], "plasticity.coef must be >= 0"),
    (["plasticity.cbp_decay=1.0"], "plasticity.cbp_decay must be in [0, 1)"),
    (["agent=ppo", "env=slippery-ant", "env.change_every=0"], "env.change_every must be >= 1"),
    (["agent=ppo", "env=slippery-ant", "env.friction=-0.5"], "env.friction must be > 0"),
    (["agent=ppo", "agent.num_minibatches=5000"], "agent.num_minibatches (5000) must not exceed"),
    (["agent=ppo", "agent.clip=0.0"], "agent.clip must be > 0"),
    (["eval.episodes=-1"], "eval.episodes must be >= 0"),
    (["checkpoint.keep=0"], "checkpoint.keep must be >= 1"),
    (["threads=0"], "threads must be >= 1"),
    (["device=cuda:x"], "device 'cuda:x'"),
])
def test_impossible_values_stop_before_training(args, expected, tmp_path):
    result = train(*args, "total_steps=5", f"run_dir={tmp_path / 'r'}")
    assert result.returncode == 2, result.stdout
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not list_checkpoints(tmp_path / "r" / "checkpoints")


def test_a_fresh_start_over_an_attempt_without_checkpoints_hides_its_points(reference, tmp_path):
    """An attempt stopped before its first checkpoint leaves event files and nothing to resume: the
    run starts afresh, and the attempt's points must not merge into its curves (TensorBoard and
    the report read every event file of the directory).  Found in benchmarks/README.md, Slippery
    Ant second sitting: a first-friction mean that differed from a deterministic rerun."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = tmp_path / "run"
    stale = SummaryWriter(str(run_dir))
    for step in (150, 250, 1150):  # steps the run itself never logs these tags at
        for tag in TAGS:
            stale.add_scalar(tag, 1e6, step)
    stale.close()
    result = train(*SAC, "total_steps=1200", f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr
    assert curves(run_dir, TAGS) == curves(reference["sac"], TAGS)
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2  # the attempt's file is kept, only hidden
    from rl_plasticity.report import read_events as report_events
    scalars, config_text, _ = report_events(run_dir)
    assert scalars["charts/episode_return"][1].max() < 1e6
    assert config_text is not None and "Pendulum-v1" in config_text  # the run's own config is kept
