"""Sweeps through Hydra's submitit launcher, and preemption of a swept job.

submitit's local executor runs each job as SLURM would: a controller process starts
`python -m submitit.core._submit <folder>`, which unpickles the launcher and runs the Hydra job.
A job that exits with status 144 after submitit's preemption handler has re-pickled it is started
again by the controller, the local counterpart of `scontrol requeue`; that is the path tested here.
"""
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rl_plasticity.checkpoint import list_checkpoints
from tests.test_cli import read_events

TINY = ["env=gym", "env.id=Pendulum-v1", "agent.prefill_steps=50", "agent.replay_ratio=1", "agent.batch_size=32",
        "agent.hidden_sizes=[32,32]", "eval.episodes=1", "log.every=100", "threads=1"]
ARGS = [*TINY, "total_steps=600", "eval.every=300", "checkpoint.every=100"]
ENV = {**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}


def sweep_command(*args):
    # timeout_min: a signal after min(0.8 x limit, limit - 10 min) counts as a timeout, before as a preemption.
    return [sys.executable, "-m", "rl_plasticity.train", "-m", "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=60", *args]


def job_dirs(sweep_dir):
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def submitit_log(sweep_dir):
    """Everything the job processes wrote (stdout and stderr of every attempt)."""
    return "".join(p.read_text() for p in sorted((sweep_dir / ".submitit").glob("*/*_log.*")))


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """Two jobs (seeds 0 and 1) through the submitit local launcher, run side by side."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    result = subprocess.run(sweep_command(*ARGS, "seed=0,1", f"hydra.sweep.dir={sweep_dir}"), cwd=sweep_dir,
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr + submitit_log(sweep_dir)
    return sweep_dir


def test_local_submitit_multirun_runs_every_job_in_its_own_dir(local_sweep):
    jobs = job_dirs(local_sweep)
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"]
    for seed, job in enumerate(jobs):
        assert f"seed={seed}" in job.name
        assert [p.name for p in list_checkpoints(job / "checkpoints")] == [
            "step_000000400.pt", "step_000000500.pt", "step_000000600.pt"]
        state = torch.load(job / "checkpoints" / "step_000000600.pt", weights_only=True)
        assert state["step"] == 600 and state["config"]["seed"] == seed
        assert [e.step for e in read_events(job).Scalars("eval/return_mean")] == [300, 600]
        assert (job / ".hydra" / "config.yaml").exists() and (job / "train.log").exists()
    # submitit's record: one folder per job, each holding a successful result.
    results = sorted((local_sweep / ".submitit").glob("*/*_result.pkl"))
    assert len(results) == 2
    for path in results:
        outcome, job_return = pickle.loads(path.read_bytes())
        assert outcome == "success" and job_return.status.name == "COMPLETED"


def _children(pid):
    """Process ids whose parent is `pid` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _wait(predicate, proc, timeout=240):
    start = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.02)


def _submitit_job(sweep_dir):
    """The process of the one job that submitit's local controller in `sweep_dir` runs."""
    (controller,) = [int(p.name) for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()]
    (job,) = _children(controller)
    return job


def _signal_once_checkpointed(proc, checkpointed, target, sig):
    """Once `checkpointed()` holds, send `sig` to the process `target()` names; return the
    sweep's (stdout, stderr) after it exits (killed if the test fails first)."""
    try:
        _wait(checkpointed, proc)
        os.kill(target(), sig)
        return proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()


def _final_parameters_equal(job, reference):
    final = torch.load(list_checkpoints(job / "checkpoints")[-1], weights_only=True)
    expected = torch.load(list_checkpoints(reference / "checkpoints")[-1], weights_only=True)
    assert final["step"] == expected["step"]
    for net in ("actor", "critic"):
        for key, value in expected["agent"][net].items():
            assert torch.equal(final["agent"][net][key], value), f"{net}.{key}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the job process through /proc")
