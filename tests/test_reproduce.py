"""benchmarks/reproduce.py (issue 14, part 3): each arm composes to its paper's settings at CPU
scale, and a study runs end to end on a tiny budget through train and the report."""
from __future__ import annotations

import csv
import importlib.util
import shutil
import sys
from types import SimpleNamespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "benchmarks" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = mod
    spec.loader.exec_module(mod)
    return mod


def _compose(command: list[str]) -> dict:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from rl_plasticity.cli import CONFIG_MODULE, register_configs

    overrides = [a for a in command[3:] if not a.startswith(("run_dir=",))]
    register_configs()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        return OmegaConf.to_container(compose("train", overrides=overrides))


def test_every_arm_composes_to_its_paper_settings_at_cpu_scale(tmp_path):
    rep = _module()
    got = {(study, arm): _compose(rep.command(study, arm, [3], tmp_path))
           for study, (_, _, arms) in rep.STUDIES.items() for arm in arms}
    for (study, arm), c in got.items():
        assert c["seed"] == 3 and c["threads"] == 1
        if study == "slippery-ant":
            assert c["agent"]["name"] == "ppo" and c["env"]["kind"] == "slippery_ant"
            assert (c["total_steps"], c["env"]["change_every"]) == (500_000, 100_000)  # five frictions
            assert c["agent"]["lr"] == 1e-4  # Table 7
        else:
            assert c["agent"]["name"] == "sac" and c["env"]["kind"] == "continual_dmc"
            assert c["env"]["tasks"] == ["walker-walk", "walker-run"] and c["env"]["steps_per_task"] == 15_000
            assert (c["agent"]["replay_ratio"], c["agent"]["num_critics"], c["agent"]["layer_norm"]) == (2, 1, True)
            assert c["eval"]["all_tasks"] is True
    sa = {arm: got[("slippery-ant", arm)]["plasticity"] for arm in ("bp", "l2", "l2_er")}
    assert (sa["bp"]["name"], sa["l2"]["name"], sa["l2_er"]["name"]) == ("none", "l2", "l2_er")
    assert sa["l2"]["coef"] == 1e-3 and (sa["l2_er"]["coef"], sa["l2_er"]["er_lr"]) == (1e-3, 1e-6)
    cd = {arm: got[("continual-dmc", arm)] for arm in rep.STUDIES["continual-dmc"][2]}
    assert cd["none"]["plasticity"]["name"] == "none" and cd["none"]["agent"]["reset_interval"] is None
    assert cd["none"]["plasticity"]["interventions"] == []
    assert (cd["spectral"]["plasticity"]["name"], cd["spectral"]["plasticity"]["coef"]) == ("spectral", 1e-4)
    assert cd["reset"]["agent"]["reset_interval"] == 30_000  # one task's updates: 15k steps at ratio 2
    assert cd["shrink_perturb"]["plasticity"]["interventions"] == ["shrink_perturb"]
    assert cd["shrink_perturb"]["plasticity"]["shrink_perturb"]["task_change"] is True
    assert cd["redo"]["plasticity"]["interventions"] == ["redo"]


def test_consecutive_seeds_share_a_process(tmp_path):
    rep = _module()
    assert rep.chunks([4, 0, 1, 2, 3], 3) == [[0, 1, 2], [3, 4]]
    assert rep.chunks([0, 2, 3], 3) == [[0], [2, 3]]  # num_seeds needs consecutive seeds
    cmd = rep.command("slippery-ant", "l2", [3, 4], rep.process_dir(tmp_path, "l2", [3, 4]))
    assert "seed=3" in cmd and "num_seeds=2" in cmd and f"run_dir={tmp_path / 'l2' / 'seeds_3-4'}" in cmd
    c = _compose(cmd)
    assert (c["seed"], c["num_seeds"]) == (3, 2)
    log = tmp_path / "train.log"
    log.write_text("step ...\ndone (seed 3): 10 env steps\n")
    assert rep.finished(tmp_path, 1) and not rep.finished(tmp_path, 2)
    log.write_text("step ...\ndone (seed 3): 10 env steps\ndone (seed 4): 10 env steps\n")
    assert rep.finished(tmp_path, 2)


