"""The evaluate command: reproducible returns, training's logged evaluation reproduced exactly,
run-dir curves (CSV + TensorBoard), multi-seed dirs, Slippery Ant frictions, MP4 videos, and one
clear message per bad input."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from rl_plasticity.checkpoint import list_checkpoints
from rl_plasticity.config import ConfigError
from rl_plasticity.evaluate import EvaluateConfig, evaluate_checkpoint, main, run
from tests.test_cli import read_events, train

# cartpole-balance with action repeat 8: 125 agent steps per episode.
SAC = ["env=cartpole-balance", "env.action_repeat=8", "agent.prefill_steps=100", "agent.replay_ratio=1",
       "agent.batch_size=32", "agent.hidden_sizes=[32,32]", "agent.buffer_size=1000", "total_steps=250",
       "eval.every=250", "eval.episodes=2", "log.every=125", "checkpoint.every=125", "checkpoint.save_replay=false",
       "threads=1"]
# Slippery Ant changing friction every 10 steps (at episode ends), so that the friction in force at
# the checkpoint is not the schedule's first one.
PPO = ["agent=ppo", "env=slippery-ant", "env.change_every=10", "agent.rollout_steps=256", "agent.num_minibatches=4",
       "agent.epochs=1", "agent.hidden_sizes=[32,32]", "total_steps=512", "eval.every=512", "eval.episodes=1",
       "log.every=512", "checkpoint.every=512", "threads=1"]


def evaluate_cli(*args, **env_changes):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_changes}
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "rl_plasticity.evaluate", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def logged(run_dir, tag="eval/return_mean"):
    return [(e.step, e.value) for e in read_events(run_dir).Scalars(tag)]


def _trained(tmp_path_factory, name, args):
    run_dir = tmp_path_factory.mktemp(name)
    result = train(*args, f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture(scope="module")
def sac_run(tmp_path_factory):
    return _trained(tmp_path_factory, "sac", SAC)


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    return _trained(tmp_path_factory, "ppo", PPO)


def test_reproduces_the_last_logged_evaluation_from_the_command_line(sac_run):
    final = list_checkpoints(sac_run / "checkpoints")[-1]
    assert final.name == "step_000000250.pt"
    result = evaluate_cli(f"checkpoint={final}", "episodes=2")
    assert result.returncode == 0, result.stderr
    assert "return mean" in result.stdout and "std" in result.stdout and "max" in result.stdout
    summary = json.loads((sac_run / "checkpoints" / "step_000000250.eval.json").read_text())
    assert summary["step"] == 250 and summary["episodes"] == 2 and len(summary["returns"]) == 2
    assert summary["seeds"] == [1_000_000, 1_000_001]
    assert summary["return_min"] <= summary["return_mean"] <= summary["return_max"]
    assert summary["return_std"] == pytest.approx(float(np.std(summary["returns"])))
    # TensorBoard stores float32: the evaluation is the same to the last bit of that.
    (step, value), = logged(sac_run)[-1:]
    assert step == 250 and np.float32(summary["return_mean"]) == np.float32(value)


def test_same_checkpoint_and_seed_give_the_same_returns(sac_run):
    path = list_checkpoints(sac_run / "checkpoints")[0]
    cfg = EvaluateConfig(checkpoint=str(path), episodes=2)
    a = evaluate_checkpoint(path, cfg, write_json=False)
    b = evaluate_checkpoint(path, cfg, write_json=False)
    assert a["returns"] == b["returns"]
    other = evaluate_checkpoint(path, cfg, {"seed": 7}, write_json=False)
    assert other["seeds"] == [1_000_007, 1_000_008] and other["returns"] != a["returns"]


def test_slippery_ant_defaults_to_the_training_friction_and_env_friction_overrides_it(ppo_run):
    path = list_checkpoints(ppo_run / "checkpoints")[-1]
    state = torch.load(path, weights_only=True)
    trained_on = state["env"][0]["slippery_ant"]["friction"]
    assert state["env"][0]["slippery_ant"]["schedule_index"] > 0  # not the schedule's first friction
    result = evaluate_checkpoint(path, EvaluateConfig(checkpoint=str(path), episodes=1))
    assert result["friction"] == trained_on
    (step, value), = logged(ppo_run)[-1:]
    assert step == 512 and np.float32(result["return_mean"]) == np.float32(value)

    short = EvaluateConfig(checkpoint=str(path), episodes=1, max_episode_steps=100)
    held = evaluate_checkpoint(path, short, write_json=False)
    slippery = evaluate_checkpoint(path, short, {"env.friction": 0.05})
    assert slippery["friction"] == 0.05 and slippery["returns"] != held["returns"]
    # Evaluations under other settings are written beside the default one, not over it.
    written = ppo_run / "checkpoints" / "step_000000512.eval_env.friction=0.05,max_episode_steps=100.json"
    assert json.loads(written.read_text())["overrides"] == {"env.friction": 0.05}
    assert json.loads((ppo_run / "checkpoints" / "step_000000512.eval.json").read_text())["friction"] == trained_on


def test_run_dir_writes_the_checkpoint_curve_to_csv_and_tensorboard(sac_run, capsys):
    results = run(EvaluateConfig(checkpoint=str(sac_run), episodes=1), {})
    assert [r["step"] for r in results] == [125, 250]
    with open(sac_run / "checkpoint_returns.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [125, 250]
    assert [float(r["return_mean"]) for r in rows] == [r["return_mean"] for r in results]
    curve = logged(sac_run, "eval/checkpoint_return")
    assert [s for s, _ in curve] == [125, 250]
    assert [v for _, v in curve] == [np.float32(r["return_mean"]) for r in results]
    assert logged(sac_run)  # training's own curves are still there
    assert "checkpoint_returns.csv" in capsys.readouterr().out


def test_multi_seed_dir_evaluates_each_seed(sac_run, tmp_path):
    for k in (0, 1):
        shutil.copytree(sac_run / "checkpoints", tmp_path / f"seed_{k}" / "checkpoints",
                        ignore=shutil.ignore_patterns("*.json", "videos"))
    results = run(EvaluateConfig(checkpoint=str(tmp_path), episodes=1), {})
    assert [r["step"] for r in results] == [125, 250, 125, 250]
    for k in (0, 1):
        with open(tmp_path / f"seed_{k}" / "checkpoint_returns.csv") as f:
            assert [int(r["step"]) for r in csv.DictReader(f)] == [125, 250]
        assert [s for s, _ in logged(tmp_path / f"seed_{k}", "eval/checkpoint_return")] == [125, 250]


def _damaged(tmp_path, sac_run, kind):
    if kind == "truncated":
        data = list_checkpoints(sac_run / "checkpoints")[-1].read_bytes()
        (tmp_path / "step_000000001.pt").write_bytes(data[: len(data) // 2])
    elif kind == "text":
        (tmp_path / "step_000000001.pt").write_text("hello\n")
    else:
        (tmp_path / "step_000000001.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    return tmp_path / "step_000000001.pt"


@pytest.mark.parametrize("args, expected", [
    (["episodes=0"], "episodes must be >= 1, got 0"),
    (["episodes=-2"], "episodes must be >= 1, got -2"),
    (["checkpoint={tmp}/missing.pt"], "checkpoint file not found"),
    (["checkpoint={tmp}"], "no checkpoints in"),
    (["checkpoint={truncated}"], "truncated or not a torch file"),
    (["checkpoint={text}"], "not a torch file"),
    (["checkpoint={random}"], "refusing to load"),
    (["checkpoint={final}", "episods=3"], "unknown key 'episods'. Did you mean: episodes"),
    (["checkpoint={final}", "agent.lr=0.1"], "unknown key 'agent.lr'"),
    (["checkpoint={final}", "env.friction=0.05"], "unknown key 'env.friction'"),  # not a Slippery Ant run
    (["checkpoint={final}", "video=true", "video_width=63"], "video_width must be an even number"),
    ([], "checkpoint=<file or run dir> is required"),
])
def test_bad_input_ends_with_one_clear_message(args, expected, sac_run, tmp_path, capsys):
    names = {"tmp": tmp_path, "final": list_checkpoints(sac_run / "checkpoints")[-1]}
    for kind in ("truncated", "text", "random"):
        if any("{" + kind + "}" in a for a in args):
            (tmp_path / kind).mkdir()
            names[kind] = _damaged(tmp_path / kind, sac_run, kind)
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(**names) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and expected in err, err
    if "unknown key" in expected:
        assert "Valid keys: checkpoint, episodes" in err


@pytest.mark.parametrize("args, expected", [
    (["--checkpoint", "x.pt"], "write checkpoint=<value> instead of '--checkpoint'"),
    (["--episodes=3"], "write episodes=3 instead of '--episodes=3'"),
    (["--video-dir=/tmp/v"], "write video_dir=/tmp/v instead of '--video-dir=/tmp/v'"),
    (["{file}"], "write checkpoint={file} (options are key=value"),
    (["episodes"], "expected key=value, got 'episodes'"),
])
def test_flags_and_bare_paths_get_their_key_value_spelling(args, expected, tmp_path, capsys):
    """evaluate speaks train's key=value language; a flag or a bare path gets one line saying how."""
    names = {"file": tmp_path / "step_000000001.pt"}
    names["file"].write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(**names) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected.format(**names) in err, err
    assert "Usage: python -m rl_plasticity.evaluate checkpoint=" in err


