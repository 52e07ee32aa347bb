"""Learning parity: this package's SAC against Stable-Baselines3 SAC at equal budget.

Every run trains one agent on one DMC task for `--steps` env steps with the same schedule on
both sides: `--prefill` uniformly random actions first, then `--replay-ratio` gradient updates
per env step on batches of 256 drawn uniformly from a replay buffer that never overflows
(capacity = `--steps`), 2x256 ReLU MLPs, Adam 3e-4 for actor, critics and temperature,
γ 0.99, τ 0.005, automatic temperature from 1.0 towards entropy −|A|.  Evaluation is the same
code for both (`rl_plasticity.loops.evaluate`): `--eval-episodes` episodes of the deterministic
policy tanh(mean) on a separate env, episode k reset with seed + 1,000,000 + k, every
`--eval-every` env steps (default 1,000) and at the end.  Each run gets two scores: `last`, the
mean of its evaluations in the last `--last-fraction` of training (default 0.2: at 16k, 17k, …, 20k
of 20k steps), and `final`, the last evaluation alone.  At CPU budgets a policy can swing between
consecutive evaluations (cheetah-run, `ours_paper` seed 0: 67 at 19k, 0.3 at 20k), so one snapshot
decides `final` and five decide `last`; the window is a share of training, not a number of
evaluations, so that runs evaluated at another cadence are scored over the same stage of training.

Arms (`--arms`):

- `sb3`: `stable_baselines3.SAC("MlpPolicy", ...)`, two critics, no LayerNorm (its defaults);
- `ours_peer`: `python -m rl_plasticity.train agent.num_critics=2 agent.layer_norm=false`, the
  peer's configuration, so that a difference to `sb3` is an implementation effect;
- `ours_paper`: the paper's configuration (one critic, LayerNorm; spectral-regularization.md
  App. B), so that `ours_peer` against `ours_paper` is a configuration effect;
- `ours_1critic_noln`, `ours_2critic_ln`: the two configurations between `ours_peer` and
  `ours_paper`, one setting changed each, so that a configuration effect is split into the
  critics' and LayerNorm's part;
- ablations of ours (see `ARMS`): the autograd reference path, sequential updates, SB3's
  log σ parameterisation.

Our arms run through the package's real command line (one `rl_plasticity.train` subprocess per
run, `threads=1`), their curve read from the run's TensorBoard `eval/return_mean`; SB3 runs in a
subprocess of this script.  Each run writes `<out>/per_run/<task>/<arm>/seed_<s>.json` (curve,
final return, wall time, command); a run whose file exists is skipped, so an interrupted grid
resumes and a partial grid can be completed later.  The summary (`summary.md`,
`final_returns.csv`, `curves.csv`, `curves_<task>.png`) is rebuilt from all result files present:
mean ± standard error and IQM with a 95% stratified-bootstrap CI (rl_plasticity.report's own
functions) of both scores per task and arm, and over tasks where an arm has the same seeds on
every task.

    python benchmarks/learning_parity.py --tasks cheetah-run walker-walk cartpole-swingup \\
        --seeds 0 1 2 3 4 --steps 20000 --replay-ratio 4 --prefill 5000 --eval-every 1000 --jobs 2
    python benchmarks/learning_parity.py --summarise-only --out benchmarks/results/learning_parity
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "learning_parity"

# Our arms are `rl_plasticity.train` overrides on top of the shared budget; `sb3` arms are
# keyword arguments of SB3's SAC policy.
ARMS: dict[str, dict[str, Any]] = {
    "sb3": {"kind": "sb3", "n_critics": 2,
            "what": "Stable-Baselines3 SAC, 2 critics, no LayerNorm"},
    "ours_peer": {"kind": "ours", "overrides": ["agent.num_critics=2", "agent.layer_norm=false"],
                  "what": "rl_plasticity SAC, 2 critics, no LayerNorm (the peer's configuration)"},
    "ours_paper": {"kind": "ours", "overrides": ["agent.num_critics=1", "agent.layer_norm=true"],
                   "what": "rl_plasticity SAC, 1 critic, LayerNorm (the paper's configuration)"},
    # The configuration between ours_peer and ours_paper, one difference at a time.
    "ours_1critic_noln": {"kind": "ours", "overrides": ["agent.num_critics=1", "agent.layer_norm=false"],
                          "what": "rl_plasticity SAC, 1 critic, no LayerNorm"},
    "ours_2critic_ln": {"kind": "ours", "overrides": ["agent.num_critics=2", "agent.layer_norm=true"],
                        "what": "rl_plasticity SAC, 2 critics, LayerNorm"},
    # Ablations of the peer configuration (one implementation difference each).
    "ours_peer_autograd": {"kind": "ours", "overrides": ["agent.num_critics=2", "agent.layer_norm=false",
                                                         "agent.fused=false"],
                           "what": "ours_peer on the autograd reference update (agent.fused=false)"},
    "ours_peer_seq": {"kind": "ours", "overrides": ["agent.num_critics=2", "agent.layer_norm=false",
                                                    "agent.fused=false"], "patches": ["sequential"],
                      "what": "ours_peer_autograd with SB3's order: temperature, then critic step, then the "
                              "actor's loss through the updated critic"},
    "ours_peer_sb3actor": {"kind": "ours", "overrides": ["agent.num_critics=2", "agent.layer_norm=false",
                                                         "agent.fused=false"], "patches": ["sb3_actor"],
                           "what": "ours_peer_autograd with SB3's actor: log σ = clamp(raw, -20, 2) (ours: tanh "
                                   "squash into [-5, 2]) and log(1 - tanh(u)² + 1e-6) in log π"},
    "sb3_1critic": {"kind": "sb3", "n_critics": 1,
                    "what": "Stable-Baselines3 SAC, 1 critic, no LayerNorm"},
}


# ----------------------------------------------------------------------------------------------
# Ablation patches of our SAC (autograd path only): applied in the training process before
# rl_plasticity.train runs, so that the package itself keeps one implementation.
# ----------------------------------------------------------------------------------------------
def _patch_sequential() -> None:
    """SB3's order within one update: temperature step; critic step on the TD target (old α);
    then the actor's loss through the *updated* critic, actor step; then the target critic."""
    import torch

    from rl_plasticity.agents import sac
    from rl_plasticity.agents.formulas import actor_loss as sac_actor_loss
    from rl_plasticity.agents.formulas import critic_td_loss, min_over_critics, temperature_loss

    def update_once(self, obs, action, reward, next_obs, terminated, noise):
        alpha = self.log_alpha.detach().exp()
        new_action, log_prob = self.actor.sample(obs, noise[1])
        alpha_loss = temperature_loss(self.log_alpha, log_prob.detach(), self.target_entropy)
        target = self.td_target(reward, next_obs, terminated, alpha, noise[0])
        q = self.critic(obs, action)
        critic_loss = critic_td_loss(q, target)[0]
        self.optimizer.zero_grad(set_to_none=True)
        (critic_loss + alpha_loss).backward()   # no actor gradients: Adam steps critic and α only
        self.optimizer.step()
        q_pi = min_over_critics(self.critic(obs, new_action, detached=True))
        actor_loss = sac_actor_loss(alpha, log_prob, q_pi)
        self.optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()                   # actor gradients only
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self._target_params, self._critic_params, self.cfg.tau)
        self.update_count += 1
        self.plasticity_after_update((obs, action))
        return {"losses/critic": critic_loss.detach(), "losses/actor": actor_loss.detach(),
                "losses/alpha": alpha_loss.detach(), "value/alpha": alpha, "value/q_mean": q.detach().mean(),
                "value/entropy": -log_prob.detach().mean()}

    sac.SACAgent._update_once = update_once