def test_a_preempted_job_is_requeued_in_the_same_dir_and_resumes_exactly(local_sweep, tmp_path):
    """The job process gets SIGUSR2 once its first checkpoint exists, as on SLURM from `--signal`
    before the time limit or from `scancel --signal=USR2` (submitit's SlurmJob._interrupt). The
    run checkpoints at the next env step, submitit re-pickles and requeues the job, the requeued
    job lands in the same sweep dir (the default `multirun/${now:...}`, resolved once before
    pickling) and resumes: final parameters and curves equal those of the job run uninterrupted."""
    args = [*ARGS, "checkpoint.keep=100", "seed=0"]
    reference = job_dirs(local_sweep)[0]

    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen(sweep_command(*args), cwd=work, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = _signal_once_checkpointed(
        proc, lambda: any(work.glob("multirun/*/0_*/checkpoints/step_000000100.pt")),
        lambda: _submitit_job(next((work / "multirun").iterdir())), signal.SIGUSR2)
    (sweep_dir,) = list((work / "multirun").iterdir())
    log = submitit_log(sweep_dir)
    assert proc.returncode == 0, err + log
    if "already complete" in log:
        pytest.skip("the job finished before the signal arrived")

    # One sweep dir, one job dir: the requeued job did not resolve ${now:...} again.
    assert list((work / "multirun").iterdir()) == [sweep_dir]
    (job,) = job_dirs(sweep_dir)
    assert log.count("Starting with JobEnvironment") == 2, log
    assert "this job is preempted" in log and "Requeued job" in log, log
    assert log.count("resuming from") == 1 and "done: 600 env steps" in log, log
    resumed_at = int(log.split("resuming from", 1)[1].split(" at step ", 1)[1].split()[0].replace(",", ""))
    assert 100 <= resumed_at < 600
    assert f"step_{resumed_at:09d}.pt" in [p.name for p in list_checkpoints(job / "checkpoints")]

    _final_parameters_equal(job, reference)
    tags = ["charts/episode_return", "eval/return_mean", "losses/critic"]
    got, want = read_events(job), read_events(reference)
    for tag in tags:
        assert [(e.step, e.value) for e in got.Scalars(tag)] == [(e.step, e.value) for e in want.Scalars(tag)], tag


def test_stop_request_passes_the_signal_on_and_ends_a_sweep_job(monkeypatch):
    from rl_plasticity.run.stop import StopRequest

    calls = []
    term_handler = signal.getsignal(signal.SIGTERM)
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop() and calls == []  # the replaced handler waits for the checkpoint
            os.kill(os.getpid(), signal.SIGTERM)  # a different signal does not abort
        assert calls == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGTERM) is term_handler  # restored

        monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")  # inside a submitit job: no success recorded
        with pytest.raises(SystemExit) as info:
            with StopRequest():
                os.kill(os.getpid(), signal.SIGTERM)
        assert info.value.code == 128 + signal.SIGTERM

        with pytest.raises(KeyboardInterrupt):  # the same signal twice aborts
            with StopRequest():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGUSR2, previous)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the job process through /proc")
@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_sigterm_stops_the_sweep_and_the_same_command_resumes_it(launcher, local_sweep, tmp_path):
    """SIGTERM without a requeue (scancel, or a preemption on a cluster that sends no user
    signal): the job checkpoints; an in-process sweep starts no further job; a submitit job records
    no result, so the sweep fails. The same command with the same hydra.sweep.dir then finishes
    every job, the stopped one resumed exactly."""
    sweep_dir = tmp_path / "sweep"
    seeds = "0,1" if launcher == "basic" else "0"
    command = [sys.executable, "-m", "rl_plasticity.train", "-m", f"hydra/launcher={launcher}", *ARGS, f"seed={seeds}",
               f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = _signal_once_checkpointed(
        proc, lambda: any(sweep_dir.glob("0_*/checkpoints/step_000000100.pt")),
        lambda: proc.pid if launcher == "basic" else _submitit_job(sweep_dir), signal.SIGTERM)
    assert proc.returncode != 0, out + err
    (job,) = job_dirs(sweep_dir)  # the basic launcher did not start job 1
    stopped = torch.load(list_checkpoints(job / "checkpoints")[-1], weights_only=True)["step"]
    if stopped == 600:
        pytest.skip("the job finished before the signal arrived")
    if launcher == "submitit_local":
        assert not list((sweep_dir / ".submitit").glob("*/*_result.pkl"))

    again = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    log = again.stdout + again.stderr + (submitit_log(sweep_dir) if launcher == "submitit_local" else "")
    assert again.returncode == 0, log
    assert f"at step {stopped:,}" in log and "resuming from" in log, log
    for reference, job in zip(job_dirs(local_sweep), job_dirs(sweep_dir)):
        _final_parameters_equal(job, reference)