def test_help_gives_every_key_its_meaning(capsys):
    from rl_plasticity.evaluate import _defaults

    main(["--help"])
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    from tests.test_cli import key_meanings_in_help

    meanings = key_meanings_in_help(out, _defaults())
    assert set(meanings) == {"checkpoint", "episodes", "max_episode_steps", "video", "video_episodes", "video_dir",
                             "video_width", "video_height"}
    assert all(meanings.values()), meanings


def test_command_line_error_has_no_traceback(sac_run, tmp_path):
    path = _damaged(tmp_path, sac_run, "truncated")
    result = evaluate_cli(f"checkpoint={path}")
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot read checkpoint") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _frames(path):
    import imageio

    reader = imageio.get_reader(str(path), "ffmpeg")
    try:
        return reader.count_frames(), reader.get_meta_data()["size"]
    finally:
        reader.close()


def test_video_writes_a_playable_mp4_with_one_frame_per_step(sac_run, ppo_run, tmp_path):
    # DMC from the command line, choosing the OpenGL backend itself (no MUJOCO_GL given): 80 env
    # steps at action repeat 8 are 10 agent steps, plus the frame of the reset.
    final = list_checkpoints(sac_run / "checkpoints")[-1]
    result = evaluate_cli(f"checkpoint={final}", "episodes=2", "video=true", "max_episode_steps=80",
                          "video_width=64", "video_height=48", f"video_dir={tmp_path / 'dmc'}", MUJOCO_GL=None)
    if "no OpenGL backend renders MuJoCo" in result.stderr:
        pytest.skip(f"no renderer can exist here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert "rendering with MUJOCO_GL=" in result.stdout
    assert sorted(p.name for p in (tmp_path / "dmc").iterdir()) == ["step_000000250-episode-0.mp4"]
    assert _frames(tmp_path / "dmc" / "step_000000250-episode-0.mp4") == (11, (64, 48))
    summary = json.loads((sac_run / "checkpoints" / "step_000000250.eval_max_episode_steps=80.json").read_text())
    plain = evaluate_checkpoint(final, EvaluateConfig(episodes=2, max_episode_steps=80), write_json=False)
    assert summary["returns"] == plain["returns"]  # rendering does not change the episodes
    # Gymnasium MuJoCo (Slippery Ant, Ant-v5), in-process, into <checkpoint dir>/videos by default.
    path = list_checkpoints(ppo_run / "checkpoints")[-1]
    cfg = EvaluateConfig(episodes=1, max_episode_steps=20, video=True, video_width=64, video_height=64)
    out = evaluate_checkpoint(path, cfg, write_json=False)
    assert out["videos"] == [str(ppo_run / "checkpoints" / "videos" / "step_000000512-episode-0.mp4")]
    assert _frames(out["videos"][0]) == (21, (64, 64))


def test_no_working_renderer_is_one_error_naming_the_packages(monkeypatch):
    import rl_plasticity.video as video

    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.delenv("DISPLAY", raising=False)
    for name in ("mujoco", "dm_control"):  # as before anything loaded MuJoCo (restored afterwards)
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(video, "_backend_works", lambda backend: False)
    with pytest.raises(ConfigError, match=r"tried MUJOCO_GL=egl, osmesa.*apt-get install libegl1 libegl-mesa0"):
        video.select_gl_backend()
    assert "MUJOCO_GL" not in os.environ


def _video_frames(path):
    import imageio

    reader = imageio.get_reader(str(path), "ffmpeg")
    try:
        return np.stack([f for f in reader.iter_data()]), reader.get_meta_data()["fps"]
    finally:
        reader.close()


def _agent_fraction(frame):
    """Share of a frame's pixels showing the agent: both the cheetah and the ant are tan (red well
    above blue), while the DMC floor and sky are blue-grey and gymnasium's floor and sky grey."""
    rgb = frame.astype(np.int16)
    return float(((rgb[..., 0] - rgb[..., 2]) > 40).mean())


ANT = {"kind": "slippery_ant", "name": "slippery-ant", "id": "Ant-v5", "change_every": 2_000_000, "friction_seed": 0,
       "friction": None, "action_repeat": 1}
CHEETAH = {"kind": "dmc", "name": "cheetah-run", "domain": "cheetah", "task": "run", "action_repeat": 1}


@pytest.mark.parametrize("env_cfg, seconds, stride, fps", [(CHEETAH, 3.0, 2, 50.0), (ANT, 3.0, 1, 20.0)],
                         ids=["cheetah-run", "slippery-ant"])
def test_video_follows_the_agent_in_real_time(env_cfg, seconds, stride, fps, tmp_path):
    """The agent runs at 10 m/s (moved along x before every step, whatever its policy would do) for
    3 s, 30 m: far out of a fixed camera's view.  Every frame must still show it, and the frames
    after the first second must keep changing (a camera that lost it films a still floor)."""
    from rl_plasticity.envs import make_env
    from rl_plasticity.video import _backend_works, record_episodes as _record, render_options

    if not _backend_works(os.environ.get("MUJOCO_GL", "egl")):
        pytest.skip(f"MUJOCO_GL={os.environ.get('MUJOCO_GL', 'egl')} cannot render here")
    env = make_env(env_cfg, **render_options(env_cfg, 64, 64))
    cfg = EvaluateConfig(episodes=1, video=True, video_dir=str(tmp_path))
    recorded, (video,) = _record(env, tmp_path / "agent.pt", cfg, 1)
    recorded.reset(seed=0)
    unwrapped = env.unwrapped
    if env_cfg["kind"] == "dmc":
        physics = unwrapped._env.physics
        dt, qpos = unwrapped._env.control_timestep(), physics.data.qpos  # qpos[0]: rootx
    else:
        dt, qpos = unwrapped.dt, unwrapped.data.qpos  # qpos[0]: the torso's x
    steps = round(seconds / dt)
    for _ in range(steps):
        qpos[0] += 10.0 * dt
        recorded.step(np.zeros(env.action_space.shape, dtype=np.float32))
    assert qpos[0] >= 29.0
    recorded.close()
    frames, video_fps = _video_frames(video)
    assert len(frames) == steps // stride + 1 and video_fps == pytest.approx(fps)  # real time
    shown = [_agent_fraction(f) for f in frames]
    assert min(shown) > 0.01, shown
    later = frames[round(fps):].astype(np.float32)
    changes = np.abs(np.diff(later, axis=0)).mean(axis=(1, 2, 3))
    assert changes.min() > 0.05, changes  # a fixed camera that lost the agent: exactly 0
