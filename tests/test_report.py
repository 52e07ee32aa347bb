"""python -m rl_plasticity.report on synthetic runs whose numbers are chosen here, so every figure
and table value can be checked against a hand computation."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter

from rl_plasticity.report import main, method_labels, read_events

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = (0, 1000, 2000, 3000)
ENVS = ("cheetah-run", "walker-run")
# Final returns of the 8 seeds of each (env, method) cell, in seed order.
FINAL = {
    ("cheetah-run", "none"): [5.0, 100.0, 20.0, 300.0, 30.0, 70.0, 40.0, 60.0],
    ("cheetah-run", "spectral"): [400.0, 420.0, 410.0, 900.0, 380.0, 405.0, 10.0, 415.0],
    ("walker-run", "none"): [50.0, 60.0, 70.0, 80.0, 90.0, 100.0, 110.0, 120.0],
    ("walker-run", "spectral"): [200.0, 250.0, 300.0, 350.0, 150.0, 100.0, 400.0, 450.0],
}
REPS = "300"


def config(env="cheetah-run", plasticity="none", coef=0.0, seed=0, reset_interval=None):
    return {
        "seed": seed, "total_steps": STEPS[-1], "device": "cpu", "run_dir": f"runs/{env}_{plasticity}_{seed}",
        "threads": None, "resume": True,
        "eval": {"every": 1000, "episodes": 5}, "log": {"every": 1000},
        "checkpoint": {"every": 100000, "keep": 3, "save_replay": True},
        "agent": {"name": "sac", "replay_ratio": 16, "layer_norm": True, "hidden_sizes": [256, 256],
                  "reset_interval": reset_interval},
        "env": {"kind": "dmc", "name": env, "domain": env.split("-")[0], "task": env.split("-")[1],
                "action_repeat": 1},
        "plasticity": {"name": plasticity, "coef": coef, "k": 2.0, "log_every": 16000, "cbp": False,
                       "er": plasticity in ("er", "l2_er")},
    }


def curve(final, seed):
    """Evaluation returns at STEPS ending at `final`, with a seed-dependent shape."""
    return [0.0, final * 0.3 + seed, final * (0.6 + 0.05 * seed), final]


def write_run(run_dir, cfg, evals, diagnostics=None, purge_step=None, with_config=True):
    writer = SummaryWriter(str(run_dir), purge_step=purge_step)
    if with_config:
        # The train script's format: the YAML of the resolved config, every line indented by four spaces.
        writer.add_text("config", "\n".join("    " + line for line in OmegaConf.to_yaml(cfg).splitlines()), 0)
    for step, value in evals.items():
        writer.add_scalar("eval/return_mean", value, step)
    for tag, points in (diagnostics or {}).items():
        for step, value in points.items():
            writer.add_scalar(tag, value, step)
    writer.close()


def diagnostics_of(scale, seed):
    out = {"value/overestimation": {s: scale * (1 + s / 1000) + seed for s in STEPS}}
    for net in ("actor", "critic"):
        out[f"plasticity/{net}/spectral_norm_max"] = {s: 1 + scale * s / 3000 for s in STEPS}
        out[f"plasticity/{net}/param_norm"] = {s: 10 + scale * s / 100 for s in STEPS}
        out[f"plasticity/{net}/grad_norm"] = {s: 0.1 + seed / 10 for s in STEPS}
        out[f"plasticity/{net}/dormant_fraction"] = {s: 0.05 * scale * s / 3000 for s in STEPS}
        out[f"plasticity/{net}/feature_effective_rank"] = {s: 200 - 20 * scale * s / 3000 for s in STEPS}
        out[f"plasticity/{net}/dead_units"] = {s: float(round(10 * scale * s / 3000)) for s in STEPS}
    return out


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """2 envs × 2 methods (sac+LN, sac+LN+spectral) × 8 seeds, plus one run with no evaluations."""
    root = tmp_path_factory.mktemp("runs")
    for (env, plasticity), finals in FINAL.items():
        for seed, final in enumerate(finals):
            cfg = config(env, plasticity, 1e-4 if plasticity == "spectral" else 0.0, seed)
            # Diagnostics in cheetah-run only: walker-run shows that a figure without data is skipped.
            diagnostics = diagnostics_of(1.0 if plasticity == "none" else 0.1, seed) if env == "cheetah-run" else {}
            write_run(root / env / plasticity / f"seed_{seed}", cfg, dict(zip(STEPS, curve(final, seed))), diagnostics)
    write_run(root / "broken", config(), {}, {"charts/sps": {0: 1.0}})
    out = root.parent / (root.name + "_report")
    assert main([str(root), "--out", str(out), "--reps", REPS]) == 0
    return root, out


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    image = matplotlib.image.imread(str(path))
    assert image.shape[0] > 200 and image.shape[1] > 300


def iqm_by_hand(values):
    """Interquartile mean of 8 values: mean of the middle four."""
    middle = sorted(values)[2:6]
    return sum(middle) / 4


def test_figures_and_files(suite, capsys):
    _, out = suite
    for env in ENVS:
        assert_png(out / f"curves_{env}.png")
    assert_png(out / "diagnostics_cheetah-run.png")
    assert not (out / "diagnostics_walker-run.png").exists()
    for name in ("final_performance.csv", "final_performance.md", "curves.csv", "runs.csv", "summary.md"):
        assert (out / name).is_file(), name
    summary = (out / "summary.md").read_text()
    assert "(curves_cheetah-run.png)" in summary and "(curves_walker-run.png)" in summary
    assert "(diagnostics_cheetah-run.png)" in summary
    assert "walker-run: no plasticity diagnostics logged" in summary
    assert "| cheetah-run | sac+LN | 8 |" in summary
    assert "broken" in summary and "no eval/return_mean" in summary


def test_final_table_matches_hand_computation(suite):
    _, out = suite
    rows = {(r["env"], r["method"]): r for r in read_csv(out / "final_performance.csv")}
    label = {"none": "sac+LN", "spectral": "sac+LN+spectral"}
    for (env, plasticity), finals in FINAL.items():
        row = rows[(env, label[plasticity])]
        assert int(row["runs"]) == 8
        assert float(row["iqm"]) == pytest.approx(iqm_by_hand(finals))
        assert float(row["mean"]) == pytest.approx(np.mean(finals))
        assert float(row["median"]) == pytest.approx((sorted(finals)[3] + sorted(finals)[4]) / 2)
        assert float(row["iqm_ci_low"]) <= float(row["iqm"]) <= float(row["iqm_ci_high"])
        assert min(finals) <= float(row["iqm_ci_low"]) and float(row["iqm_ci_high"]) <= max(finals)
        assert int(row["final_step_min"]) == int(row["final_step_max"]) == STEPS[-1]
    assert rows[("cheetah-run", "sac+LN")]["iqm"] and float(rows[("cheetah-run", "sac+LN")]["iqm"]) == 50.0
    # Aggregate across both envs: IQM of the 16 runs × envs scores = mean of the middle eight.
    for plasticity in ("none", "spectral"):
        agg = rows[("aggregate (2 envs)", label[plasticity])]
        pooled = sorted(FINAL[("cheetah-run", plasticity)] + FINAL[("walker-run", plasticity)])
        assert int(agg["runs"]) == 8
        assert float(agg["iqm"]) == pytest.approx(np.mean(pooled[4:12]))
        assert float(agg["iqm_ci_low"]) <= float(agg["iqm"]) <= float(agg["iqm_ci_high"])
    md = (out / "final_performance.md").read_text()
    assert "| cheetah-run | sac+LN | 8 | 50.0 |" in md


def test_curve_points_are_mean_and_standard_error(suite):
    _, out = suite
    rows = read_csv(out / "curves.csv")
    for env, plasticity, label in (("cheetah-run", "none", "sac+LN"), ("walker-run", "spectral", "sac+LN+spectral")):
        for i, step in enumerate(STEPS):
            values = np.array([curve(f, seed)[i] for seed, f in enumerate(FINAL[(env, plasticity)])])
            (row,) = [r for r in rows if r["env"] == env and r["method"] == label and int(r["step"]) == step]
            assert float(row["mean"]) == pytest.approx(values.mean())
            assert float(row["se"]) == pytest.approx(values.std(ddof=1) / np.sqrt(len(values)))
            assert int(row["runs"]) == 8


def test_last_k_averages_the_last_evaluations(suite, tmp_path):
    root, _ = suite
    out = tmp_path / "out"
    assert main([str(root / "walker-run"), "--out", str(out), "--reps", REPS, "--last-k", "2"]) == 0
    rows = {r["method"]: r for r in read_csv(out / "final_performance.csv")}
    finals = [np.mean(curve(f, seed)[-2:]) for seed, f in enumerate(FINAL[("walker-run", "none")])]
    assert float(rows["sac+LN"]["mean"]) == pytest.approx(np.mean(finals))
    assert not any(r.startswith("aggregate") for r in rows)  # one environment
    assert "mean of the last 2" in (out / "summary.md").read_text()


def test_sensitivity_over_plasticity_coef(tmp_path):
    root = tmp_path / "sweep"
    coefs = (1e-5, 1e-4, 1e-3, 1e-2)
    finals = {}
    for c, coef in enumerate(coefs):
        for seed in range(3):
            finals.setdefault(coef, []).append(100.0 * (c + 1) + 10 * seed)
            write_run(root / f"spectral_{coef}_{seed}", config(plasticity="spectral", coef=coef, seed=seed),
                      {1000: 0.0, 2000: finals[coef][-1]})
    for seed in range(3):
        write_run(root / f"none_{seed}", config(seed=seed), {1000: 0.0, 2000: 50.0 + seed})
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out), "--sweep", "plasticity.coef", "--reps", REPS]) == 0
    assert_png(out / "sensitivity_plasticity.coef_cheetah-run.png")
    rows = read_csv(out / "sensitivity_plasticity.coef.csv")
    swept = [r for r in rows if r["method"] == "sac+LN+spectral"]
    assert [float(r["value"]) for r in swept] == list(coefs)
    for r, coef in zip(swept, coefs):
        assert int(r["runs"]) == 3
        assert float(r["mean"]) == pytest.approx(np.mean(finals[coef]))
        assert float(r["se"]) == pytest.approx(np.std(finals[coef], ddof=1) / np.sqrt(3))
    (baseline,) = [r for r in rows if r["method"] == "sac+LN"]
    assert float(baseline["value"]) == 0.0 and float(baseline["mean"]) == pytest.approx(51.0)
    # In the table, every coefficient is a method of its own.
    methods = {r["method"] for r in read_csv(out / "final_performance.csv")}
    assert methods == {"sac+LN"} | {f"sac+LN+spectral (coef={c:g})" for c in coefs}
    assert "sensitivity_plasticity.coef_cheetah-run.png" in (out / "summary.md").read_text()


def test_aggregate_skipped_when_run_counts_differ(tmp_path):
    root = tmp_path / "runs"
    for env, seeds in (("cheetah-run", 3), ("walker-run", 2)):
        for seed in range(seeds):
            write_run(root / env / str(seed), config(env, seed=seed), {1000: float(seed)})
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out), "--reps", REPS]) == 0
    assert not any(r["env"].startswith("aggregate") for r in read_csv(out / "final_performance.csv"))
    assert "no aggregate row for sac+LN" in (out / "summary.md").read_text()


def test_resumed_run_merges_event_files(tmp_path):
    run = tmp_path / "run"
    write_run(run, config(), {0: 1.0, 1000: 2.0, 2000: 3.0, 3000: 4.0})
    write_run(run, config(), {2000: 30.0, 3000: 40.0, 4000: 50.0}, with_config=False)
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    scalars, text, _ = read_events(run)
    steps, values = scalars["eval/return_mean"]
    assert steps.tolist() == [0, 1000, 2000, 3000, 4000]
    assert values.tolist() == [1.0, 2.0, 30.0, 40.0, 50.0]  # the later file wins on duplicate steps
    assert "cheetah-run" in text
    # A resume with purge_step (as train.py does) drops what the dead process logged after it.
    purged = tmp_path / "purged"
    write_run(purged, config(), {0: 1.0, 1000: 2.0, 2000: 3.0, 3000: 4.0})
    write_run(purged, config(), {2000: 30.0}, purge_step=1001, with_config=False)
    steps, values = read_events(purged)[0]["eval/return_mean"]
    assert steps.tolist() == [0, 1000, 2000] and values.tolist() == [1.0, 2.0, 30.0]
    out = tmp_path / "out"
    assert main([str(run), "--out", str(out), "--reps", REPS]) == 0
    (row,) = read_csv(out / "runs.csv")
    assert int(row["final_step"]) == 4000 and float(row["final_return"]) == 50.0


def test_runs_csv_names_run_dirs_relative_to_the_working_directory(tmp_path, monkeypatch):
    """A report committed with its runs must not carry this machine's absolute paths."""
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path / "runs" / "a", config(), {0: 1.0, 1000: 2.0})
    assert main(["runs", "--out", "out", "--reps", REPS]) == 0
    (row,) = read_csv(tmp_path / "out" / "runs.csv")
    assert row["run_dir"] == str(Path("runs") / "a")
    monkeypatch.chdir(tmp_path / "out")  # runs not below the working directory: absolute
    assert main([str(tmp_path / "runs"), "--out", ".", "--reps", REPS]) == 0
    (row,) = read_csv(tmp_path / "out" / "runs.csv")
    assert row["run_dir"] == str((tmp_path / "runs" / "a").resolve())


