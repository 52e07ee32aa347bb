"""The papers' effects at CPU scale (issue 14, part 3): run a study's arms over seeds, then the report.

A study is a list of arms, each an experiment preset of `configs/experiment/` (the paper's
settings for that arm), composed with a CPU-scale preset that shortens the run, so every run is
the package's real command line:

    python -m rl_plasticity.train '+experiment=[<arm preset>,<scale preset>]' seed=<s> run_dir=<runs>/<arm>/seed_<s>

Studies:

- `slippery-ant`: PPO on Slippery Ant, plain backprop (BP) against L2 and L2-ER with the
  best settings of Table 7 of spectral-collapse-l2-er.md (presets `ppo_bp`, `ppo_l2`,
  `ppo_l2_er`), shortened by `cpu_slippery_ant` (a friction change every 100k steps instead of
  2M, five frictions);
- `continual-dmc`: SAC (spectral-regularization.md §5.4 settings) on continual DMC, none against
  spectral, full resets, shrink-and-perturb and ReDo (presets `sac_layernorm`, `sac_spectral`,
  `sac_reset`, `sac_shrink_perturb`, `sac_redo`), shortened by `cpu_continual_dmc` (walker-walk
  and walker-run alternating, 15k steps each, twice; replay ratio 2; the reset and
  shrink-and-perturb periods scaled to one task).

PPO trains several seeds faster in one process (`--seeds-per-process`, train's `num_seeds`: the
seeds' minibatch steps are batched; about 2× at 4 seeds on a 2-core CPU, benchmarks/README.md).
Each run's directory is kept (`--runs`, default `runs/reproduce/<study>`, outside git); a run that
was interrupted continues from its newest checkpoint when the command is given again (train's
`resume=true`), and a finished run is not run again.  Every run's TensorBoard event files (not
its checkpoints: about 0.1 MB for a continual-DMC run, 2.3 MB for a Slippery Ant seed) are copied
into `--out`/events/<arm>/seed_<s>/, which git keeps, and `python -m rl_plasticity.report` draws the study's figures and tables from that
copy into `--out` (default `benchmarks/results/reproduce/<study>`): a report can be redrawn, and a
study completed, on a machine that no longer has the run dirs.
What each study is expected to show, written before it was run, and what it showed, are in
benchmarks/README.md ("The papers' effects at CPU scale").

    python benchmarks/reproduce.py slippery-ant --seeds 0 1 2 --seeds-per-process 3 --jobs 2
    python benchmarks/reproduce.py continual-dmc --seeds 0 1 2 --jobs 2 --arms none spectral
    python benchmarks/reproduce.py continual-dmc --report-only
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from rl_plasticity.rundir import EVENT_PREFIX, shown_path

REPO = Path(__file__).resolve().parent.parent

# study -> (scale preset, report metric, {arm: (arm preset, the arm's own scaled overrides)})
STUDIES: dict[str, tuple[str, str, dict[str, tuple[str, tuple[str, ...]]]]] = {
    "slippery-ant": ("cpu_slippery_ant", "charts/episode_return",
                     {"bp": ("ppo_bp", ()), "l2": ("ppo_l2", ()), "l2_er": ("ppo_l2_er", ())}),
    "continual-dmc": ("cpu_continual_dmc", "eval/return_mean",
                      {"none": ("sac_layernorm", ()),
                       "spectral": ("sac_spectral", ()),
                       # sac_reset resets every 160k env steps at replay ratio 16 (about six times in
                       # 1M steps); here once per task's worth of updates (15k steps at ratio 2).
                       "reset": ("sac_reset", ("agent.reset_interval=30000",)),
                       # at every task change (its preset's period, 2.56M updates, is never reached)
                       "shrink_perturb": ("sac_shrink_perturb", ()),
                       "redo": ("sac_redo", ())}),
}

# study -> {report subfolder: metric}: further reports beside the main one.  Slippery Ant's online
# return alone cannot tell a policy that walks from one that ends its episodes early (the Ant
# terminates when its torso leaves 0.2-1.0 m, and every step costs control), so its episode
# lengths get a report too.
EXTRA_METRICS: dict[str, dict[str, str]] = {"slippery-ant": {"episode_length": "charts/episode_length"}}


def command(study: str, arm: str, seeds: Sequence[int], run_dir: Path, extra: Sequence[str] = ()) -> list[str]:
    """The train command of one process: consecutive `seeds` (several: train's `num_seeds`, each in
    `run_dir/seed_<s>/`), one thread."""
    scale, _, arms = STUDIES[study]
    preset, scaled = arms[arm]
    several = [f"num_seeds={len(seeds)}"] if len(seeds) > 1 else []
    return [sys.executable, "-m", "rl_plasticity.train", f"+experiment=[{preset},{scale}]", *scaled,
            f"seed={seeds[0]}", *several, f"run_dir={run_dir}", "threads=1", *extra]


def process_dir(runs: Path, arm: str, seeds: Sequence[int]) -> Path:
    return runs / arm / (f"seed_{seeds[0]}" if len(seeds) == 1 else f"seeds_{seeds[0]}-{seeds[-1]}")


def chunks(seeds: Sequence[int], per_process: int) -> list[list[int]]:
    """Seeds in groups of `per_process`, each group consecutive (train's seed..seed+N-1)."""
    seeds = sorted(seeds)
    groups: list[list[int]] = []
    for s in seeds:
        if groups and len(groups[-1]) < per_process and s == groups[-1][-1] + 1:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def finished(run_dir: Path, seeds: int = 1) -> bool:
    """A process whose train.log ends with train's closing line per seed ('done: ...' for one
    seed, 'done (seed s): ...' for each of several)."""
    log = run_dir / "train.log"
    if not log.exists():
        return False
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return len(lines) >= seeds and all(ln.startswith("done") for ln in lines[-seeds:])


def run_one(study: str, arm: str, seeds: Sequence[int], runs: Path, extra: Sequence[str]) -> str:
    run_dir = process_dir(runs, arm, seeds)
    what = f"{arm} seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}"
    if finished(run_dir, len(seeds)):
        return f"{what}: finished before, skipped"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(study, arm, seeds, run_dir, extra)
    env = dict(os.environ, OMP_NUM_THREADS="1", MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    start = time.time()
    out_file = run_dir.parent / f"{run_dir.name}.out"
    with open(out_file, "a") as out:
        out.write("$ " + shlex.join(cmd) + "\n")
        out.flush()
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
    minutes = (time.time() - start) / 60
    if rc != 0:
        return f"{what}: FAILED (exit {rc}, {minutes:.1f} min); see {out_file}"
    return f"{what}: done in {minutes:.1f} min"


def task_metrics(study: str) -> dict[str, str]:
    """{task: its eval tag} for a scale preset that evaluates every task of continual DMC
    (`eval.all_tasks`), read from the preset itself; {} otherwise."""
    from omegaconf import OmegaConf

    from rl_plasticity.names import eval_task_tag

    preset = OmegaConf.load(REPO / "configs" / "experiment" / f"{STUDIES[study][0]}.yaml")
    if not OmegaConf.select(preset, "eval.all_tasks", default=False):
        return {}
    return {task: eval_task_tag(task) for task in OmegaConf.select(preset, "env.tasks")}


def archive_events(runs: Path, archive: Path) -> int:
    """Copy the event files of every run dir under `runs` to the same relative place under
    `archive`; returns the number of run dirs copied.  A run dir's copy is replaced as a whole (an
    event file no longer in the run dir, e.g. of a run deleted and started again, is removed from
    the copy, so the report does not merge two runs); copies of run dirs not present are kept."""
    from rl_plasticity.report import find_run_dirs

    if not runs.is_dir():
        return 0
    run_dirs = find_run_dirs(runs)
    for run_dir in run_dirs:
        events = sorted(f.name for f in run_dir.glob(EVENT_PREFIX + "*"))
        dest = archive / run_dir.relative_to(runs)
        dest.mkdir(parents=True, exist_ok=True)
        for stale in dest.glob(EVENT_PREFIX + "*"):
            if stale.name not in events:
                stale.unlink()
        for name in events:
            shutil.copy2(run_dir / name, dest / name)
    return len(run_dirs)


def report(study: str, runs: Path, out: Path, last_k: int) -> int:
    """`python -m rl_plasticity.report` on the study's runs (figures, tables, diagnostics); for a
    study evaluated on every task, the report of each task's evaluation in `<out>/<task>/` too, and
    one per EXTRA_METRICS entry in `<out>/<name>/`."""
    metrics = {"": STUDIES[study][1], **task_metrics(study), **EXTRA_METRICS.get(study, {})}
    rc = 0
    for sub, metric in metrics.items():
        cmd = [sys.executable, "-m", "rl_plasticity.report", shown_path(runs, REPO),
               "--out", shown_path(out / sub, REPO), "--metric", metric, "--last-k", str(last_k)]
        print("$ " + shlex.join(cmd), flush=True)
        rc |= subprocess.run(cmd, cwd=REPO).returncode
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=sorted(STUDIES))
    p.add_argument("--arms", nargs="+", default=None, help="default: every arm of the study")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="processes side by side (one thread each)")
    p.add_argument("--seeds-per-process", type=int, default=1,
                   help="consecutive seeds trained in one process (train's num_seeds; PPO batches them)")
    p.add_argument("--runs", type=Path, default=None, help="run dirs (default runs/reproduce/<study>)")
    p.add_argument("--out", type=Path, default=None,
                   help="report output (default benchmarks/results/reproduce/<study>)")
    p.add_argument("--last-k", type=int, default=5, help="report's final score: mean of the last K evaluations")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: copy the event files of the runs present, then draw the report")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--train", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra train overrides for every run (e.g. a tiny total_steps for a test)")
    args = p.parse_args(argv)
    arms = STUDIES[args.study][2]
    chosen = args.arms or list(arms)
    unknown = [a for a in chosen if a not in arms]
    if unknown:
        p.error(f"--arms: unknown arm '{unknown[0]}' of study {args.study}; valid choices: {', '.join(arms)}")
    runs = (args.runs or REPO / "runs" / "reproduce" / args.study).resolve()
    out = (args.out or REPO / "benchmarks" / "results" / "reproduce" / args.study).resolve()
    jobs = [(a, group) for group in chunks(args.seeds, max(1, args.seeds_per_process)) for a in chosen]
    if args.dry_run:
        for a, group in jobs:
            print(shlex.join(command(args.study, a, group, process_dir(runs, a, group), args.train)))
        return 0
    failed = False
    if not args.report_only:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for line in pool.map(lambda j: run_one(args.study, j[0], j[1], runs, args.train), jobs):
                print(line, flush=True)
                failed |= "FAILED" in line
    archive = out / "events"
    copied = archive_events(runs, archive)
    print(f"event files of {copied} run dir(s) of {runs} copied to {archive}", flush=True)
    rc = report(args.study, archive, out, args.last_k)
    return 1 if failed or rc else 0


if __name__ == "__main__":
    sys.exit(main())
