"""benchmarks/learning_parity.py runs end to end on a tiny budget (no timing, no return threshold)."""
import csv
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "learning_parity.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("learning_parity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_learning_parity_tiny_budget(tmp_path):
    pytest.importorskip("stable_baselines3")
    lp = _load_script()
    out = tmp_path / "parity"
    arms = ["sb3", "ours_peer", "ours_paper"]
    argv = ["--tasks", "cartpole-swingup", "--seeds", "0", "--arms", *arms, "--steps", "300", "--prefill", "200",
            "--replay-ratio", "1", "--eval-every", "300", "--eval-episodes", "1", "--reps", "100", "--jobs", "3", "--out", str(out)]
    assert lp.main(argv) == 0

    for arm in arms:
        record = json.loads(lp.run_path(out, "cartpole-swingup", arm, 0).read_text())
        assert record["arm"] == arm and record["steps"] == 300 and record["replay_ratio"] == 1
        assert [step for step, _ in record["curve"]] == [300]
        assert record["final"] == record["curve"][-1][1]
        assert record["command"]
    with (out / "final_returns.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["task"], r["arm"], r["runs"]) for r in rows] == [("cartpole-swingup", a, "1") for a in arms]
    assert (out / "curves_cartpole-swingup.png").stat().st_size > 0
    summary = (out / "summary.md").read_text()
    assert "rl_plasticity.train" in summary and "IQM" in summary
    assert not (out / "tb").exists()  # our runs' TensorBoard dirs are removed once read

    # Resumable: existing result files are kept, not rerun.
    before = {arm: lp.run_path(out, "cartpole-swingup", arm, 0).stat().st_mtime_ns for arm in arms}
    assert lp.main(argv) == 0
    assert {arm: lp.run_path(out, "cartpole-swingup", arm, 0).stat().st_mtime_ns for arm in arms} == before


def test_ours_command_sets_the_shared_budget(tmp_path):
    lp = _load_script()
    args = lp.parse_args(["--steps", "20000", "--replay-ratio", "4", "--prefill", "5000"])
    command = lp.ours_command("cheetah-run", "ours_peer", 3, args, tmp_path)
    assert command[1:3] == ["-m", "rl_plasticity.train"]
    for override in ("env=cheetah-run", "seed=3", "total_steps=20000", "agent.replay_ratio=4",
                     "agent.prefill_steps=5000", "agent.batch_size=256", "agent.num_critics=2",
                     "agent.layer_norm=false", "threads=1", "eval.episodes=5"):
        assert override in command


def test_configuration_arms_step_from_peer_to_paper():
    """The arms between `ours_peer` and `ours_paper` change one setting each (critics or LayerNorm)."""
    lp = _load_script()
    setting = {arm: dict(o.split("=", 1) for o in lp.ARMS[arm]["overrides"])
               for arm in ("ours_peer", "ours_paper", "ours_1critic_noln", "ours_2critic_ln")}
    assert setting["ours_peer"] == {"agent.num_critics": "2", "agent.layer_norm": "false"}
    assert setting["ours_paper"] == {"agent.num_critics": "1", "agent.layer_norm": "true"}
    assert setting["ours_1critic_noln"] == {"agent.num_critics": "1", "agent.layer_norm": "false"}
    assert setting["ours_2critic_ln"] == {"agent.num_critics": "2", "agent.layer_norm": "true"}


def test_summary_of_result_files(tmp_path):
    """The summary reads whatever result files exist: per task and arm, and over tasks for an arm
    with the same seeds on every task."""
    pytest.importorskip("rliable")
    lp = _load_script()
    for t, task in enumerate(["cartpole-swingup", "cheetah-run"]):
        for arm, seeds in (("sb3", [0, 1, 2]), ("ours_peer", [0, 1, 2]), ("ours_paper", [0, 1] if t else [0, 1, 2])):
            for seed in seeds:
                final = 100.0 * (t + 1) + seed + (10.0 if arm == "sb3" else 0.0)
                record = {"task": task, "arm": arm, "seed": seed, "steps": 2000, "replay_ratio": 4, "prefill": 500,
                          "eval_every": 1000, "eval_episodes": 5, "final": final, "wall_s": 60.0,
                          "command": f"train {arm}", "curve": [[1000, final / 2], [2000, final]]}
                path = lp.run_path(tmp_path, task, arm, seed)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(record))
    text = lp.summarise(tmp_path, reps=100)
    with (tmp_path / "final_returns.csv").open() as f:
        rows = {(r["task"], r["arm"]): r for r in csv.DictReader(f)}
    assert float(rows[("cheetah-run", "sb3")]["mean"]) == pytest.approx(211.0)
    assert rows[("cheetah-run", "ours_paper")]["runs"] == "2"
    assert float(rows[("all tasks", "ours_peer")]["mean"]) == pytest.approx(151.0)
    assert ("all tasks", "ours_paper") not in rows  # seeds differ between tasks
    assert (tmp_path / "curves_cheetah-run.png").exists() and "cheetah-run" in text
