"""The run directory as a newcomer meets it: the printed resume command runs verbatim, refused
configs leave nothing behind, a foreign directory is refused, one writer at a time, train.log holds
the console, checkpoints hold only the filled part of the replay buffer, and a full disk loses
nothing."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from rl_plasticity.checkpoint import list_checkpoints, load_checkpoint
from rl_plasticity.rundir import LOCK_NAME, RunLock, hydra_value, shell_command
from tests.test_cli import train

TINY = ["env=gym", "env.id=Pendulum-v1", "agent.prefill_steps=50", "agent.replay_ratio=1", "agent.batch_size=16",
        "agent.hidden_sizes=[16,16]", "eval.episodes=0", "log.every=100"]


def test_printed_resume_command_runs_verbatim_in_a_shell(tmp_path):
    # The old default name had `=` and `,`, which Hydra's override parser refuses unquoted.
    run_dir = tmp_path / "2026-11-30_14-51-36_agent=sac,env=cheetah-run"
    proc = subprocess.Popen([sys.executable, "-m", "rl_plasticity.train", *TINY, "total_steps=100000",
                             "checkpoint.every=200", f"run_dir={hydra_value(str(run_dir))}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = time.time()
    while not list_checkpoints(run_dir / "checkpoints"):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < 300
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    (line,) = [ln for ln in out.splitlines() if ln.startswith("Resume with: ")]
    command = line[len("Resume with: "):].replace("total_steps=100000", "total_steps=400")
    stopped = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])["step"]
    # `python` on PATH is this interpreter, as in the user's activated environment.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    resumed = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {run_dir / 'checkpoints'}" in resumed.stdout and stopped < 400
    assert load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])["step"] == 400


def test_shell_command_quotes_for_the_shell_and_for_hydra():
    line = shell_command(["agent.hidden_sizes=[64,64]", "+experiment=sac_spectral", "run_dir=old"],
                         run_dir="/r/a=b,c d")
    assert line == ("python -m rl_plasticity.train 'agent.hidden_sizes=[64,64]' +experiment=sac_spectral "
                    "'run_dir=\"/r/a=b,c d\"'")
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for value in ["/plain/path-1.2", "a=b,c", "it's", 'say "x"', "back\\slash\\", "x'\"y", "null", "[1]"]:
        (override,) = OverridesParser.create().parse_overrides([f"run_dir={hydra_value(value)}"])
        assert override.value() == value


@pytest.mark.parametrize("override", ["agent.replay_ratio=0", "total_steps=-5", "device=cuda", "eval.every=0",
                                      "plasticity.coef=-1", "env.id=NoSuchEnv-v0"])
def test_a_rejected_config_leaves_no_directory(override, tmp_path):
    if override == "device=cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    result = train(*TINY, "total_steps=100", override, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())
    given = tmp_path / "given"
    result = train(*TINY, "total_steps=100", override, f"run_dir={given}")
    assert result.returncode == 2 and not given.exists()


def test_an_existing_empty_run_dir_is_kept_after_a_rejected_env(tmp_path):
    result = train(*TINY, "total_steps=100", "env.id=NoSuchEnv-v0", f"run_dir={tmp_path}")
    assert result.returncode == 2 and tmp_path.is_dir()


def test_a_non_run_directory_is_refused_and_left_as_it_was(tmp_path):
    (tmp_path / "notes.txt").write_text("my notes")
    result = train(*TINY, "total_steps=100", f"run_dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "holds no rl_plasticity run" in result.stderr and "notes.txt" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_train_log_holds_the_console(tmp_path):
    result = train(*TINY, "total_steps=200", f"run_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "train.log").read_text()
    assert "run dir:" in log and "step       200/200" in log and "done: 200 env steps" in log


def test_checkpoint_holds_the_filled_part_of_the_replay_buffer(tmp_path):
    result = train(*TINY, "total_steps=200", "agent.buffer_size=200000", f"run_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    path = list_checkpoints(tmp_path / "checkpoints")[-1]
    replay = load_checkpoint(path)["replay"]
    assert replay["obs"].shape == (200, 3) and replay["capacity"] == 200000
    full = 200000 * (3 + 1 + 1 + 1) * 4  # obs, action, reward, terminated at full capacity
    assert path.stat().st_size < full / 20


_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from rl_plasticity.rundir import RunLock
    RunLock.acquire(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(600)
""")


def test_one_writer_per_run_dir_and_a_dead_holder_does_not_block(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = train(*TINY, "total_steps=100", f"run_dir={tmp_path}")
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and f"pid {holder.pid}" in result.stderr
        assert "being written by another process" in result.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
    # The holder died without cleaning up: its lock file stays, its lock does not.
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid
    result = train(*TINY, "total_steps=100", f"run_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] != holder.pid


def test_lock_is_reentrant_within_a_process(tmp_path):
    RunLock.acquire(tmp_path)
    RunLock.acquire(tmp_path)
    RunLock.release(tmp_path)


_DISK_FULL = textwrap.dedent("""
    import errno, sys
    import torch
    import rl_plasticity.checkpoint as checkpoint
    real_save, calls = torch.save, []
    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) >= 2:  # the second checkpoint finds the disk full halfway through
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *a, **k)
    checkpoint.torch.save = save
    from rl_plasticity.train import main
    sys.argv = ["rl_plasticity.train"] + sys.argv[1:]
    main()
""")


def test_disk_full_during_a_checkpoint_loses_nothing_and_stops_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-c", _DISK_FULL, *TINY, "total_steps=400", "checkpoint.every=100",
                             f"run_dir={tmp_path}"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "No space left on device" in result.stderr
    assert re.search(r"previous checkpoint step_000000100\.pt is intact.*resume with: python -m rl_plasticity\.train",
                     result.stderr)
    (only,) = list_checkpoints(tmp_path / "checkpoints")
    assert load_checkpoint(only)["step"] == 100
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert "No space left on device" in (tmp_path / "train.log").read_text()


def _wandb_run_files(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_wandb_offline_mirrors_the_run_and_a_resumed_run_continues_its_wandb_run(tmp_path):
    pytest.importorskip("wandb")
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    args = [*TINY, "log.wandb=true", "log.wandb_mode=offline", "log.wandb_project=rlp-test",
            "log.wandb_tags=[smoke,pendulum]", f"run_dir={tmp_path}"]
    for total in (200, 300):
        result = subprocess.run([sys.executable, "-m", "rl_plasticity.train", *args, f"total_steps={total}"],
                                capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    files = _wandb_run_files(tmp_path)
    # Two processes, one W&B run: both offline run directories carry the same id.
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    first = files[0].read_bytes()
    # The same tags as TensorBoard, the resolved config and the tags reach the W&B record.
    for needle in (b"charts/episode_return", b"losses/critic", b"global_step", b"Pendulum-v1", b"rlp-test",
                   b"pendulum"):
        assert needle in first, needle


def test_wandb_without_the_package_or_with_a_bad_mode_is_refused_before_anything_is_made(tmp_path):
    result = train(*TINY, "total_steps=100", "log.wandb=true", "log.wandb_mode=sometimes", f"run_dir={tmp_path / 'x'}")
    assert result.returncode == 2 and "log.wandb_mode must be one of online, offline, disabled" in result.stderr
    assert not (tmp_path / "x").exists()
