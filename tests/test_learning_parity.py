"""benchmarks/learning_parity.py runs end to end on a tiny budget (no timing, no return threshold)."""
import csv
import importlib.util
import json
import math
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


def _write_run(lp, out, task, arm, seed, curve, steps=1000, eval_every=100):
    record = {"task": task, "arm": arm, "seed": seed, "steps": steps, "replay_ratio": 4, "prefill": 200,
              "eval_every": eval_every, "eval_episodes": 5, "final": curve[-1][1], "wall_s": 60.0,
              "command": f"train {arm}", "curve": curve}
    path = lp.run_path(out, task, arm, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_window_is_the_last_share_of_training():
    lp = _load_script()
    every_1k = {"steps": 20_000, "curve": [[s, float(s)] for s in range(1000, 20_001, 1000)]}
    assert lp.window_evaluations(every_1k, 0.2) == 5                     # 16k, 17k, 18k, 19k, 20k
    assert lp.window_score(every_1k, 0.2) == pytest.approx(18_000.0)
    every_5k = {"steps": 20_000, "curve": [[s, float(s)] for s in range(5000, 20_001, 5000)]}
    assert lp.window_evaluations(every_5k, 0.2) == 1                     # 20k only
    assert lp.window_evaluations(every_5k, 0.25) == 2                    # 15k, 20k
    assert lp.window_evaluations(every_5k, 1.0) == 4
    for bad in ("0", "1.5", "-0.2"):
        with pytest.raises(SystemExit, match="--last-fraction must be in"):
            lp.parse_args(["--last-fraction", bad])


def test_summary_of_hand_made_runs(tmp_path):
    """Both scores, per task and arm and over tasks, against values computed by hand."""
    pytest.importorskip("rliable")
    lp = _load_script()
    zeros = [[s, 0.0] for s in range(100, 800, 100)]  # evaluations before the last 20% (steps 100..700)
    # walker-walk / sb3: evaluations at 800, 900, 1000 (the last 20% of 1,000 steps) per seed.
    window = {0: (0, 0, 0), 1: (5, 10, 15), 2: (30, 20, 10), 3: (100, 150, 50)}
    for seed, values in window.items():
        _write_run(lp, tmp_path, "walker-walk", "sb3", seed, zeros + [[800 + 100 * i, float(v)] for i, v in
                                                                      enumerate(values)])
    # cartpole-swingup / sb3: constant curves 100, 200, 300, 400 (last 20% = final).
    for seed in range(4):
        _write_run(lp, tmp_path, "cartpole-swingup", "sb3", seed, [[s, 100.0 * (seed + 1)] for s in range(100, 1001, 100)])
    # walker-walk / ours_peer, evaluated every 500 steps: the window holds only the final evaluation.
    for seed, (mid, end) in enumerate([(5.0, 40.0), (7.0, 60.0)]):
        _write_run(lp, tmp_path, "walker-walk", "ours_peer", seed, [[500, mid], [1000, end]], eval_every=500)

    text = lp.summarise(tmp_path, reps=200, fraction=0.2)
    with (tmp_path / "final_returns.csv").open() as f:
        rows = {(r["task"], r["arm"]): r for r in csv.DictReader(f)}
    sb3 = rows[("walker-walk", "sb3")]
    # last 20%: per seed 0, 10, 20, 100; final: 0, 15, 10, 50.
    assert sb3["lasts"] == "0 10 20 100" and sb3["finals"] == "0 15 10 50" and sb3["last_evaluations"] == "3"
    assert float(sb3["last_mean"]) == pytest.approx(32.5)
    assert float(sb3["last_se"]) == pytest.approx(math.sqrt((32.5**2 + 22.5**2 + 12.5**2 + 67.5**2) / 3) / 2)
    assert float(sb3["last_iqm"]) == pytest.approx(15.0)    # 4 runs: the middle two, (10 + 20) / 2
    assert float(sb3["final_mean"]) == pytest.approx(18.75)
    assert float(sb3["final_iqm"]) == pytest.approx(12.5)   # sorted 0 10 15 50: (10 + 15) / 2
    for score in ("last", "final"):
        assert 0.0 <= float(sb3[f"{score}_iqm_ci_low"]) <= float(sb3[f"{score}_iqm"]) <= float(sb3[f"{score}_iqm_ci_high"]) <= 100.0
    peer = rows[("walker-walk", "ours_peer")]
    assert peer["last_evaluations"] == "1" and float(peer["last_mean"]) == float(peer["final_mean"]) == pytest.approx(50.0)
    assert float(rows[("cartpole-swingup", "sb3")]["last_mean"]) == pytest.approx(250.0)
    # Over tasks (sb3 has seeds 0-3 on both): per-seed means over tasks 50, 105, 160, 250.
    both = rows[("all tasks", "sb3")]
    assert both["runs"] == "8" and float(both["last_mean"]) == pytest.approx(141.25)
    assert float(both["last_se"]) == pytest.approx(math.sqrt((91.25**2 + 36.25**2 + 18.75**2 + 108.75**2) / 3) / 2)
    assert float(both["last_iqm"]) == pytest.approx(105.0)  # 8 returns, middle four: (20 + 100 + 100 + 200) / 4
    assert ("all tasks", "ours_peer") not in rows             # ours_peer has no cartpole-swingup runs
    assert "last 20%" in text and "walker-walk (ours_peer)" in text  # the note on a one-evaluation window
    with (tmp_path / "curves.csv").open() as f:
        curve = [r for r in csv.DictReader(f) if r["task"] == "walker-walk" and r["arm"] == "sb3" and r["step"] == "1000"]
    assert float(curve[0]["mean"]) == pytest.approx(18.75) and curve[0]["runs"] == "4"
    assert (tmp_path / "curves_walker-walk.png").stat().st_size > 0 and (tmp_path / "curves_cartpole-swingup.png").exists()
