"""benchmarks/redo_layernorm_check.py (benchmarks/README.md, continual DMC second sitting): runs on a
short SAC run's checkpoint, reports every hidden layer of both networks, and leaves the run dir
as it was; a checkpoint without its replay buffer is one clear error."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "redo_layernorm_check.py"


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def _train(run_dir: Path, *extra: str) -> None:
    result = _run("-m", "rl_plasticity.train", "env=cartpole-balance", "env.action_repeat=4", "total_steps=400",
                  "agent.prefill_steps=200", "agent.replay_ratio=1", "agent.batch_size=32",
                  "agent.hidden_sizes=[32,32]", "eval.every=400", "eval.episodes=1", "plasticity=none",
                  "plasticity.interventions=[redo]", "threads=1", f"run_dir={run_dir}", *extra)
    assert result.returncode == 0, result.stderr


def test_reports_every_hidden_layer_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir)
    before = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file())
    result = _run(str(SCRIPT), str(run_dir), "--tau", "0.5")  # a high τ: some units count as dormant
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "step 400, tau 0.5" in lines[0]
    for name in ("actor", "critic"):
        for layer in (0, 1):
            assert any(line.strip().startswith(f"{name} hidden layer {layer}: ") and " of 32 units dormant" in line
                       for line in lines), result.stdout
    assert any("after recycling" in line and "median μ/σ" in line for line in lines), result.stdout
    after = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file())
    assert after == before


def test_a_checkpoint_without_replay_is_one_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, "checkpoint.save_replay=false")
    result = _run(str(SCRIPT), str(run_dir))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "holds no replay buffer" in result.stderr and "checkpoint.save_replay" in result.stderr
    result = _run(str(SCRIPT), str(tmp_path / "absent"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "no checkpoints in" in result.stderr
