"""The train command as a user runs it: a short run's outputs, --help, and clear errors."""
import os
import subprocess
import sys

import pytest
import torch

from rl_plasticity.checkpoint import list_checkpoints

REQUIRED_TAGS = {
    "charts/episode_return", "charts/episode_length", "charts/sps", "charts/updates_per_s",
    "eval/return_mean", "eval/return_std", "losses/critic", "losses/actor", "losses/alpha",
    "value/alpha", "value/q_mean", "value/entropy",
}


def train(*args, cwd=None, timeout=600):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "rl_plasticity.train", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def read_events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    # cartpole-balance with action repeat 4: 250 agent steps per episode, so 600 steps hold two episodes.
    result = train("agent=sac", "env=cartpole-balance", "env.action_repeat=4", "total_steps=600",
                   "agent.prefill_steps=300", "agent.replay_ratio=2", "agent.batch_size=64",
                   "eval.every=300", "eval.episodes=1", "log.every=100", "checkpoint.every=300", f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_short_run_writes_the_tensorboard_tags(short_run):
    run_dir, result = short_run
    acc = read_events(run_dir)
    tags = set(acc.Tags()["scalars"])
    assert REQUIRED_TAGS <= tags, REQUIRED_TAGS - tags
    assert [e.step for e in acc.Scalars("eval/return_mean")] == [300, 600]
    assert [e.step for e in acc.Scalars("charts/episode_length")] == [250, 500]
    assert all(e.value == 250 for e in acc.Scalars("charts/episode_length"))
    assert "config/text_summary" in acc.Tags()["tensors"]
    assert "updates/s" in result.stdout and "ETA" in result.stdout


def test_short_run_writes_checkpoints_loadable_weights_only(short_run):
    run_dir, _ = short_run
    ckpts = list_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in ckpts] == ["step_000000300.pt", "step_000000600.pt"]
    state = torch.load(ckpts[-1], weights_only=True)
    assert state["step"] == 600
    assert state["config"]["env"]["name"] == "cartpole-balance"
    assert state["config"]["agent"]["replay_ratio"] == 2
    agent = state["agent"]
    for key in ("actor", "critic", "critic_target", "log_alpha", "optimizer"):
        assert key in agent
    assert agent["update_count"] == 2 * (600 - 300 + 1)
    groups = agent["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["actor", "critic", "alpha"]
    assert len(agent["optimizer"]["state"]) == sum(len(g["params"]) for g in groups)


def test_default_run_dir_is_named_by_date_and_overrides(tmp_path):
    result = train("env=gym", "env.id=Pendulum-v1", "total_steps=20", "agent.prefill_steps=10",
                   "agent.replay_ratio=1", "eval.episodes=0", "log.every=10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (day,) = list((tmp_path / "runs").iterdir())
    assert "env=gym" in day.name and "total_steps=20" in day.name
    assert list_checkpoints(day / "checkpoints")


def test_help_lists_the_choices():
    result = train("--help")
    assert result.returncode == 0
    for text in ("agent", "sac", "cheetah-run", "humanoid-run", "plasticity", "replay_ratio"):
        assert text in result.stdout


@pytest.mark.parametrize("override, expected", [
    ("env=cheeta-run", "unknown env 'cheeta-run'. Did you mean: cheetah-run"),
    ("agent=sacc", "unknown agent 'sacc'. Did you mean: sac"),
    ("plasticity=nonee", "unknown plasticity 'nonee'"),
    ("agent.batch_sise=64", "unknown key 'agent.batch_sise'. Did you mean: agent.batch_size"),
    ("totl_steps=5", "unknown key 'totl_steps'. Did you mean: total_steps"),
    ("agent.batch_size=abc", "agent.batch_size must be an integer, got 'abc'"),
    ("agent.layer_norm=maybe", "agent.layer_norm must be true or false"),
    ("agent.gamma=high", "agent.gamma must be a number"),
    ("total_steps=0", "total_steps must be >= 1"),
    ("agent.replay_ratio=0", "agent.replay_ratio must be >= 1"),
    ("device=tpu", "device 'tpu'"),
])
def test_bad_overrides_end_with_one_clear_message(override, expected, tmp_path):
    result = train(override, "total_steps=5" if "total_steps" not in override else "seed=0",
                   f"run_dir={tmp_path / 'r'}")
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_cuda_device_without_cuda_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = train("device=cuda", "total_steps=5", f"run_dir={tmp_path / 'r'}")
    assert result.returncode != 0 and "has none" in result.stderr
    assert "Traceback" not in result.stderr
