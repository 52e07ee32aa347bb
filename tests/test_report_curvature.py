"""The report's curvature figures (issue 18, part 5) on synthetic runs whose curvature values and
Hessian spectra are chosen here: every plotted point and density is checked against what was logged."""
import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from rl_plasticity.plasticity.curvature import Spectrum, density_histogram
from rl_plasticity.report import main, parse_density_tasks
from tests.test_report import REPS, assert_png, config, read_csv, write_run

STEPS = (1000, 2000, 3000, 4000)
TASK = {1000: 0.0, 2000: 0.0, 3000: 1.0, 4000: 1.0}   # env/task: the env switches task at step 3000
# Task starts of every run: the env's switch (3000) and, for the reset arm, a reset at 2000.
TASK_STARTS = {"none": (1000, 3000), "reset": (1000, 2000, 3000)}
# The Hessian spectrum at the k-th task start: two eigenvalues, moving apart with k.
NODES = {0: (0.0, 1.0), 1: (0.0, 4.0), 2: (0.0, 9.0)}


def fisher(method, seed, step):
    return (0.9 if method == "reset" else 1.0) - step / 10_000 + seed / 100


def write_curvature(run_dir, method, seed):
    writer = SummaryWriter(str(run_dir))
    for step in STEPS:
        for net in ("critic", "actor"):
            writer.add_scalar(f"curvature/{net}/fisher_rank", fisher(method, seed, step), step)
            writer.add_scalar(f"curvature/{net}/sharpness", 10.0 * step / 1000 + seed, step)
        writer.add_scalar("env/task", TASK[step], step)
    for k, step in enumerate(TASK_STARTS[method]):
        writer.add_scalar("curvature_task/change", 1.0, step)
        for net in ("critic", "actor"):
            writer.add_scalar(f"curvature_task/{net}/fisher_rank", fisher(method, seed, step), step)
            spectrum = Spectrum([torch.tensor(NODES[k], dtype=torch.float64)],
                                [torch.tensor([0.75, 0.25], dtype=torch.float64)], dim=100)
            limits, counts = density_histogram(spectrum)
            writer.add_histogram_raw(f"curvature_task/{net}/hessian_density", min=float(limits[0]),
                                     max=float(limits[-1]), num=float(counts.sum()), sum=0.0, sum_squares=0.0,
                                     bucket_limits=limits.tolist(), bucket_counts=counts.tolist(), global_step=step)
    writer.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from rl_plasticity import report as report_module

    root = tmp_path_factory.mktemp("runs")
    for method, reset in (("none", None), ("reset", 1000)):
        for seed in range(2):
            run = root / method / f"seed_{seed}"
            write_run(run, config(seed=seed, reset_interval=reset), {s: float(s) for s in STEPS})
            write_curvature(run, method, seed)
    figures = {}
    save = report_module.Report.save

    def keep(self, fig, name):
        figures[name] = fig
        return save(self, fig, name)

    out = tmp_path_factory.mktemp("out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report_module.Report, "save", keep)
        assert main([str(root), "--out", str(out), "--reps", REPS]) == 0
    return out, figures


LABELS = {"none": "sac+LN", "reset": "sac+LN+reset"}


def test_curvature_curves_are_the_mean_over_seeds_of_what_was_logged(report):
    out, figures = report
    for name in ("curvature_cheetah-run.png", "curvature_task_cheetah-run.png", "hessian_density_cheetah-run.png"):
        assert_png(out / name)
    rows = read_csv(out / "curvature.csv")
    for method, label in LABELS.items():
        got = [(int(r["step"]), float(r["mean"])) for r in rows
               if r["method"] == label and r["tag"] == "curvature/critic/fisher_rank"]
        assert [s for s, _ in got] == list(STEPS)
        assert [v for _, v in got] == pytest.approx([np.mean([fisher(method, seed, s) for seed in range(2)])
                                                     for s in STEPS])
        task = [int(r["step"]) for r in rows if r["method"] == label and r["tag"] == "curvature_task/actor/fisher_rank"]
        assert task == list(TASK_STARTS[method])
        se = [float(r["se"]) for r in rows if r["method"] == label and r["tag"] == "curvature/actor/sharpness"]
        assert se == pytest.approx([np.std([0.0, 1.0], ddof=1) / np.sqrt(2)] * len(STEPS))
    # One panel per (network, metric with data), titled by network; critic first.
    panels = [ax for ax in figures["curvature_cheetah-run.png"].axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["critic: empirical-Fisher rank (srank₉₉ / max)",
                                                 "critic: sharpness λ_max", "actor: empirical-Fisher rank (srank₉₉ / max)",
                                                 "actor: sharpness λ_max"]
    first = panels[0]
    means = {tuple(np.round(line.get_ydata(), 6)) for line in first.get_lines() if line.get_marker() == "o"}
    assert means == {tuple(np.round([np.mean([fisher(m, 0, s), fisher(m, 1, s)]) for s in STEPS], 6)) for m in LABELS}
    # Task changes: the env's switch at 3000 in grey (once); each method's measured task starts dotted in
    # its colour: 1000 and 3000 for both, the reset arm's reset at 2000.
    colors = {line.get_label(): line.get_color() for line in first.get_lines() if line.get_marker() == "o"}
    vertical = sorted((line.get_xdata()[0], line.get_linestyle(), line.get_color())
                      for line in first.get_lines() if line.get_marker() != "o")
    assert vertical == sorted([(x, ":", colors[label]) for label, starts in
                               (("sac+LN", (1000, 3000)), ("sac+LN+reset", (1000, 2000, 3000))) for x in starts]
                              + [(3000, "-", "0.5")])
    legend = [t.get_text() for t in figures["curvature_cheetah-run.png"].legends[0].get_texts()]
    assert legend == ["sac+LN (n=2)", "sac+LN+reset (n=2)", "env task change",
                      "curvature measured at a task start (method's colour)"]
    summary = (out / "summary.md").read_text()
    assert "![cheetah-run: curvature, at task starts](curvature_task_cheetah-run.png)" in summary
    assert "![cheetah-run: Hessian density](hessian_density_cheetah-run.png)" in summary


def test_hessian_density_at_first_middle_and_last_task_start(report):
    out, figures = report
    rows = read_csv(out / "hessian_density.csv")
    for method, label in LABELS.items():
        starts = TASK_STARTS[method]
        chosen = {"first": 0, "middle": (len(starts) - 1) // 2, "last": len(starts) - 1}
        lines = {}
        for r in rows:
            if r["method"] == label and r["network"] == "critic":
                lines.setdefault(r["index"], []).append((float(r["eigenvalue"]), float(r["density"]), r))
        assert sorted(lines, key=int) == sorted({str(k + 1) for k in chosen.values()}, key=int)
        for k in set(chosen.values()):
            points = lines[str(k + 1)]
            assert {p[2]["steps"] for p in points} == {f"{starts[k]:,}"} and {p[2]["runs"] for p in points} == {"2"}
            x = np.array([p[0] for p in points])
            y = np.array([p[1] for p in points])
            # A density: it integrates to one, and its mass sits at the logged eigenvalues (0: 3/4, top: 1/4).
            assert np.trapezoid(y, x) == pytest.approx(1.0, abs=0.03)
            top = NODES[k][1]
            assert np.trapezoid(np.where(x > top / 2, y, 0), x) == pytest.approx(0.25, abs=0.03)
            assert x[np.argmax(np.where(x > top / 2, y, 0))] == pytest.approx(top, abs=0.1 * top)
    # One panel per (network, method): rows critic, actor; one line per chosen task start.
    fig = figures["hessian_density_cheetah-run.png"]
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [f"{m}: {n}" for n in ("critic", "actor") for m in LABELS.values()]
    assert [len(ax.get_lines()) for ax in fig.axes] == [2, 3, 2, 3]  # the none arm has 2 task starts
    assert all(ax.get_yscale() == "log" and ax.get_xlabel() == "Hessian eigenvalue λ" for ax in fig.axes)


def test_density_tasks_option(tmp_path, report):
    root = tmp_path / "runs"
    write_run(root / "r", config(seed=0, reset_interval=1000), {s: float(s) for s in STEPS})
    write_curvature(root / "r", "reset", 0)
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out), "--reps", REPS, "--density-tasks", "2,-1,7"]) == 0
    rows = read_csv(out / "hessian_density.csv")
    assert {(r["index"], r["steps"]) for r in rows} == {("2", "2,000"), ("3", "3,000")}  # 7: no such task start
    assert parse_density_tasks("first, -2,last") == ["first", -2, "last"]
    with pytest.raises(SystemExit):
        parse_density_tasks("0")


def test_runs_without_curvature_get_no_curvature_figures(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "r", config(seed=0), {s: float(s) for s in STEPS})
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out), "--reps", REPS]) == 0
    assert not list(out.glob("curvature*")) and not list(out.glob("hessian_density*"))