def test_hydra_config_fallback_and_method_keys(tmp_path):
    root = tmp_path / "multi"
    (root / ".hydra").mkdir(parents=True)
    (root / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(config(plasticity="l2", coef=1e-3)))
    for seed in range(2):
        write_run(root / f"seed_{seed}", None, {1000: 10.0 * seed}, with_config=False)
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out), "--reps", REPS, "--method-keys", "agent.name,plasticity.coef"]) == 0
    runs = read_csv(out / "runs.csv")
    assert {r["method"] for r in runs} == {"name=sac coef=0.001"}
    assert sorted(r["seed"] for r in runs) == ["0", "1"]


def test_labels_pool_seeds_and_split_other_differences():
    from rl_plasticity.report import Run, flatten

    def run(env, **kw):
        return Run(Path("."), flatten(config(env, **kw)), "test", {}, env=env)

    runs = [run("cheetah-run", seed=0), run("cheetah-run", seed=1),
            run("cheetah-run", reset_interval=2560000), run("cheetah-run", reset_interval=1000),
            run("walker-run", plasticity="l2_er", coef=1e-3)]
    labels, order = method_labels(runs)
    assert labels == ["sac+LN", "sac+LN", "sac+LN+reset (reset_interval=2560000)",
                      "sac+LN+reset (reset_interval=1000)", "sac+LN+l2_er"]
    assert order == ["sac+LN", "sac+LN+l2_er", "sac+LN+reset (reset_interval=1000)",
                     "sac+LN+reset (reset_interval=2560000)"]
    labels, _ = method_labels(runs, exclude={"agent.reset_interval"})
    assert labels[2] == labels[3] == "sac+LN+reset"