def test_unknown_arm_is_one_line_naming_the_valid_ones(capsys):
    rep = _module()
    with pytest.raises(SystemExit):
        rep.main(["continual-dmc", "--arms", "spectal", "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown arm 'spectal'" in err and "none, spectral, reset, shrink_perturb, redo" in err


def test_a_study_runs_end_to_end_through_train_and_the_report(tmp_path, capsys):
    rep = _module()
    runs, out = tmp_path / "runs", tmp_path / "out"
    tiny = ["total_steps=400", "env.steps_per_task=200", "agent.prefill_steps=100", "eval.every=200",
            "eval.episodes=1", "agent.replay_ratio=1", "agent.batch_size=32", "agent.hidden_sizes=[16,16]"]
    argv = ["continual-dmc", "--arms", "none", "spectral", "--seeds", "0", "--jobs", "2", "--runs", str(runs),
            "--out", str(out), "--last-k", "1", "--train", *tiny]
    assert rep.main(argv) == 0
    for arm in ("none", "spectral"):
        assert rep.finished(runs / arm / "seed_0")
    with open(out / "runs.csv") as f:
        methods = {row["method"] for row in csv.DictReader(f)}
    assert len(methods) == 2  # the two arms are two methods of the report
    for task in ("walker-walk", "walker-run"):  # each task's evaluation has its own report
        assert (out / task / "curves_continual-dmc.png").exists()
    capsys.readouterr()
    assert rep.main(argv) == 0  # again: nothing re-runs
    assert capsys.readouterr().out.count("finished before, skipped") == 2
    # the report was drawn from the copy of the event files under out/events/, which outlives the run dirs
    for arm in ("none", "spectral"):
        copied = sorted(p.name for p in (out / "events" / arm / "seed_0").iterdir())
        assert copied == sorted(p.name for p in (runs / arm / "seed_0").glob("events.out.tfevents.*")) != []
    first = (out / "runs.csv").read_text()
    shutil.rmtree(runs)
    (out / "runs.csv").unlink()
    assert rep.main([*argv, "--report-only"]) == 0
    assert (out / "runs.csv").read_text() == first


def test_archive_replaces_a_run_dirs_copy_as_a_whole(tmp_path):
    """A run deleted and started again must not leave its old event file in the copy (the report
    would merge two runs), and the copy of a run dir no longer present stays."""
    rep = _module()
    runs, archive = tmp_path / "runs", tmp_path / "events"
    (runs / "a" / "seed_0").mkdir(parents=True)
    (runs / "a" / "seed_0" / "events.out.tfevents.1.old").write_text("old")
    (runs / "a" / "seed_0" / "model.pt").write_text("checkpoint")
    (runs / "b" / "seed_0").mkdir(parents=True)
    (runs / "b" / "seed_0" / "events.out.tfevents.1.b").write_text("b")
    assert rep.archive_events(runs, archive) == 2
    assert not (archive / "a" / "seed_0" / "model.pt").exists()  # event files only
    (runs / "a" / "seed_0" / "events.out.tfevents.1.old").unlink()
    (runs / "a" / "seed_0" / "events.out.tfevents.2.new").write_text("new")
    shutil.rmtree(runs / "b")
    assert rep.archive_events(runs, archive) == 1
    assert sorted(p.name for p in (archive / "a" / "seed_0").iterdir()) == ["events.out.tfevents.2.new"]
    assert (archive / "b" / "seed_0" / "events.out.tfevents.1.b").read_text() == "b"
    assert rep.archive_events(tmp_path / "absent", archive) == 0


def test_slippery_ant_report_draws_the_episode_lengths_too(tmp_path, monkeypatch):
    """The online return alone cannot tell walking from ending episodes early: a second report
    of charts/episode_length goes beside the return's."""
    rep = _module()
    calls = []
    monkeypatch.setattr(rep.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or SimpleNamespace(returncode=0))
    assert rep.report("slippery-ant", tmp_path / "runs", tmp_path / "out", 5) == 0
    metrics = {c[c.index("--out") + 1]: c[c.index("--metric") + 1] for c in calls}
    assert metrics == {str(tmp_path / "out"): "charts/episode_return",
                       str(tmp_path / "out" / "episode_length"): "charts/episode_length"}