def _patch_sb3_actor() -> None:
    """SB3's squashed Gaussian: log σ hard-clamped to [-20, 2], log π with log(1 - a² + 1e-6)."""
    import math

    import torch

    from rl_plasticity.agents import networks

    def distribution_params(self, obs):
        mean, raw = self.net(obs).chunk(2, dim=-1)
        return mean, raw.clamp(-20.0, 2.0)

    def sample(self, obs, noise=None, generator=None):
        mean, log_std = self.distribution_params(obs)
        if noise is None:
            noise = torch.randn(mean.shape, device=mean.device, generator=generator)
        u = torch.addcmul(mean, log_std.exp(), noise)
        a = torch.tanh(u)
        log_prob = (-0.5 * noise.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        return a, log_prob - torch.log(1.0 - a.square() + 1e-6).sum(-1)

    networks.TanhGaussianActor.distribution_params = distribution_params
    networks.TanhGaussianActor.sample = sample


PATCHES = {"sequential": _patch_sequential, "sb3_actor": _patch_sb3_actor}


def run_path(out: Path, task: str, arm: str, seed: int) -> Path:
    return out / "per_run" / task / arm / f"seed_{seed}.json"


def _dmc_cfg(task: str) -> dict[str, Any]:
    domain, name = task.split("-", 1)
    return {"kind": "dmc", "domain": domain, "task": name, "name": task}


# ----------------------------------------------------------------------------------------------
# One run of ours: the package's command line, a user's way
# ----------------------------------------------------------------------------------------------
def ours_command(task: str, arm: str, seed: int, args: argparse.Namespace, run_dir: Path) -> list[str]:
    patches = ARMS[arm].get("patches", [])
    entry = ([str(Path(__file__).resolve()), "_ours", *(f"--patch={p}" for p in patches), "--"] if patches
             else ["-m", "rl_plasticity.train"])
    return [sys.executable, *entry, f"env={task}", f"seed={seed}",
            f"total_steps={args.steps}", f"agent.replay_ratio={args.replay_ratio}",
            f"agent.prefill_steps={args.prefill}", f"agent.buffer_size={max(args.steps, 256)}",
            "agent.batch_size=256", "agent.hidden_sizes=[256,256]", "agent.actor_lr=3e-4", "agent.critic_lr=3e-4",
            "agent.alpha_lr=3e-4", "agent.init_alpha=1.0", "agent.gamma=0.99", "agent.tau=0.005",
            *ARMS[arm]["overrides"],
            f"eval.every={args.eval_every}", f"eval.episodes={args.eval_episodes}", f"log.every={args.eval_every}",
            f"checkpoint.every={args.steps}", "checkpoint.keep=1", "checkpoint.save_replay=false",
            "threads=1", "device=cpu", "resume=false", f"run_dir={run_dir}"]


def run_ours(task: str, arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from rl_plasticity.report import read_events

    run_dir = Path(args.out) / "tb" / task / arm / f"seed_{seed}"
    if run_dir.exists():  # an interrupted run: start it again
        shutil.rmtree(run_dir)
    command = ours_command(task, arm, seed, args, run_dir)
    log = run_path(Path(args.out), task, arm, seed).with_suffix(".log")
    wall = _run_logged(command, log, f"{task} {arm} seed {seed}: rl_plasticity.train")
    scalars, _, _ = read_events(run_dir)
    steps, values = scalars["eval/return_mean"]
    if not args.keep_tb:
        shutil.rmtree(run_dir)
        for parent in run_dir.parents:  # and the folders left empty, up to <out>/tb
            if parent == Path(args.out):
                break
            try:
                parent.rmdir()
            except OSError:  # not empty: another run's
                break
    log.unlink()
    shown = ["python"] + command[1:-1] + ["run_dir=..."]
    if ARMS[arm].get("patches"):
        shown[1] = "benchmarks/learning_parity.py"
    return {"curve": [[int(s), float(v)] for s, v in zip(steps, values)], "wall_s": wall,
            "command": " ".join(shlex.quote(c) for c in shown)}


# ----------------------------------------------------------------------------------------------
# One run of Stable-Baselines3
# ----------------------------------------------------------------------------------------------
class _SB3Policy:
    """SB3's SAC with the `act`/`value` face of our agents, for `rl_plasticity.loops.evaluate`."""

    def __init__(self, model: Any):
        self.model = model

    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        return self.model.predict(obs, deterministic=deterministic)[0]

    def value(self, obs: np.ndarray) -> float:  # not used (evaluate without gamma)
        return 0.0


def sb3_train(task: str, arm: str, seed: int, steps: int, replay_ratio: int, prefill: int, eval_every: int,
              eval_episodes: int) -> dict[str, Any]:
    """Train SB3 SAC in this process; returns the evaluation curve."""
    import torch
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    from rl_plasticity.envs import make_env
    from rl_plasticity.loops import EVAL_SEED_OFFSET, evaluate

    torch.set_num_threads(1)
    env, eval_env = make_env(_dmc_cfg(task)), make_env(_dmc_cfg(task))
    # SB3's defaults, spelled out: they are the settings ours gets too.
    model = SAC("MlpPolicy", env, learning_rate=3e-4, buffer_size=max(steps, 256), learning_starts=prefill,
                batch_size=256, tau=0.005, gamma=0.99, train_freq=1, gradient_steps=replay_ratio,
                ent_coef="auto_1.0", target_entropy="auto", target_update_interval=1,
                policy_kwargs=dict(net_arch=[256, 256], n_critics=ARMS[arm]["n_critics"]),
                seed=seed, device="cpu", verbose=0)
    curve: list[list[float]] = []
    policy = _SB3Policy(model)

    def evaluate_now(step: int) -> None:
        returns = evaluate(policy, eval_env, eval_episodes, seed + EVAL_SEED_OFFSET)["returns"]
        curve.append([step, float(returns.mean())])
        print(f"step {step:,}: eval return {returns.mean():.1f}", flush=True)  # progress, in the run's .log

    class EvalCallback(BaseCallback):
        # SB3 calls on_step after each env step, before that step's gradient updates; the last
        # evaluation runs after learn() returns, i.e. after the final step's updates, as ours.
        def _on_step(self) -> bool:
            if self.num_timesteps % eval_every == 0 and self.num_timesteps < steps:
                evaluate_now(self.num_timesteps)
            return True

    model.learn(total_timesteps=steps, callback=EvalCallback())
    evaluate_now(steps)
    return {"curve": curve}


def run_sb3(task: str, arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    path = run_path(Path(args.out), task, arm, seed)
    partial = path.with_suffix(".sb3.json")
    command = [sys.executable, str(Path(__file__).resolve()), "_sb3", "--task", task, "--arm", arm, "--seed",
               str(seed), "--steps", str(args.steps), "--replay-ratio", str(args.replay_ratio), "--prefill",
               str(args.prefill), "--eval-every", str(args.eval_every), "--eval-episodes", str(args.eval_episodes),
               "--result", str(partial)]
    log = path.with_suffix(".log")
    wall = _run_logged(command, log, f"{task} {arm} seed {seed}: SB3 run")
    result = json.loads(partial.read_text())
    partial.unlink()
    log.unlink()
    shown = ["python", "benchmarks/learning_parity.py"] + command[2:-2]
    return {**result, "wall_s": wall, "command": " ".join(shlex.quote(c) for c in shown)}


def _run_logged(command: list[str], log: Path, what: str) -> float:
    """Run `command` with its output in `log`; returns the wall time, raises naming `what` on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=_child_env())
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}; see {log}")
    return time.perf_counter() - start


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("MUJOCO_GL", "egl")
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_one(task: str, arm: str, seed: int, args: argparse.Namespace) -> Path:
    """Train one (task, arm, seed) unless its result file exists; returns the file."""
    path = run_path(Path(args.out), task, arm, seed)
    if path.exists():
        return path
    runner = run_sb3 if ARMS[arm]["kind"] == "sb3" else run_ours
    result = runner(task, arm, seed, args)
    record = {"task": task, "arm": arm, "seed": seed, "steps": args.steps, "replay_ratio": args.replay_ratio,
              "prefill": args.prefill, "eval_every": args.eval_every, "eval_episodes": args.eval_episodes,
              "final": result["curve"][-1][1], **result}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    print(f"{task:18s} {arm:20s} seed {seed}: final {record['final']:7.1f}  ({record['wall_s']:.0f} s)", flush=True)
    return path


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------
LAST_FRACTION = 0.2  # default scoring window: the evaluations in the last 20% of training


def load_results(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "per_run").glob("*/*/seed_*.json"))]


def _arm_order(arms: Sequence[str]) -> list[str]:
    known = [a for a in ARMS if a in arms]
    return known + sorted(a for a in arms if a not in ARMS)


def window_evaluations(record: dict[str, Any], fraction: float) -> int:
    """How many of a run's evaluations lie in the last `fraction` of its training: those at env step
    ≥ (1 − fraction) · steps (at least one: the final evaluation).  With `--eval-every 1000` and 20k
    steps, fraction 0.2 takes the evaluations at 16k, 17k, …, 20k."""
    start = (1.0 - fraction) * record["steps"]
    return max(1, sum(1 for step, _ in record["curve"] if step >= start))


def window_score(record: dict[str, Any], fraction: float) -> float:
    """The run's score over its last `fraction` of training: the mean of the evaluations in that window
    (`rl_plasticity.report.final_score` with last_k = `window_evaluations`)."""
    from rl_plasticity.report import final_score

    steps = np.array([p[0] for p in record["curve"]])
    values = np.array([p[1] for p in record["curve"]], dtype=np.float64)
    return final_score((steps, values), window_evaluations(record, fraction))


def check_fraction(fraction: float) -> float:
    if not 0.0 < fraction <= 1.0:
        raise SystemExit(f"error: --last-fraction must be in (0, 1] (the share of training whose evaluations are "
                         f"averaged; 0.2 = the last 20%), got {fraction}")
    return fraction


def summarise(out: Path, reps: int = 10_000, seed: int = 0, fraction: float = LAST_FRACTION) -> str:
    """Write summary.md, final_returns.csv, curves.csv and curves_<task>.png from the result files.

    Two scores per run: `final`, the last evaluation, and `last`, the mean of the evaluations in the
    last `fraction` of training (`window_score`), which one evaluation's dip or spike does not decide.
    For each, per task and arm: mean ± standard error and IQM with a 95% stratified-bootstrap CI
    (rl_plasticity.report's `mean_se` and `iqm_intervals`), and the same over tasks for an arm with
    the same seeds on every task."""
    from rl_plasticity.report import (_figure, _steps_axis, curve_label, fmt, iqm_intervals, markdown_table,
                                      mean_curve, mean_se, method_colors, plot_curve, write_csv)

    check_fraction(fraction)
    results = load_results(out)
    if not results:
        raise SystemExit(f"error: no results under {out / 'per_run'}")
    for r in results:
        r["last"] = window_score(r, fraction)
        r["last_evals"] = window_evaluations(r, fraction)
    tasks = sorted({r["task"] for r in results})
    arms = _arm_order(sorted({r["arm"] for r in results}))
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault((r["task"], r["arm"]), []).append(r)
    for runs in by.values():
        runs.sort(key=lambda r: r["seed"])
    scores = ("final", "last")

    # Per task and arm: IQM with CI over seeds (a (runs, 1) matrix each), for both scores.
    estimates = {s: iqm_intervals({f"{t}|{a}": np.array([[r[s]] for r in runs]) for (t, a), runs in by.items()},
                                  reps, seed) for s in scores}
    rows = []
    for t in tasks:
        for a in arms:
            runs = by.get((t, a))
            if not runs:
                continue
            stats = []
            for s in scores:
                stats += [*mean_se([r[s] for r in runs]), *estimates[s][f"{t}|{a}"]]
            evals = sorted({r["last_evals"] for r in runs})
            rows.append([t, a, len(runs), " ".join(str(r["seed"]) for r in runs), *stats,
                         f"{evals[0]}–{evals[-1]}" if len(evals) > 1 else evals[0],
                         " ".join(f"{r['final']:.0f}" for r in runs), " ".join(f"{r['last']:.0f}" for r in runs),
                         float(np.mean([r["wall_s"] for r in runs])) / 60])
    # Over tasks: arms with the same seeds on every task (a (runs, tasks) matrix of returns).
    matrices: dict[str, dict[str, np.ndarray]] = {s: {} for s in scores}
    for a in arms:
        seeds = [tuple(r["seed"] for r in by.get((t, a), [])) for t in tasks]
        if len(tasks) > 1 and seeds[0] and all(x == seeds[0] for x in seeds):
            for s in scores:
                matrices[s][a] = np.array([[r[s] for r in by[(t, a)]] for t in tasks]).T
    agg_estimates = {s: iqm_intervals(matrices[s], reps, seed) for s in scores}
    for a in matrices["final"]:
        stats = []
        for s in scores:
            matrix = matrices[s][a]
            stats += [float(matrix.mean()), mean_se(matrix.mean(1))[1], *agg_estimates[s][a]]
        rows.append(["all tasks", a, matrices["final"][a].size, " ".join(str(r["seed"]) for r in by[(tasks[0], a)]),
                     *stats, "", "", "", float("nan")])

    header = ["task", "arm", "runs", "seeds",
              "final_mean", "final_se", "final_iqm", "final_iqm_ci_low", "final_iqm_ci_high",
              "last_mean", "last_se", "last_iqm", "last_iqm_ci_low", "last_iqm_ci_high",
              "last_evaluations", "finals", "lasts", "minutes_per_run"]
    write_csv(out / "final_returns.csv", header, rows)
    pct = f"{fraction:.0%}"
    table = markdown_table(
        ["task", "arm", "runs", f"last {pct}: mean ± SE", f"last {pct}: IQM [95% CI]", "final: mean ± SE",
         "final: IQM [95% CI]", f"per seed: last {pct} (final)", "wall min/run"],
        [[t, a, n, f"{fmt(lm)} ± {fmt(ls)}", f"{fmt(li)} [{fmt(llo)}, {fmt(lhi)}]", f"{fmt(fm)} ± {fmt(fs)}",
          f"{fmt(fi)} [{fmt(flo)}, {fmt(fhi)}]",
          " ".join(f"{x} ({y})" for x, y in zip(lasts.split(), finals.split())), fmt(w) if math.isfinite(w) else "–"]
         for t, a, n, _, fm, fs, fi, flo, fhi, lm, ls, li, llo, lhi, _, finals, lasts, w in rows])

    colors = method_colors(arms)
    curve_rows = []
    for t in tasks:
        fig, axes = _figure()
        ax = axes[0, 0]
        for a in arms:
            runs = by.get((t, a))
            if not runs:
                continue
            series = [(np.array([p[0] for p in r["curve"]]), np.array([p[1] for p in r["curve"]])) for r in runs]
            curve = mean_curve(series)
            plot_curve(ax, curve, colors[a], curve_label(a, len(runs), curve), len(runs))
            curve_rows += [[t, a, int(g), m, s, int(n)] for g, m, s, n in zip(curve.steps, curve.mean, curve.se,
                                                                            curve.runs)]
        end = max(r["steps"] for r in results if r["task"] == t)
        ax.axvspan((1.0 - fraction) * end, end, color="0.5", alpha=0.12, lw=0, label=f"last {pct} (scored)")
        ax.set_title(f"{t}: evaluation return (mean ± s.e. over seeds)")
        ax.set_ylabel("return (deterministic policy)")
        _steps_axis(ax)
        ax.legend(loc="upper left", fontsize=8)
        fig.savefig(out / f"curves_{t}.png", dpi=110)
    write_csv(out / "curves.csv", ["task", "arm", "step", "mean", "se", "runs"], curve_rows)

    budgets = sorted({(r["steps"], r["replay_ratio"], r["prefill"], r["eval_episodes"]) for r in results})
    steps, rr, prefill, episodes = budgets[0]
    settings = (f"{steps:,} env steps, replay ratio {rr}, {prefill:,} random prefill steps, {episodes} deterministic "
                f"evaluation episodes per evaluation")
    if len(budgets) > 1:
        settings += " (WARNING: the result files mix budgets: " + "; ".join(
            f"{s:,} steps, RR {q}, prefill {p:,}, {e} episodes" for s, q, p, e in budgets) + ")"
    cadence = "; ".join(f"{t}: every " + " and ".join(f"{e:,}" for e in sorted({r['eval_every'] for r in results
                                                                                 if r["task"] == t})) + " steps"
                        for t in tasks)
    lines = ["# Learning parity: rl_plasticity SAC vs Stable-Baselines3 SAC", "",
             settings + f". Evaluation cadence: {cadence}.", "",
             f"Scores: **last {pct}** = the mean of a run's evaluations at env steps ≥ {1 - fraction:g} × the run's "
             f"steps (`window_score`; one dip or spike of the policy between evaluations does not decide it); "
             f"**final** = the last evaluation alone.", ""]
    single = {t: [a for a in arms if any(r["last_evals"] == 1 for r in by.get((t, a), []))] for t in tasks}
    single = {t: a for t, a in single.items() if a}
    if single:
        lines += [f"Where the window holds only the final evaluation (runs evaluated too rarely for it), last {pct} = "
                  f"final: " + "; ".join(f"{t} ({', '.join(a)})" for t, a in single.items()) + ".", ""]
    lines += ["Arms: " + "; ".join(f"`{a}` {ARMS[a]['what']}" for a in arms if a in ARMS) + ".", "",
              table, "",
              f"IQM: `rliable.metrics.aggregate_iqm` over runs; 95% CI: percentile stratified bootstrap "
              f"({reps:,} resamples, seed {seed}), via `rl_plasticity.report.iqm_intervals`. SE: std(ddof=1)/√n "
              f"(`rl_plasticity.report.mean_se`; over tasks: of the per-seed mean over tasks). `all tasks` rows: "
              f"arms with the same seeds on every task. Fewer than 5 seeds per cell: the intervals are rough, "
              f"and from 2 seeds they only span those two returns.", ""]
    lines += [f"![{t}](curves_{t}.png)" for t in tasks]
    commands = sorted({(r["arm"], r["command"]) for r in results if r["seed"] == min(x["seed"] for x in by[(r["task"], r["arm"])])
                       and r["task"] == tasks[0]})
    lines += ["", f"One run's command per arm (seed and task vary; `{tasks[0]}` shown):", ""]
    lines += [f"- `{a}`: `{c}`" for a, c in commands]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["cheetah-run", "walker-walk", "cartpole-swingup"],
                   help="DMC <domain>-<task> names")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--arms", nargs="+", default=["sb3", "ours_peer", "ours_paper"], choices=list(ARMS))
    p.add_argument("--steps", type=int, default=20_000, help="env steps per run")
    p.add_argument("--replay-ratio", type=int, default=4, help="gradient updates per env step")
    p.add_argument("--prefill", type=int, default=5_000, help="uniformly random steps before learning")
    p.add_argument("--eval-every", type=int, default=1_000,
                   help="env steps between evaluations (1,000: five evaluations in the last 20%% of 20k steps)")
    p.add_argument("--eval-episodes", type=int, default=5)
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (one thread each)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--order", choices=["seed", "arm"], default="seed",
                   help="run order: seed-major (every arm of seed 0 first) or arm-major")
    p.add_argument("--keep-tb", action="store_true", help="keep our runs' TensorBoard dirs under <out>/tb")
    p.add_argument("--summarise-only", action="store_true", help="only rebuild the summary from the result files")
    p.add_argument("--reps", type=int, default=10_000, help="bootstrap resamples")
    p.add_argument("--last-fraction", type=float, default=LAST_FRACTION,
                   help="the 'last' score averages the evaluations in this last share of training (default 0.2)")
    args = p.parse_args(argv)
    check_fraction(args.last_fraction)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_sb3"]:  # internal: one SB3 run in this process
        p = argparse.ArgumentParser()
        for key in ("--task", "--arm", "--result"):
            p.add_argument(key, required=True)
        for key in ("--seed", "--steps", "--replay-ratio", "--prefill", "--eval-every", "--eval-episodes"):
            p.add_argument(key, type=int, required=True)
        a = p.parse_args(argv[1:])
        result = sb3_train(a.task, a.arm, a.seed, a.steps, a.replay_ratio, a.prefill, a.eval_every, a.eval_episodes)
        Path(a.result).write_text(json.dumps(result))
        return 0
    if argv[:1] == ["_ours"]:  # internal: rl_plasticity.train with ablation patches
        split = argv.index("--")
        for option in argv[1:split]:
            PATCHES[option.split("=", 1)[1]]()
        import rl_plasticity.train as train

        sys.argv = ["rl_plasticity.train", *argv[split + 1:]]
        train.main()
        return 0
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.summarise_only:
        if args.order == "seed":
            todo = [(t, a, s) for t in args.tasks for s in args.seeds for a in args.arms]
        else:
            todo = [(t, a, s) for t in args.tasks for a in args.arms for s in args.seeds]
        failures = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {pool.submit(run_one, t, a, s, args): (t, a, s) for t, a, s in todo}
            for future in concurrent.futures.as_completed(futures):
                try:
                    future.result()
                except Exception as e:  # keep the other runs going; report at the end
                    failures.append(str(e))
                    print(f"FAILED: {e}", file=sys.stderr, flush=True)
        if failures:
            summarise(out, args.reps, fraction=args.last_fraction)
            return 1
    print(summarise(out, args.reps, fraction=args.last_fraction))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