def test_command_line(suite, tmp_path):
    root, _ = suite
    out = tmp_path / "cli"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "rl_plasticity.report", str(root / "walker-run"), "--out", str(out),
                             "--reps", REPS], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out / 'summary.md'}" in result.stdout
    assert_png(out / "curves_walker-run.png")

    missing = tmp_path / "no_such_dir"
    result = subprocess.run([sys.executable, "-m", "rl_plasticity.report", str(missing)], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: no such file or directory: {missing}"]


@pytest.mark.parametrize("case", ["missing", "empty", "no_eval", "bad_sweep"])
def test_errors(tmp_path, capsys, case):
    target = tmp_path / "runs"
    args = [str(target), "--out", str(tmp_path / "out")]
    if case == "empty":
        (target / "sub").mkdir(parents=True)
    elif case == "no_eval":
        write_run(target / "a", config(), {}, {"charts/sps": {0: 1.0}})
    elif case == "bad_sweep":
        write_run(target / "a", config(), {1000: 1.0})
        args += ["--sweep", "plasticity.cof"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    if case in ("missing", "empty", "no_eval"):
        assert str(target) in err[0]
    if case == "bad_sweep":
        assert "plasticity.coef" in err[0]


def test_runs_of_different_lengths_and_single_points_are_drawn_with_caveats(tmp_path, monkeypatch):
    """Issue 15, item 5: two runs of different lengths used to cut every curve and diagnostics panel
    at the shorter run's last step (here one point, drawn as an invisible line without markers)."""
    from rl_plasticity import report as report_module

    root = tmp_path / "runs"
    short = {1000: 10.0}
    long = {1000: 20.0, 2000: 40.0, 3000: 60.0}
    write_run(root / "ln_0", config(seed=0), short, {t: {1000: v[0]} for t, v in _diag_points(1).items()})
    write_run(root / "ln_1", config(seed=1), long, {t: dict(zip(STEPS[1:], v)) for t, v in _diag_points(3).items()})
    write_run(root / "spectral_0", config(plasticity="spectral", coef=1e-4), {2000: 7.0},
              {t: {2000: v[0]} for t, v in _diag_points(1).items()})
    figures = {}
    save = report_module.Report.save

    def keep(self, fig, name):
        figures[name] = fig
        return save(self, fig, name)

    monkeypatch.setattr(report_module.Report, "save", keep)
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out), "--reps", REPS]) == 0

    rows = [r for r in read_csv(out / "curves.csv") if r["method"] == "sac+LN"]
    assert [int(r["step"]) for r in rows] == [1000, 2000, 3000]     # to the longest run's end
    assert [int(r["runs"]) for r in rows] == [2, 1, 1]
    assert [float(r["mean"]) for r in rows] == [15.0, 40.0, 60.0]
    (single,) = [r for r in read_csv(out / "curves.csv") if r["method"] == "sac+LN+spectral"]
    assert int(single["step"]) == 2000 and int(single["runs"]) == 1
    # Every panel of both figures shows every method, with markers (a single point is visible).
    for name in ("curves_cheetah-run.png", "diagnostics_cheetah-run.png"):
        panels = [ax for ax in figures[name].axes if ax.get_visible()]
        assert len(panels) == (1 if name.startswith("curves") else 13)
        for ax in panels:
            drawn = [line for line in ax.get_lines() if np.isfinite(np.asarray(line.get_ydata(), float)).any()]
            assert len({line.get_color() for line in drawn}) == 2, (name, ax.get_title())
            assert all(line.get_marker() == "o" for line in drawn)
    legend = [t.get_text() for t in figures["curves_cheetah-run.png"].axes[0].get_legend().get_texts()]
    assert legend == ["sac+LN (n=2: too few for a reliable s.e.)", "sac+LN+spectral (n=1: no s.e., 1 point)"]
    # The table says that one or two runs give no meaningful interval.
    table = {r["method"]: r for r in read_csv(out / "final_performance.csv")}
    assert table["sac+LN"]["caveat"].startswith("2 runs: too few")
    assert table["sac+LN+spectral"]["caveat"].startswith("1 run: no spread")
    summary = (out / "summary.md").read_text()
    assert "| cheetah-run | sac+LN+spectral | 1 | 7.0 | none: 1 run † |" in summary
    assert "† Fewer than 3 runs" in summary
    assert "cheetah-run / sac+LN: its 2 runs end at steps 1,000, 3,000; after step 1,000 the curve averages" in summary
    assert "cheetah-run / sac+LN+spectral: one logged point (step 2,000)" in summary


def _diag_points(n):
    return {tag: [float(i + 1) for i in range(n)] for tag in diagnostics_of(1.0, 0)}


def test_return_per_task_of_a_non_stationary_env(tmp_path):
    """Each run's mean return within each of its tasks (from its own `env/task` scalar, logged at
    episode ends, so runs switch at different steps), then mean ± s.e. over the runs that finished
    the task; a stopped run counts only in the tasks it finished, a finished one in all."""
    root = tmp_path / "runs"

    def write(name, cfg, episodes, last_log):
        """episodes: (end step, task, return) of each episode."""
        writer = SummaryWriter(str(root / name))
        writer.add_text("config", "\n".join("    " + line for line in OmegaConf.to_yaml(cfg).splitlines()), 0)
        for step, task, value in episodes:
            writer.add_scalar("charts/episode_return", value, step)
            writer.add_scalar("env/task", float(task), step)
        writer.add_scalar("charts/sps", 1.0, last_log)
        writer.close()

    # The env switches task at steps 1,000 and 2,000; an episode's end logs the task it ran in.
    write("none_0", config(seed=0), [(400, 0, 10), (800, 0, 20), (1200, 1, 30), (1600, 1, 50),
                                     (2400, 2, 70), (2900, 2, 90)], 3000)     # finished (total_steps 3,000)
    write("none_1", config(seed=1), [(500, 0, 20), (900, 0, 40), (1100, 0, 60), (1700, 1, 10),
                                     (2100, 2, 30), (2800, 2, 50)], 3000)     # switched at 1,700 and 2,100
    write("none_2", config(seed=2), [(400, 0, 0), (800, 0, 100), (1300, 1, 60), (1500, 1, 0)], 1600)  # stopped
    write("spectral_0", config(plasticity="spectral", coef=1e-4),
          [(400, 0, 5), (800, 0, 5), (1200, 1, 6), (1600, 1, 8), (2400, 2, 9), (2900, 2, 11)], 3000)
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out), "--reps", REPS, "--metric", "charts/episode_return"]) == 0

    rows = {(r["method"], int(r["task"])): r for r in read_csv(out / "task_returns.csv")}
    assert sorted(rows) == [("sac+LN", k) for k in (1, 2, 3)] + [("sac+LN+spectral", k) for k in (1, 2, 3)]
    # sac+LN: task 1 finished by all three runs (means 15, 40, 50); task 2 by two (40, 10): the
    # stopped run began it but stopped in it; task 3 by the two finished runs (80, 40).
    for task, means, first, last in ((1, [15, 40, 50], 0, 0), (2, [40, 10], 1200, 1700),
                                     (3, [80, 40], 2100, 2400)):
        row = rows[("sac+LN", task)]
        assert (int(row["start_step_first"]), int(row["start_step_last"])) == (first, last)
        assert int(row["runs"]) == len(means) and int(row["runs_in_method"]) == 3
        assert float(row["mean"]) == pytest.approx(np.mean(means))
        assert float(row["se"]) == pytest.approx(np.std(means, ddof=1) / np.sqrt(len(means)))
    assert [float(rows[("sac+LN+spectral", k)]["mean"]) for k in (1, 2, 3)] == [5.0, 7.0, 10.0]
    assert rows[("sac+LN+spectral", 1)]["se"] == "nan"
    assert_png(out / "task_returns_cheetah-run.png")
    summary = (out / "summary.md").read_text()
    assert "## Return per task" in summary
    assert "| method | runs | task 1 (from 0) | task 2 (from 1,200) | task 3 (from 2,100) |" in summary
    assert "| sac+LN | 3 | 35.0 ± 10.4 | 25.0 ± 15.0 (n=2) | 60.0 ± 20.0 (n=2) |" in summary
    assert "cheetah-run / sac+LN: not all of its 3 runs finished every task" in summary
    # Final returns at the last episode: unequal budgets only because one run stopped; the
    # spectral run's last episode ends at 2,900 of its 3,000 steps and counts as finished.
    assert "cheetah-run / sac+LN: runs end at different steps (1,500 to 2,900)" in summary


def test_finished_runs_whose_last_episodes_end_at_different_steps_compare_equal_budgets(tmp_path):
    root = tmp_path / "runs"
    for seed, last in ((0, 2900), (1, 2750)):
        writer = SummaryWriter(str(root / f"seed_{seed}"))
        writer.add_text("config", "\n".join("    " + line for line in OmegaConf.to_yaml(config(seed=seed)).splitlines()), 0)
        for step in (1000, 2000, last):
            writer.add_scalar("charts/episode_return", float(step), step)
        writer.add_scalar("charts/sps", 1.0, 3000)  # both reached total_steps
        writer.close()
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out), "--reps", REPS, "--metric", "charts/episode_return"]) == 0
    assert "runs end at different steps" not in (out / "summary.md").read_text()


def test_no_return_per_task_for_a_stationary_env(suite):
    _, out = suite
    assert not (out / "task_returns.csv").exists()
    assert "## Return per task" not in (out / "summary.md").read_text()


def test_dense_curves_are_drawn_as_bin_means(tmp_path):
    """An online return logged at every episode end (thousands of points) is averaged within bins
    before the mean over runs: 100 bins of 1,000 steps up to 99,999 here, centres at 500, 1,500, ..."""
    from rl_plasticity.report import bin_series, bin_width

    assert [bin_width(x) for x in (99_999, 100_000, 100_001, 499_996, 37)] == [1000, 1000, 2000, 5000, 1]
    steps = np.array([10, 20, 990, 1000, 2500])
    centres, means = bin_series((steps, np.array([1.0, 2.0, 3.0, 10.0, 7.0])), 1000)
    assert centres.tolist() == [500.0, 1500.0, 2500.0] and means.tolist() == [2.0, 10.0, 7.0]

    root = tmp_path / "runs"
    rng = np.random.default_rng(0)
    for seed in (0, 1):
        writer = SummaryWriter(str(root / f"seed_{seed}"))
        writer.add_text("config", "\n".join("    " + line for line in OmegaConf.to_yaml(config(seed=seed)).splitlines()), 0)
        for step in np.sort(rng.choice(np.arange(1, 100_000), 800, replace=False)):
            writer.add_scalar("charts/episode_return", float(step // 1000 + seed), int(step))
        writer.close()
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out), "--reps", REPS, "--metric", "charts/episode_return"]) == 0
    rows = read_csv(out / "curves.csv")
    assert len(rows) <= 100 and all(float(r["step"]) % 1000 == 500 for r in rows)
    # Every value in bin k is k + seed: the mean over the two seeds is k + 0.5 wherever both have data.
    assert all(float(r["mean"]) == pytest.approx(float(r["step"]) // 1000 + 0.5) for r in rows if r["runs"] == "2")
    assert "averaged within bins of 1,000 steps" in (out / "summary.md").read_text()


def test_iqm_interval_of_an_entry_depends_on_its_scores_alone():
    """The bootstrap is seeded per entry: the same scores give the same interval whether they are
    bootstrapped alone, first or after other entries, whatever NumPy's global generator drew
    before, and the caller's global generator state is left as it was."""
    from rl_plasticity.report import iqm_intervals
    rng = np.random.default_rng(3)
    a, b, c = (rng.normal(size=(5, 1)) for _ in range(3))
    alone = iqm_intervals({"a": a}, 500, 0)["a"]
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    assert iqm_intervals({"a": a}, 500, 0)["a"] == alone
    assert (np.random.get_state()[1] == before).all()
    assert iqm_intervals({"a": a, "b": b}, 500, 0)["a"] == alone
    assert iqm_intervals({"c": c, "b": b, "a": a}, 500, 0)["a"] == alone
    assert alone[1] <= alone[0] <= alone[2]
