"""python -m rl_plasticity.report RUNS_DIR [...]: compare many runs the way the papers do.

Reads the TensorBoard event files of every run under the given directories, groups the runs by
environment and method (both from the run's saved config; seeds pooled) and writes into `--out`:

- `curves_<env>.png` + `curves.csv`: evaluation return against env steps, mean ± standard error
  over seeds, one line per method;
- `final_performance.csv` / `.md`: per environment and method the interquartile mean (IQM) of the
  runs' final returns with a 95% stratified-bootstrap confidence interval (rliable), mean, median
  and number of runs, plus an aggregate row per method across environments;
- with `--sweep KEY`: `sensitivity_<KEY>_<env>.png` + `sensitivity_<KEY>.csv`, final return
  against the swept hyper-parameter;
- for an env that changes task (Slippery Ant, continual DMC): `task_returns_<env>.png` +
  `task_returns.csv`, each method's return averaged within each task, mean ± s.e. over seeds;
- `diagnostics_<env>.png`: plasticity diagnostics over time (spectral, parameter and gradient
  norms, effective rank, dormant fraction, Q overestimation), mean over seeds;
- where runs measured curvature (`plasticity.curvature_every`, `plasticity.curvature_task_start`):
  `curvature_<env>.png` (every measurement, `curvature/<network>/...`) and
  `curvature_task_<env>.png` (the measurements at task starts, `curvature_task/<network>/...`):
  empirical-Fisher rank, ε-Hessian rank, sharpness, gradient–Hessian overlap and gradient diversity
  against env steps, mean ± s.e. over seeds, task changes marked, data in `curvature.csv`; and
  `hessian_density_<env>.png` + `hessian_density.csv`: the SLQ Hessian eigenvalue density (the
  `.../hessian_density` histograms the loops write) at chosen task starts (`--density-tasks`,
  default first, middle and last), mean over seeds, as in App. F of spectral-collapse-l2-er.md;
- `runs.csv` (one row per run) and `summary.md`, which embeds all of the above.

The final performance of a run is its last `eval/return_mean` value (the mean of its last K
evaluations with `--last-k K`). Curves are never cut to the shortest run: each step averages the
runs that reach it (dashed where fewer than all), every line has markers, and groups of fewer than
FEW_RUNS runs carry a caveat in the table and the legends. Figures are drawn on matplotlib Figure objects with the Agg
canvas, so nothing needs a display and no global pyplot state is touched.
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import re
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import yaml

from rl_plasticity.cli import fail
from rl_plasticity.names import EVAL_RETURN, NOT_LEARNING_KEYS, TASK_CHANGE, did_you_mean
from rl_plasticity.rundir import EVENT_PREFIX, shown_path

RETURN_TAG = EVAL_RETURN
CONFIG_TAG = "config/text_summary"  # SummaryWriter.add_text("config", ...) stores it under this tag
DEFAULT_REPS = 10_000
# Fewer runs than this in a group: its standard errors and IQM confidence intervals carry a caveat.
FEW_RUNS = 3

# Keys that never distinguish two methods: those that do not change learning (names.py; the
# sections among them by prefix), seeds and the diagnostics' period, and the keys naming the env.
IGNORED_PREFIXES = ("hydra.",) + tuple(f"{key}." for key in NOT_LEARNING_KEYS)
IGNORED_KEYS = {*NOT_LEARNING_KEYS, "seed", "plasticity.log_every",
                "env.friction_seed", "env.name", "env.id", "env.kind", "env.domain", "env.task"}

# Diagnostic panels: (title, tag candidates under plasticity/<network>/, first present wins).
NETWORK_METRICS = (
    ("spectral norm (max σ₁ over layers)", ("spectral_norm_max", "spectral_norm")),
    ("parameter norm ‖θ‖", ("param_norm",)),
    ("gradient norm", ("grad_norm",)),
    ("feature effective rank", ("feature_effective_rank",)),
    ("dormant fraction", ("dormant_fraction",)),
    ("dead units (never active on the probe)", ("dead_units",)),  # spectral-collapse-l2-er.md Fig. 6
)
VALUE_METRICS = (("Q overestimation", "value/overestimation"),)
# Curvature panels (title, metric under curvature/<network>/ and curvature_task/<network>/), the
# diagnostics of plasticity/curvature.py the papers plot.
CURVATURE_METRICS = (
    ("empirical-Fisher rank (srank₉₉ / max)", "fisher_rank"),
    ("ε-Hessian rank (fraction of P)", "epsilon_rank"),
    ("sharpness λ_max", "sharpness"),
    ("gradient–Hessian overlap (top subspace)", "overlap_top"),
    ("gradient diversity (effective rank)", "grad_erank"),
)
TASK_CHANGE_TAG = TASK_CHANGE  # written at every task start the loops measure
DENSITY_SUFFIX = "/hessian_density"


# ----------------------------------------------------------------------------------------------
# Reading runs
# ----------------------------------------------------------------------------------------------
Series = tuple[np.ndarray, np.ndarray]  # (steps, values), steps increasing


@dataclass
class Run:
    path: Path
    config: dict[str, Any]                 # flattened, dotted keys
    config_source: str                     # "event file" or the .hydra/config.yaml it came from
    scalars: dict[str, Series]
    env: str = ""
    method: str = ""
    dropped_points: int = 0                # non-finite values left out of `scalars`
    # TensorBoard histograms by tag: (step, right bucket limits, bucket counts), step increasing
    histograms: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = field(default_factory=dict)

    @property
    def seed(self) -> Any:
        return self.config.get("seed")


def find_run_dirs(root: Path) -> list[Path]:
    """Every directory under `root` (itself included) that directly holds event files."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if any(name.startswith(EVENT_PREFIX) for name in filenames):
            found.append(Path(dirpath))
    return found


def flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'agent': {'name': 'sac'}} -> {'agent.name': 'sac'}; lists become tuples (hashable)."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = _freeze(value)
    return out


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    return value


def parse_config_text(text: str) -> dict[str, Any] | None:
    """The YAML of the train script's `config` text summary (every line indented by four spaces)."""
    try:
        data = yaml.safe_load(textwrap.dedent(text))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _hydra_config(run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """`.hydra/config.yaml` of the run dir or of its nearest ancestor that has one."""
    for directory in (run_dir, *run_dir.parents):
        path = directory / ".hydra" / "config.yaml"
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError):
                return None
            return (data, path) if isinstance(data, dict) else None
    return None


def read_events(run_dir: Path) -> tuple[dict[str, Series], str | None, int]:
    """All scalars of a run dir (every event file in it) and its `config` text.

    EventAccumulator reads the files oldest first and honours the purge a resumed run asks for
    (`purge_step`); of the points left, the last written value of each (tag, step) wins.
    Non-finite values are dropped; their number is returned.
    """
    scalars, text, dropped, _ = read_run_events(run_dir)
    return scalars, text, dropped


def read_run_events(run_dir: Path) -> tuple[dict[str, Series], str | None, int,
                                            dict[str, list[tuple[int, np.ndarray, np.ndarray]]]]:
    """`read_events` plus the run's histograms {tag: [(step, right bucket limits, counts)]}
    (the last written one of each step; the Hessian densities of the curvature diagnostics)."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    tb_logger = logging.getLogger("tensorboard")
    level = tb_logger.level
    tb_logger.setLevel(logging.ERROR)  # "Detected out of order event.step ..." on every resumed run
    try:
        acc = ea.EventAccumulator(str(run_dir), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0, ea.HISTOGRAMS: 0})
        acc.Reload()
    finally:
        tb_logger.setLevel(level)
    tags = acc.Tags()
    histograms: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for tag in tags.get("histograms", []):
        last_hist: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for event in acc.Histograms(tag):
            h = event.histogram_value
            last_hist[event.step] = (np.asarray(h.bucket_limit, dtype=np.float64),
                                     np.asarray(h.bucket, dtype=np.float64))
        histograms[tag] = [(step, *last_hist[step]) for step in sorted(last_hist)]
    scalars: dict[str, Series] = {}
    dropped = 0
    for tag in tags.get("scalars", []):
        last: dict[int, float] = {}
        for event in acc.Scalars(tag):
            last[event.step] = event.value
        steps = np.array(sorted(last), dtype=np.int64)
        values = np.array([last[s] for s in steps], dtype=np.float64)
        finite = np.isfinite(values)
        dropped += int((~finite).sum())
        if finite.any():
            scalars[tag] = (steps[finite], values[finite])
    text = None
    if CONFIG_TAG in tags.get("tensors", []):
        events = acc.Tensors(CONFIG_TAG)
        if events:
            array = tensor_util.make_ndarray(events[-1].tensor_proto)
            text = "".join(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.ravel())
    return scalars, text, dropped, histograms


def env_label(config: Mapping[str, Any]) -> str | None:
    """`env.name`, or `env.id` for `env=gym` (any gymnasium id)."""
    name = config.get("env.name")
    if name == "gym" or config.get("env.kind") == "gym":
        return str(config.get("env.id", name))
    return None if name is None else str(name)


def load_run(run_dir: Path, metric: str) -> Run | str:
    """A Run, or the reason (one line) it is skipped."""
    scalars, text, dropped, histograms = read_run_events(run_dir)
    config = parse_config_text(text) if text else None
    source = "event file"
    if config is None:
        found = _hydra_config(run_dir)
        if found is None:
            return "no config (no `config` text summary in its event files and no .hydra/config.yaml)"
        config, hydra_path = found
        source = str(hydra_path)
        match = re.fullmatch(r"seed_(\d+)", run_dir.name)
        if match and hydra_path.parent.parent != run_dir:
            config = {**config, "seed": int(match.group(1))}  # a seed_<k>/ job under a shared config
    flat = flatten(config)
    env = env_label(flat)
    if env is None:
        return "its config has no env.name"
    if metric not in scalars:
        return f"no {metric}"
    return Run(run_dir, flat, source, scalars, env=env, dropped_points=dropped, histograms=histograms)


# ----------------------------------------------------------------------------------------------
# Method labels
# ----------------------------------------------------------------------------------------------
def format_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def _sortable(value: Any) -> tuple:
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, bool):
        return (1, float(value), "")
    if isinstance(value, (int, float)):
        return (2, float(value), "")
    return (3, 0.0, format_value(value))


def base_label(config: Mapping[str, Any]) -> str:
    """agent, then +LN (LayerNorm), +CReLU, +reset (periodic full resets), +<regularizer>, +cbp/+er add-ons,
    +<intervention> for each of plasticity.interventions."""
    parts = [str(config.get("agent.name", "agent?"))]
    if config.get("agent.layer_norm") is True:
        parts.append("LN")
    if config.get("agent.activation") == "crelu":
        parts.append("CReLU")
    if config.get("agent.reset_interval") is not None:
        parts.append("reset")
    reg = config.get("plasticity.name")
    if reg not in (None, "none"):
        parts.append(str(reg))
    if config.get("plasticity.cbp") is True and reg not in ("cbp", "cbp_l2"):
        parts.append("cbp")
    if config.get("plasticity.er") is True and reg not in ("er", "l2_er"):
        parts.append("er")
    for name in config.get("plasticity.interventions") or ():  # +redo, +shrink_perturb, ...
        tag = {"er_step": "er"}.get(name, name)
        implied = (name == "cbp" and reg in ("cbp", "cbp_l2")) or (name == "er_step" and reg in ("er", "l2_er"))
        if tag not in parts[1:] and not implied:
            parts.append(tag)
    return "+".join(parts)


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """Last dotted component of each key where that is unambiguous among `keys`."""
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves)}


def _distinguishing(config: Mapping[str, Any], exclude: set[str]) -> dict[str, Any]:
    return {k: v for k, v in config.items()
            if k not in IGNORED_KEYS and k not in exclude and not k.startswith(IGNORED_PREFIXES)}


def method_labels(runs: Sequence[Run], method_keys: Sequence[str] | None = None,
                  exclude: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """A label per run, and all labels in display order.

    Default rule: `base_label`, plus ` (key=value, ...)` for every config key that differs between
    runs sharing that base label within some environment (seeds, bookkeeping and env-naming keys
    excepted; only keys that all those runs have), so runs are pooled exactly when their configs
    agree up to the seed, while per-environment settings that never vary within an environment do
    not split a method across environments. Keys in `exclude` (the swept key) never split. With
    `method_keys`, the label is just those keys' values (other differences are pooled).
    """
    exclude = set(exclude)
    if method_keys:
        keys = [k for k in method_keys if k not in exclude]
        names = _short_names(keys)
        idents = [tuple((k, r.config.get(k)) for k in keys) for r in runs]
        labels = [" ".join(f"{names[k]}={format_value(v)}" for k, v in ident) or "all" for ident in idents]
        order = sorted(set(zip(labels, idents)), key=lambda li: [_sortable(v) for _, v in li[1]])
        return labels, list(dict.fromkeys(label for label, _ in order))

    bases = [base_label(r.config) for r in runs]
    configs = [_distinguishing(r.config, exclude) for r in runs]
    split: dict[str, set[str]] = {}          # base label -> keys that vary within one env
    for base in set(bases):
        members = [i for i, b in enumerate(bases) if b == base]
        keys: set[str] = set()
        for env in {runs[i].env for i in members}:
            group = [configs[i] for i in members if runs[i].env == env]
            common = set.intersection(*(set(c) for c in group))
            keys |= {k for k in common if len({c[k] for c in group}) > 1}
        split[base] = keys
    labels, sort_keys = [], {}
    for base, cfg in zip(bases, configs):
        keys = sorted(k for k in split[base] if k in cfg)
        names = _short_names(keys)
        suffix = ", ".join(f"{names[k]}={format_value(cfg[k])}" for k in keys)
        label = f"{base} ({suffix})" if suffix else base
        labels.append(label)
        sort_keys[label] = (base, [(k, _sortable(cfg[k])) for k in keys])
    return labels, sorted(sort_keys, key=lambda label: sort_keys[label])


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
def final_score(series: Series, last_k: int = 1) -> float:
    """Final performance of a run: mean of its last `last_k` values (by step)."""
    return float(np.mean(series[1][-last_k:]))


def run_complete(run: Run) -> bool:
    """Whether a run reached its whole budget (`total_steps` of its config) in any scalar: a finished
    run's last episode may end before it."""
    reached = max((int(xs[-1]) for xs, _ in run.scalars.values() if len(xs)), default=0)
    total = run.config.get("total_steps")
    return isinstance(total, (int, float)) and reached >= total


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error std(ddof=1)/sqrt(n) (nan for one value)."""
    x = np.asarray(values, dtype=np.float64)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(x.mean()), se


@dataclass
class Curve:
    """Mean over runs of a scalar against env steps: at every step logged by any run, the runs whose
    logged range covers that step (each linearly interpolated there; exact where the steps agree)."""

    steps: np.ndarray
    mean: np.ndarray
    se: np.ndarray                         # standard error; nan where one run covers the step
    runs: np.ndarray                       # number of runs averaged at each step

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def all_from(self) -> int | None:
        """The last step up to which every run contributes (None if no step has all runs)."""
        full = np.flatnonzero(self.runs == self.runs.max(initial=0))
        return None if not len(full) else int(self.steps[full[-1]])


def mean_curve(series: Sequence[Series]) -> Curve:
    """Mean and standard error over the runs covering each step, never cut to nothing: runs of
    different lengths give a curve to the longest one's end, over fewer runs past the shorter ones."""
    grid = np.unique(np.concatenate([s for s, _ in series])) if series else np.zeros(0, dtype=np.int64)
    ys = np.full((len(series), len(grid)), np.nan)
    for i, (s, v) in enumerate(series):
        inside = (grid >= s[0]) & (grid <= s[-1])
        ys[i, inside] = np.interp(grid[inside], s, v)
    runs = np.isfinite(ys).sum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nan means and variances of one run
        mean = np.nanmean(ys, 0) if len(series) else np.zeros(0)
        var = np.nanvar(ys, 0, ddof=1) if len(series) else np.zeros(0)
    se = np.where(runs > 1, np.sqrt(var) / np.sqrt(np.maximum(runs, 1)), np.nan)
    return Curve(grid, mean, se, runs)


# A run's curve with more points than this (an online return logged at every episode end: about
# 10k per 500k PPO steps on Slippery Ant) is drawn as bin means, CURVE_BINS bins over the runs' steps.
MAX_CURVE_POINTS = 300
CURVE_BINS = 100


def bin_width(last_step: float, bins: int = CURVE_BINS) -> int:
    """The bin width for `bins` bins up to `last_step`, rounded up to 1, 2 or 5 times a power of ten."""
    raw = max(1.0, float(last_step) / bins)
    scale = 10 ** math.floor(math.log10(raw))
    return int(next(m * scale for m in (1, 2, 5, 10) if m * scale >= raw))


def bin_series(series: Series, width: int) -> Series:
    """A series' mean within consecutive bins [k·width, (k+1)·width) of steps, at each bin's centre;
    bins without a value are left out."""
    steps, values = series
    index = (steps // width).astype(np.int64)
    bins, inverse = np.unique(index, return_inverse=True)
    sums = np.bincount(inverse, weights=values)
    counts = np.bincount(inverse)
    return (bins * width + width / 2).astype(np.float64), sums / counts


def _rliable() -> tuple[Any, Any]:
    """rliable's library and metrics modules (imported late: they pull in arch and scipy)."""
    from rliable import library, metrics

    return library, metrics


def iqm_intervals(scores: Mapping[str, np.ndarray], reps: int, seed: int) -> dict[str, tuple[float, float, float]]:
    """{name: (IQM, CI low, CI high)} for score matrices of shape (runs, tasks).

    IQM is rliable's aggregate_iqm (25% trimmed mean over all entries); the 95% interval is
    rliable's percentile stratified bootstrap (runs resampled within each task).  rliable's
    StratifiedBootstrap draws its indices from NumPy's global generator, not from `random_state`,
    so each entry is resampled with the global generator seeded to `seed` (and restored after):
    an interval depends on its scores, `reps` and `seed` alone, not on earlier random draws, on the
    other entries of the call or on their order."""
    if not scores:
        return {}
    library, metrics = _rliable()

    def iqm(x: np.ndarray) -> np.ndarray:
        return np.array([metrics.aggregate_iqm(x)])

    out: dict[str, tuple[float, float, float]] = {}
    global_state = np.random.get_state()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # arch: "random_state is deprecated"
            for k, x in scores.items():
                np.random.seed(seed)
                point, interval = library.get_interval_estimates(
                    {k: x}, iqm, reps=reps, random_state=np.random.RandomState(seed))
                out[k] = (float(point[k][0]), float(interval[k][0, 0]), float(interval[k][1, 0]))
    finally:
        np.random.set_state(global_state)
    return out


# ----------------------------------------------------------------------------------------------
# Output helpers
# ----------------------------------------------------------------------------------------------
def fmt(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:,.1f}" if abs(value) >= 1 else f"{value:.3g}"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "_"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (7.0, 4.5)) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _steps_axis(ax: Any) -> None:
    from matplotlib.ticker import EngFormatter

    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel("env steps")
    ax.grid(alpha=0.3)


def method_colors(methods: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def plot_curve(ax: Any, curve: Curve, color: Any, label: str, total_runs: int, lw: float = 1.5) -> Any:
    """Draw a Curve with markers (so that a single point shows), solid where all `total_runs` runs
    average and dashed where fewer do, with a ± s.e. band where two or more runs do; returns the
    legend handle."""
    n = len(curve)
    if not n:
        return None
    style = dict(color=color, lw=lw, marker="o", markersize=4.0 if n <= 30 else 2.5,
                 markevery=max(1, math.ceil(n / 60)))
    partial = curve.runs < total_runs
    handle = None
    if not partial.all():
        (handle,) = ax.plot(curve.steps, np.where(partial, np.nan, curve.mean), label=label, **style)
    if partial.any():
        edges = partial.copy()  # the dashed part joins the solid one at its ends
        edges[1:] |= partial[:-1]
        edges[:-1] |= partial[1:]
        (dashed,) = ax.plot(curve.steps, np.where(edges, curve.mean, np.nan), ls="--", alpha=0.8,
                            label=None if handle else label, **style)
        handle = handle or dashed
    if (curve.runs > 1).any():
        ax.fill_between(curve.steps, curve.mean - curve.se, curve.mean + curve.se, color=color, alpha=0.2, lw=0)
    return handle


def few_runs_caveat(runs: int) -> str:
    """The table's caveat for a group of `runs` runs ("" when there are enough)."""
    if runs == 1:
        return "1 run: no spread over seeds; the IQM interval is that run's return"
    if runs < FEW_RUNS:
        return f"{runs} runs: too few for a meaningful confidence interval"
    return ""


def curve_label(method: str, runs: int, curve: Curve) -> str:
    """Legend entry: the method and its number of runs, with the caveats a reader needs."""
    caveats = []
    if runs == 1:
        caveats.append("no s.e.")
    elif runs < FEW_RUNS:
        caveats.append("too few for a reliable s.e.")
    if len(curve) == 1:
        caveats.append("1 point")
    return f"{method} (n={runs}{': ' + ', '.join(caveats) if caveats else ''})"


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
@dataclass
class Report:
    runs: list[Run]
    methods: list[str]
    envs: list[str]
    metric: str
    last_k: int
    reps: int
    seed: int
    out: Path
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)

    def group(self, env: str, method: str) -> list[Run]:
        return [r for r in self.runs if r.env == env and r.method == method]

    def score(self, run: Run) -> float:
        return final_score(run.scalars[self.metric], self.last_k)

    def save(self, fig: Any, name: str) -> Path:
        path = self.out / name
        fig.savefig(path, dpi=120)
        self.written.append(path)
        return path

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}")


def _note_coverage(report: Report, what: str, curve: Curve, series: Sequence[Series]) -> bool:
    """Note (in summary.md) where a curve averages fewer runs than its group has, or has one point;
    returns whether it does anywhere."""
    total = len(series)
    if len(curve) == 1:
        report.note(f"{what}: one logged point (step {int(curve.steps[0]):,}); drawn as a marker")
    if not (curve.runs < total).any():
        return False
    ends = sorted({int(s[-1]) for s, _ in series})
    starts = sorted({int(s[0]) for s, _ in series})
    spans = []
    if len(starts) > 1:
        spans.append(f"start at steps {', '.join(f'{x:,}' for x in starts)}")
    if len(ends) > 1:
        spans.append(f"end at steps {', '.join(f'{x:,}' for x in ends)}")
    last_all = curve.all_from
    where = (f"after step {last_all:,}" if last_all is not None and len(starts) == 1 else "where dashed")
    report.note(f"{what}: its {total} runs {' and '.join(spans)}; {where} the curve averages fewer runs "
                f"(down to {int(curve.runs.min())}), dashed")
    return True


def table(report: Report) -> None:
    """final_performance.csv/.md: IQM + 95% CI, mean, median, runs; aggregate rows across envs."""
    rows: list[tuple] = []
    for env in report.envs:
        scores = {m: np.array([[report.score(r)] for r in report.group(env, m)]) for m in report.methods}
        scores = {m: s for m, s in scores.items() if len(s)}
        estimates = iqm_intervals(scores, report.reps, report.seed)
        for m, s in scores.items():
            steps = [int(r.scalars[report.metric][0][-1]) for r in report.group(env, m)]
            rows.append((env, m, len(s), *estimates[m], float(np.mean(s)), float(np.median(s)), min(steps), max(steps),
                         few_runs_caveat(len(s))))
            if min(steps) != max(steps) and not all(run_complete(r) for r in report.group(env, m)):
                report.note(f"{env} / {m}: runs end at different steps ({min(steps):,} to {max(steps):,}); "
                            "their final returns compare unequal budgets")
            seeds = [r.seed for r in report.group(env, m)]
            if len(set(map(repr, seeds))) < len(seeds):
                report.note(f"{env} / {m}: duplicate seeds among its runs ({', '.join(map(format_value, seeds))})")
    aggregate_rows = []
    if len(report.envs) > 1:
        matrices = {}
        for m in report.methods:
            counts = {env: len(report.group(env, m)) for env in report.envs}
            if len(set(counts.values())) == 1 and 0 not in counts.values():
                matrices[m] = np.array([[report.score(r) for r in report.group(env, m)] for env in report.envs]).T
            else:
                report.note(f"no aggregate row for {m}: an aggregate needs the same number of runs in every "
                            f"environment (" + ", ".join(f"{e}: {c}" for e, c in counts.items()) + ")")
        estimates = iqm_intervals(matrices, report.reps, report.seed)
        for m, s in matrices.items():
            aggregate_rows.append((f"aggregate ({len(report.envs)} envs)", m, s.shape[0], *estimates[m],
                                   float(np.mean(s)), float(np.median(s)), "", "", few_runs_caveat(s.shape[0])))
    header = ("env", "method", "runs", "iqm", "iqm_ci_low", "iqm_ci_high", "mean", "median",
              "final_step_min", "final_step_max", "caveat")
    csv_path = report.out / "final_performance.csv"
    write_csv(csv_path, header, rows + aggregate_rows)
    report.written.append(csv_path)

    def md_row(row: tuple) -> list[str]:
        env, m, n, iqm, lo, hi, mean, median, s_min, s_max, caveat = row
        steps = "" if s_min == "" else (f"{s_min:,}" if s_min == s_max else f"{s_min:,}–{s_max:,}")
        aggregate = env.startswith("aggregate")
        interval = "none: 1 run †" if n == 1 else f"[{fmt(lo)}, {fmt(hi)}]" + (" †" if caveat else "")
        return [f"**{env}**" if aggregate else env, m, f"{n} × {len(report.envs)}" if aggregate else str(n), fmt(iqm),
                interval, fmt(mean), fmt(median), steps]

    md = markdown_table(("env", "method", "runs", "IQM", "95% CI (IQM)", "mean", "median", "final step"),
                        [md_row(r) for r in rows + aggregate_rows])
    what = (f"the last `{report.metric}` value of each run" if report.last_k == 1 else
            f"the mean of the last {report.last_k} `{report.metric}` values of each run")
    caption = (f"Final performance = {what}. IQM: interquartile mean (25% trimmed mean, "
               f"`rliable.metrics.aggregate_iqm`) over runs; 95% CI: percentile stratified bootstrap "
               f"(`rliable.library.get_interval_estimates`, {report.reps:,} resamples, seed {report.seed}).")
    if aggregate_rows:
        caption += (" Aggregate rows pool the runs × environments matrix of raw returns (runs resampled within "
                    "each environment), meaningful when the environments share a return scale (DMC: 0–1000).")
    elif len(report.envs) == 1:
        caption += " One environment: no aggregate row."
    if any(row[-1] for row in rows + aggregate_rows):
        caption += (f"\n\n† Fewer than {FEW_RUNS} runs (`caveat` column of `final_performance.csv`): from one run "
                    "the IQM, mean and median are its return and the bootstrap interval collapses to that value; "
                    "from two, the interval only spans their two returns. Neither says how another seed would "
                    f"do: run at least {FEW_RUNS} seeds (5 or more for a dependable interval).")
    md_path = report.out / "final_performance.md"
    md_path.write_text(md + "\n\n" + caption + "\n")
    report.written.append(md_path)
    report.sections.append("## Final performance\n\n" + md + "\n\n" + caption)


def curves(report: Report, colors: Mapping[str, Any]) -> None:
    """curves_<env>.png and curves.csv: mean ± s.e. over seeds of the metric against env steps."""
    csv_rows = []
    figures = []
    binned = {}
    for env in report.envs:
        fig, axes = _figure()
        ax = axes[0, 0]
        partial = False
        env_series = [r.scalars[report.metric] for r in report.runs if r.env == env]
        width = None
        if max(len(s) for s, _ in env_series) > MAX_CURVE_POINTS:
            width = binned[env] = bin_width(max(s[-1] for s, _ in env_series))
        for m in report.methods:
            group = report.group(env, m)
            if not group:
                continue
            series = [r.scalars[report.metric] for r in group]
            if width:
                series = [bin_series(s, width) for s in series]
            curve = mean_curve(series)
            partial |= _note_coverage(report, f"{env} / {m}", curve, series)
            csv_rows += [(env, m, int(x), float(y), float(e), int(n))
                         for x, y, e, n in zip(curve.steps, curve.mean, curve.se, curve.runs)]
            plot_curve(ax, curve, colors[m], curve_label(m, len(group), curve), len(group), lw=1.8)
        changes = env_task_changes([r for r in report.runs if r.env == env])
        for x in changes:
            ax.axvline(x, color="0.5", lw=0.8, alpha=0.5, zorder=0)
        _steps_axis(ax)
        ax.set_ylabel(f"evaluation return ({report.metric})" if report.metric == RETURN_TAG else report.metric)
        ax.set_title(f"{env}: mean ± standard error over seeds"
                     + (f"\n(each run's mean in bins of {width:,} steps)" if width else ""))
        remarks = (["dashed: fewer runs than the method has"] if partial else []) + (
            ["grey lines: task changes (each run's first episode end with the new task)"] if changes else [])
        if remarks:
            ax.text(0.01, 0.01, "; ".join(remarks), transform=ax.transAxes, fontsize="small", color="0.35",
                    va="bottom")
        ax.legend(fontsize="small", loc="best")
        figures.append((env, report.save(fig, f"curves_{slug(env)}.png")))
    path = report.out / "curves.csv"
    write_csv(path, ("env", "method", "step", "mean", "se", "runs"), csv_rows)
    report.written.append(path)
    report.sections.append("## Learning curves\n\nMean ± standard error over seeds, at every step any run logged: "
                           "runs of different lengths are averaged where they have data, and the curve is dashed "
                           "where it averages fewer runs than the method has (`runs` column of `curves.csv`); "
                           f"legends name methods with fewer than {FEW_RUNS} runs or one point. Data: "
                           "`curves.csv`."
                           + "".join(f" {env}: more than {MAX_CURVE_POINTS} points per run, so each run's values are "
                                     f"averaged within bins of {w:,} steps first (`step` = a bin's centre)."
                                     for env, w in binned.items())
                           + "\n\n"
                           + "\n\n".join(f"![{env}: learning curves]({p.name})" for env, p in figures))


def task_means(series: Series, changes: Sequence[int], complete: bool) -> list[float]:
    """A run's mean of `series` within each of its tasks: task k runs from its k-th change (step 0
    for the first) up to, not including, the next, where `changes` are the steps at which the run
    first logged a new `env/` value (env_task_changes of the run alone).  nan for a task it logged
    nothing in, and for its last task unless the run is `complete` (it may stop in mid-task)."""
    steps, values = series
    bounds = [0, *changes, math.inf]
    out = []
    for k in range(len(bounds) - 1):
        inside = (steps >= bounds[k]) & (steps < bounds[k + 1])
        finished = k < len(changes) or complete
        out.append(float(values[inside].mean()) if inside.any() and finished else float("nan"))
    return out


def task_returns(report: Report, colors: Mapping[str, Any]) -> None:
    """task_returns.csv and task_returns_<env>.png for non-stationary envs: each method's return
    averaged within each task (Dohare et al. 2024's per-task average of Slippery Ant and the
    continual benchmarks; the per-task view of spectral-collapse-l2-er.md Fig. 3), mean ± s.e.
    over the runs that finished the task.  Each run's tasks come from its own `env/` scalars
    (`env/friction`, `env/task`, logged at episode ends), so a task starts at the first step a
    run logged its value: runs switch at slightly different steps, and task k is their k-th."""
    csv_rows = []
    figures = []
    tables = []
    for env in report.envs:
        env_runs = [r for r in report.runs if r.env == env]
        changes = {id(r): env_task_changes([r]) for r in env_runs}
        if not any(changes.values()):
            continue
        n_tasks = 1 + max(len(c) for c in changes.values())
        starts = [[([0, *c])[k] for c in changes.values() if len(c) >= k] for k in range(n_tasks)]
        first, last = [min(col) for col in starts], [max(col) for col in starts]
        fig, axes = _figure()
        ax = axes[0, 0]
        md_rows = []
        for m in report.methods:
            group = report.group(env, m)
            if not group:
                continue
            per_run = np.full((len(group), n_tasks), np.nan)
            for i, r in enumerate(group):
                means = task_means(r.scalars[report.metric], changes[id(r)], run_complete(r))
                per_run[i, :len(means)] = means
            cells = []
            xs, means, ses, ns = [], [], [], []
            for k in range(n_tasks):
                done = per_run[:, k][np.isfinite(per_run[:, k])]
                if not len(done):
                    cells.append("–")
                    continue
                mean, se = mean_se(done)
                csv_rows.append((env, m, k + 1, first[k], last[k], mean, se, len(done), len(group)))
                xs.append(k + 1)
                means.append(mean)
                ses.append(se)
                ns.append(len(done))
                cells.append(fmt(mean) + ("" if not np.isfinite(se) else f" ± {fmt(se)}")
                             + ("" if len(done) == len(group) else f" (n={len(done)})"))
            md_rows.append([m, str(len(group)), *cells])
            if xs:
                x, y, e = np.array(xs), np.array(means), np.nan_to_num(np.array(ses))
                ax.plot(x, y, marker="o", color=colors[m], label=f"{m} (n={len(group)})")
                ax.fill_between(x, y - e, y + e, color=colors[m], alpha=0.2, lw=0)
                if min(ns) < len(group) or len(xs) < n_tasks:
                    report.note(f"{env} / {m}: not all of its {len(group)} runs finished every task; "
                                "a task's mean is over the runs that finished it")
        ax.set_xticks(range(1, n_tasks + 1))
        ax.set_xlabel("task (in the order the runs met them)")
        ax.set_ylabel(f"mean {report.metric} within the task")
        ax.set_title(f"{env}: return per task, mean ± standard error over seeds")
        ax.legend(fontsize="small", loc="best")
        figures.append((env, report.save(fig, f"task_returns_{slug(env)}.png")))
        header = ("method", "runs", *[f"task {k + 1} (from {first[k]:,})" for k in range(n_tasks)])
        tables.append(f"**{env}**\n\n" + markdown_table(header, md_rows))
    if not figures:
        return
    path = report.out / "task_returns.csv"
    write_csv(path, ("env", "method", "task", "start_step_first", "start_step_last", "mean", "se", "runs",
                     "runs_in_method"), csv_rows)
    report.written.append(path)
    report.sections.append(
        "## Return per task\n\nFor environments that change task (an `env/` scalar such as `env/friction` or "
        f"`env/task` changes): each run's mean `{report.metric}` within each of its tasks, then mean ± standard "
        "error over the runs that finished that task (n given where fewer than the method's runs). A run's task "
        "starts at the first step it logged the task's value (its first episode end there), so runs start a "
        "task at slightly different steps; the header gives the earliest (`start_step_first`, "
        "`start_step_last` in `task_returns.csv`).\n\n"
        + "\n\n".join(tables) + "\n\n"
        + "\n\n".join(f"![{env}: return per task]({p.name})" for env, p in figures))


def sensitivity(report: Report, key: str, stat: str, method_keys: Sequence[str] | None,
                colors: Mapping[str, Any]) -> None:
    """Final return against the swept key, methods labelled without it."""
    labels, order = method_labels(report.runs, method_keys, exclude={key})
    label_of = {id(r): label for r, label in zip(report.runs, labels)}
    missing = [r for r in report.runs if key not in r.config]
    if missing:
        report.note(f"sensitivity: {len(missing)} run(s) without {key} in their config left out")
    rows = []
    figures = []
    sweep_colors = colors if set(order) <= set(colors) else method_colors(order)
    metrics = _rliable()[1]
    for env in report.envs:
        cells: dict[str, dict[Any, list[Run]]] = {}
        for r in report.runs:
            if r.env == env and key in r.config:
                cells.setdefault(label_of[id(r)], {}).setdefault(r.config[key], []).append(r)
        if not cells:
            continue
        ci_input = {}
        for m in order:
            for x, group in cells.get(m, {}).items():
                ci_input[f"{m}\x00{x!r}"] = np.array([[report.score(r)] for r in group])
        estimates = iqm_intervals(ci_input, report.reps, report.seed) if stat == "iqm" else {}
        fig, axes = _figure()
        ax = axes[0, 0]
        curve_xs: list[float] = []
        references = []
        few: list[str] = []
        for m in order:
            if m not in cells:
                continue
            points = []
            for x in sorted(cells[m], key=_sortable):
                scores = [report.score(r) for r in cells[m][x]]
                mean, se = mean_se(scores)
                est = estimates.get(f"{m}\x00{x!r}", (float("nan"),) * 3)
                iqm_point = est[0] if stat == "iqm" else float(metrics.aggregate_iqm(np.array(scores)))
                rows.append((env, m, key, format_value(x), len(scores), mean, se, iqm_point, est[1], est[2]))
                y, lo, hi = (iqm_point, est[1], est[2]) if stat == "iqm" else (mean, mean - se, mean + se)
                points.append((x, y, lo, hi, len(scores)))
                if len(scores) < FEW_RUNS:
                    few.append(f"{m} at {key}={format_value(x)} ({len(scores)} run{'s' if len(scores) > 1 else ''})")
            numeric = [p for p in points if isinstance(p[0], (int, float)) and not isinstance(p[0], bool)]
            if len(points) == 1:
                references.append((m, points[0]))
            elif numeric:
                if len(numeric) < len(points):
                    report.note(f"sensitivity {env} / {m}: non-numeric {key} values not plotted")
                xs = np.array([float(p[0]) for p in numeric])
                ys = np.array([p[1] for p in numeric])
                err = np.array([[p[1] - p[2] for p in numeric], [p[3] - p[1] for p in numeric]])
                ax.errorbar(xs, ys, yerr=np.nan_to_num(err), color=sweep_colors[m], marker="o", capsize=3, lw=1.8,
                            label=f"{m} (n={'/'.join(sorted({str(p[4]) for p in numeric}, key=int))})")
                curve_xs += list(xs)
        log_x = bool(curve_xs) and min(curve_xs) > 0 and max(curve_xs) / min(curve_xs) > 10
        if log_x:
            ax.set_xscale("log")
        for m, (x, y, lo, hi, n) in references:
            ax.axhline(y, color=sweep_colors[m], ls="--", lw=1.5, label=f"{m}, {key}={format_value(x)} (n={n})")
            if math.isfinite(lo) and math.isfinite(hi):
                ax.axhspan(lo, hi, color=sweep_colors[m], alpha=0.12, lw=0)
        if few:
            report.note(f"sensitivity {env}: points from fewer than {FEW_RUNS} runs, without a meaningful "
                        f"{'interval' if stat == 'iqm' else 'standard error'}: {'; '.join(few)}")
        ax.set_xlabel(key + (" (log scale)" if log_x else ""))
        what = "IQM, 95% bootstrap CI" if stat == "iqm" else "mean ± standard error"
        ax.set_ylabel(f"final return ({what})")
        ax.set_title(f"{env}: sensitivity to {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
        figures.append((env, report.save(fig, f"sensitivity_{slug(key)}_{slug(env)}.png")))
    header = ("env", "method", "key", "value", "runs", "mean", "se", "iqm", "iqm_ci_low", "iqm_ci_high")
    path = report.out / f"sensitivity_{slug(key)}.csv"
    write_csv(path, header, rows)
    report.written.append(path)
    md = markdown_table(("env", "method", key, "runs", "mean ± s.e.", "IQM" + (" [95% CI]" if stat == "iqm" else "")),
                        [(r[0], r[1], r[3], r[4], f"{fmt(r[5])} ± {fmt(r[6])}",
                          fmt(r[7]) + (f" [{fmt(r[8])}, {fmt(r[9])}]" if stat == "iqm" else "")) for r in rows])
    report.sections.append(
        f"## Sensitivity to `{key}`\n\nFinal return per value of `{key}`; methods are labelled without it. A "
        "method with a single value is drawn as a dashed reference line. Data: "
        f"`{path.name}`.\n\n" + "\n\n".join(f"![{env}: sensitivity]({p.name})" for env, p in figures) + "\n\n" + md)


def diagnostics(report: Report, colors: Mapping[str, Any]) -> None:
    """diagnostics_<env>.png: one panel per diagnostic with data, one line per method (mean over seeds)."""
    figures = []
    for env in report.envs:
        env_runs = [r for r in report.runs if r.env == env]
        tags = set().union(*(r.scalars for r in env_runs))
        networks = sorted({t.split("/")[1] for t in tags if t.startswith("plasticity/") and t.count("/") == 2},
                          key=lambda n: ({"critic": 0, "actor": 1}.get(n, 2), n))
        panels: list[tuple[str, Callable[[Run], Series | None]]] = []
        for title, tag in VALUE_METRICS:
            if tag in tags:
                panels.append((title, lambda r, tag=tag: r.scalars.get(tag)))
        for net in networks:
            for title, candidates in NETWORK_METRICS:
                present = [c for c in candidates if f"plasticity/{net}/{c}" in tags]
                if present:
                    tag = f"plasticity/{net}/{present[0]}"
                    panels.append((f"{net}: {title}", lambda r, tag=tag: r.scalars.get(tag)))
        if not panels:
            report.note(f"{env}: no plasticity diagnostics logged; no diagnostics figure")
            continue
        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig, axes = _figure(nrows, ncols, size=(4.2 * ncols, 3.0 * nrows + 0.6))
        handles = {}
        counts: dict[str, int] = {}
        partial = []
        for ax, (title, get) in zip(axes.flat, panels):
            values = []
            for m in report.methods:
                series = [s for s in (get(r) for r in report.group(env, m)) if s is not None]
                if not series:
                    continue
                curve = mean_curve(series)
                line = plot_curve(ax, curve, colors[m], m, len(series))
                if (curve.runs < len(series)).any():
                    partial.append(f"{m}: {title}")
                handles.setdefault(m, line)
                counts[m] = max(counts.get(m, 0), len(series))
                values.append(curve.mean)
            allv = np.concatenate(values) if values else np.zeros(0)
            if len(allv) and allv.min() > 0 and allv.max() / allv.min() > 100:
                ax.set_yscale("log")
            ax.set_title(title, fontsize="medium")
            _steps_axis(ax)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        ordered = [m for m in report.methods if m in handles]
        fig.suptitle(f"{env}: plasticity diagnostics (mean ± s.e. over seeds"
                     + ("; dashed: fewer runs than the method has)" if partial else ")"))
        labels = [f"{m} (n={counts[m]}{': no s.e.' if counts[m] == 1 else ''})" for m in ordered]
        fig.legend([handles[m] for m in ordered], labels, loc="outside lower center",
                   ncols=min(len(ordered), 4), fontsize="small")
        if partial:
            report.note(f"{env} diagnostics: runs of different lengths; dashed where fewer runs average "
                        f"({len(partial)} panel line(s), e.g. {partial[0]})")
        figures.append((env, report.save(fig, f"diagnostics_{slug(env)}.png")))
    if figures:
        report.sections.append("## Plasticity diagnostics\n\nMean ± standard error over seeds, on each run's probe "
                               "batch (`plasticity/<network>/...`) and at evaluation (`value/overestimation`).\n\n"
                               + "\n\n".join(f"![{env}: diagnostics]({p.name})" for env, p in figures))


# ----------------------------------------------------------------------------------------------
# Curvature (issue 18, part 5)
# ----------------------------------------------------------------------------------------------
def env_task_changes(runs: Sequence[Run]) -> list[int]:
    """Steps at which a non-stationary env's task value (`env/friction`, `env/task`, any `env/`
    scalar) differs from its previous logged value in any of `runs`: where the env changed task."""
    steps: set[int] = set()
    for r in runs:
        for tag, (xs, ys) in r.scalars.items():
            if tag.startswith("env/") and len(ys) > 1:
                steps.update(int(x) for x in xs[1:][np.diff(ys) != 0])
    return sorted(steps)


def _curvature_networks(tags: Iterable[str], prefix: str) -> list[str]:
    metrics = {m for _, m in CURVATURE_METRICS} | {"overlap"}
    nets = {t.split("/")[1] for t in tags if t.startswith(prefix + "/") and t.count("/") == 2
            and t.rsplit("/", 1)[1] in metrics}
    return sorted(nets, key=lambda n: ({"critic": 0, "actor": 1, "policy": 0, "value": 1}.get(n, 2), n))


def _mark_task_changes(ax: Any, env_changes: Sequence[int], starts: Mapping[str, Sequence[int]],
                       colors: Mapping[str, Any]) -> None:
    for x in env_changes:
        ax.axvline(x, color="0.5", lw=1.0, ls="-", alpha=0.6, zorder=0)
    for m, xs in starts.items():
        for x in xs:
            ax.axvline(x, color=colors[m], lw=0.8, ls=":", alpha=0.7, zorder=0)


def curvature(report: Report, colors: Mapping[str, Any]) -> None:
    """curvature_<env>.png (every measurement) and curvature_task_<env>.png (task starts only):
    one row per network, one panel per CURVATURE_METRICS entry, mean ± s.e. over seeds against env
    steps, task changes marked; curvature.csv holds every plotted point."""
    csv_rows = []
    figures = []
    for env in report.envs:
        env_runs = [r for r in report.runs if r.env == env]
        tags = set().union(*(r.scalars for r in env_runs))
        env_changes = env_task_changes(env_runs)
        starts = {}
        for m in report.methods:
            xs = sorted({int(x) for r in report.group(env, m) if TASK_CHANGE_TAG in r.scalars
                         for x in r.scalars[TASK_CHANGE_TAG][0]})
            if xs:
                starts[m] = xs
        for prefix, what in (("curvature", "every measurement"), ("curvature_task", "at task starts")):
            networks = _curvature_networks(tags, prefix)
            if not networks:
                continue
            panels = []
            for net in networks:
                for title, metric in CURVATURE_METRICS:
                    if metric == "overlap_top" and f"{prefix}/{net}/overlap_top" not in tags:
                        metric, title = "overlap", "gradient–Hessian overlap"
                    if f"{prefix}/{net}/{metric}" in tags:
                        panels.append((net, title, f"{prefix}/{net}/{metric}"))
            ncols = min(len(CURVATURE_METRICS), len(panels))
            nrows = math.ceil(len(panels) / ncols)
            fig, axes = _figure(nrows, ncols, size=(3.9 * ncols, 3.0 * nrows + 0.9))
            handles: dict[str, Any] = {}
            counts: dict[str, int] = {}
            for ax, (net, title, tag) in zip(axes.flat, panels):
                values = []
                for m in report.methods:
                    series = [r.scalars[tag] for r in report.group(env, m) if tag in r.scalars]
                    if not series:
                        continue
                    c = mean_curve(series)
                    handles.setdefault(m, plot_curve(ax, c, colors[m], m, len(series)))
                    counts[m] = max(counts.get(m, 0), len(series))
                    values.append(c.mean)
                    csv_rows += [(env, m, tag, int(x), float(y), float(e), int(n))
                                 for x, y, e, n in zip(c.steps, c.mean, c.se, c.runs)]
                allv = np.concatenate(values) if values else np.zeros(0)
                if len(allv) and allv.min() > 0 and allv.max() / allv.min() > 100:
                    ax.set_yscale("log")
                _mark_task_changes(ax, env_changes, starts, colors)
                ax.set_title(f"{net}: {title}", fontsize="medium")
                ax.set_ylabel(tag.rsplit("/", 1)[1], fontsize="small")
                _steps_axis(ax)
            for ax in list(axes.flat)[len(panels):]:
                ax.set_visible(False)
            ordered = [m for m in report.methods if m in handles]
            labels = [f"{m} (n={counts[m]}{': no s.e.' if counts[m] == 1 else ''})" for m in ordered]
            from matplotlib.lines import Line2D

            extra, extra_labels = [], []
            if env_changes:
                extra.append(Line2D([], [], color="0.5", lw=1.0))
                extra_labels.append("env task change")
            if starts:
                extra.append(Line2D([], [], color="0.3", lw=0.8, ls=":"))
                extra_labels.append("curvature measured at a task start (method's colour)")
            fig.legend([handles[m] for m in ordered] + extra, labels + extra_labels, loc="outside lower center",
                       ncols=min(len(ordered) + len(extra), 4), fontsize="small")
            fig.suptitle(textwrap.fill(f"{env}: curvature of each network's unregularized loss, {what} "
                                       "(mean ± s.e. over seeds)", max(40, int(11 * 3.9 * ncols))))
            name = f"{prefix}_{slug(env)}.png"
            figures.append((env, what, report.save(fig, name)))
    if not figures:
        return
    path = report.out / "curvature.csv"
    write_csv(path, ("env", "method", "tag", "step", "mean", "se", "runs"), csv_rows)
    report.written.append(path)
    report.sections.append(
        "## Curvature\n\nThe curvature diagnostics of each network's unregularized loss "
        "(`rl_plasticity/plasticity/curvature.py`): empirical-Fisher rank, normalised ε-Hessian rank, sharpness, "
        "gradient–Hessian overlap and gradient diversity, mean ± standard error over seeds; grey lines: the env "
        "changed task (an `env/` value differs from the one logged at the episode end before; a change before the "
        "first logged episode end is not seen), dotted lines in a method's colour: its curvature measurements at "
        "task starts (resets, and env changes; SAC measures an env change on the first batch of the new task's "
        "transitions, so a little after it). Data: `curvature.csv`.\n\n"
        + "\n\n".join(f"![{env}: curvature, {what}]({p.name})" for env, what, p in figures))


def parse_density_tasks(text: str) -> list[int | str]:
    """`--density-tasks`: comma-separated 1-based indices of the task starts (negative: from the
    end), or the words first, middle, last."""
    out: list[int | str] = []
    for part in (t.strip() for t in text.split(",")):
        if part in ("first", "middle", "last"):
            out.append(part)
        else:
            try:
                value = int(part)
            except ValueError:
                fail(f"--density-tasks: '{part}' is not a task-start index (1, 2, -1, ...) or first/middle/last")
            if value == 0:
                fail("--density-tasks: indices are 1-based (1 = the first task start, -1 = the last)")
            out.append(value)
    if not out:
        fail("--density-tasks: give at least one task start")
    return out


def _resolve_index(choice: int | str, n: int) -> int | None:
    """0-based position of a --density-tasks choice among `n` measurements (None if out of range)."""
    index = {"first": 0, "middle": (n - 1) // 2, "last": n - 1}.get(choice) if isinstance(choice, str) else (
        choice - 1 if choice > 0 else n + choice)
    return index if 0 <= index < n else None


def density_on_grid(limits: np.ndarray, counts: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """A density histogram (right bucket limits, probability mass per bucket, equal widths, as
    `curvature.density_histogram` writes it) as a density (mass / width) at `grid`: linear between
    bucket centres, 0 outside the buckets."""
    width = float(limits[1] - limits[0]) if len(limits) > 1 else 1.0
    centres = limits - width / 2
    return np.interp(grid, centres, counts / width, left=0.0, right=0.0)


def hessian_density(report: Report, colors: Mapping[str, Any], choices: Sequence[int | str]) -> None:
    """hessian_density_<env>.png + hessian_density.csv: the SLQ Hessian eigenvalue density at the
    chosen task starts (`curvature_task/<net>/hessian_density`; without task starts, at the chosen
    periodic measurements `curvature/<net>/hessian_density`), one panel per (network, method), one
    line per chosen start, mean over the seeds on a common grid (log scale, as App. F of
    spectral-collapse-l2-er.md)."""
    csv_rows = []
    figures = []
    for env in report.envs:
        env_runs = [r for r in report.runs if r.env == env]
        hist_tags = set().union(*(r.histograms for r in env_runs))
        nets = sorted({t.split("/")[1] for t in hist_tags if t.endswith(DENSITY_SUFFIX)},
                      key=lambda n: ({"critic": 0, "actor": 1, "policy": 0, "value": 1}.get(n, 2), n))
        if not nets:
            continue
        methods = [m for m in report.methods if report.group(env, m)]
        fig, axes = _figure(len(nets), len(methods), size=(3.8 * len(methods), 3.1 * len(nets) + 0.8))
        cmap = __import__("matplotlib").colormaps["viridis"]
        drawn = False
        for row, net in enumerate(nets):
            for col, m in enumerate(methods):
                ax = axes[row, col]
                task_tag, periodic_tag = f"curvature_task/{net}{DENSITY_SUFFIX}", f"curvature/{net}{DENSITY_SUFFIX}"
                group = report.group(env, m)
                tag = task_tag if any(task_tag in r.histograms for r in group) else periodic_tag
                kind = "task start" if tag == task_tag else "measurement"
                per_run = [r.histograms[tag] for r in group if tag in r.histograms]
                seen: set[tuple] = set()  # choices naming the same starts (first = middle of 2) drawn once
                for i, choice in enumerate(choices):
                    resolved = tuple((j, _resolve_index(choice, len(h))) for j, h in enumerate(per_run))
                    resolved = tuple((j, k) for j, k in resolved if k is not None)
                    if not resolved or resolved in seen:
                        continue
                    seen.add(resolved)
                    picked = [(per_run[j][k], len(per_run[j])) for j, k in resolved]
                    lo = min(float(lim[0] - (lim[1] - lim[0])) for (_, lim, _), _ in picked)
                    hi = max(float(lim[-1]) for (_, lim, _), _ in picked)
                    grid = np.linspace(lo, hi, 300)
                    density = np.mean([density_on_grid(lim, cnt, grid) for (_, lim, cnt), _ in picked], axis=0)
                    steps = sorted({int(step) for (step, _, _), _ in picked})
                    indices = sorted({_resolve_index(choice, n) + 1 for _, n in picked})
                    step_text = f"{steps[0]:,}" if len(steps) == 1 else f"{steps[0]:,}–{steps[-1]:,}"
                    index_text = "/".join(map(str, indices))
                    label = f"{kind} {index_text} (step {step_text}, n={len(picked)})"
                    color = cmap(i / max(len(choices) - 1, 1) * 0.9)
                    ax.plot(grid, np.where(density > 0, density, np.nan), color=color, lw=1.4, label=label)
                    csv_rows += [(env, m, net, kind, index_text, step_text, len(picked), float(x), float(y))
                                 for x, y in zip(grid, density)]
                    drawn = True
                ax.set_yscale("log")
                ax.set_title(f"{m}: {net}", fontsize="medium", color=colors[m])
                ax.set_xlabel("Hessian eigenvalue λ")
                ax.set_ylabel("density")
                ax.grid(alpha=0.3)
                if ax.lines:
                    top = max(float(np.nanmax(line.get_ydata())) for line in ax.lines)
                    ax.set_ylim(top * 1e-7, top * 3)
                    ax.legend(fontsize="x-small", loc="upper right")
        fig.suptitle(textwrap.fill(f"{env}: Hessian eigenvalue density (SLQ, Gaussian-smoothed) at chosen task starts, "
                                   "mean over seeds", max(40, int(11 * 3.8 * len(methods)))))
        if drawn:
            figures.append((env, report.save(fig, f"hessian_density_{slug(env)}.png")))
    if not figures:
        return
    path = report.out / "hessian_density.csv"
    write_csv(path, ("env", "method", "network", "kind", "index", "steps", "runs", "eigenvalue", "density"), csv_rows)
    report.written.append(path)
    report.sections.append(
        "## Hessian eigenvalue density\n\nThe SLQ estimate of each network's Hessian eigenvalue density "
        "(spectral-collapse-l2-er.md App. F.1; the `.../hessian_density` histograms the loops write, probability "
        "mass per bucket divided by the bucket width) at the chosen task starts (`--density-tasks`: index among "
        "each run's task starts, per run), averaged over seeds on a common grid. Runs without task-start "
        "measurements are drawn at their periodic measurements instead (labelled `measurement`). Data: "
        "`hessian_density.csv`.\n\n"
        + "\n\n".join(f"![{env}: Hessian density]({p.name})" for env, p in figures))


def runs_table(report: Report) -> None:
    rows = [(r.env, r.method, format_value(r.seed), int(r.scalars[report.metric][0][-1]), report.score(r),
             r.config_source, shown_path(r.path)) for r in sorted(report.runs, key=lambda r: (r.env, r.method, str(r.path)))]
    path = report.out / "runs.csv"
    write_csv(path, ("env", "method", "seed", "final_step", "final_return", "config_from", "run_dir"), rows)
    report.written.append(path)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rl_plasticity.report",
        description="Learning curves, final-performance table (IQM with stratified-bootstrap 95% CIs), "
                    "hyper-parameter sensitivity and plasticity diagnostics from the TensorBoard event files "
                    "of many runs, grouped by environment and method (seeds pooled).")
    parser.add_argument("runs", nargs="+", metavar="RUNS_DIR",
                        help="directories searched recursively for run dirs (dirs holding events.out.tfevents.*)")
    parser.add_argument("--out", default="report", help="output directory (default: ./report)")
    parser.add_argument("--sweep", metavar="KEY", help="config key for the sensitivity plot, e.g. plasticity.coef "
                                                       "or agent.reset_interval")
    parser.add_argument("--sweep-stat", choices=("mean", "iqm"), default="mean",
                        help="sensitivity points: mean ± standard error (default) or IQM with 95%% bootstrap CI")
    parser.add_argument("--method-keys", metavar="KEY,KEY",
                        help="label methods by these config keys only (default: derived from the config)")
    parser.add_argument("--last-k", type=int, default=1, metavar="K",
                        help="final performance = mean of the last K evaluations (default 1: the last one)")
    parser.add_argument("--metric", default=RETURN_TAG, help=f"scalar tag of the return (default {RETURN_TAG})")
    parser.add_argument("--reps", type=int, default=DEFAULT_REPS, help=f"bootstrap resamples (default {DEFAULT_REPS})")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap random seed (default 0)")
    parser.add_argument("--density-tasks", default="first,middle,last", metavar="K,K",
                        help="task starts whose Hessian eigenvalue density is drawn: 1-based indices among each run's "
                             "task starts (negative: from the end) or first/middle/last (default first,middle,last)")
    return parser.parse_args(argv)


def _check_key(key: str, runs: Sequence[Run], option: str) -> None:
    if any(key in r.config for r in runs):
        return
    known = sorted(set().union(*(r.config for r in runs)))
    fail(f"{option}: no run's config has the key '{key}'." + did_you_mean(key, known, n=3, cutoff=0.6))


def collect_runs(paths: Sequence[str], metric: str) -> tuple[list[Run], list[tuple[Path, str]]]:
    run_dirs: list[Path] = []
    for arg in paths:
        path = Path(arg)
        if not path.exists():
            fail(f"no such file or directory: {arg}")
        if path.is_file() and path.name.startswith(EVENT_PREFIX):
            path = path.parent
        if not path.is_dir():
            fail(f"not a directory of runs: {arg}")
        found = find_run_dirs(path)
        if not found:
            fail(f"no TensorBoard event files ({EVENT_PREFIX}*) under {arg}")
        run_dirs += found
    runs, skipped = [], []
    for run_dir in dict.fromkeys(p.resolve() for p in run_dirs):
        loaded = load_run(run_dir, metric)
        if isinstance(loaded, Run):
            runs.append(loaded)
        else:
            skipped.append((run_dir, loaded))
    return runs, skipped


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.last_k < 1:
        fail(f"--last-k must be >= 1, got {args.last_k}")
    if args.reps < 1:
        fail(f"--reps must be >= 1, got {args.reps}")
    density_choices = parse_density_tasks(args.density_tasks)
    runs, skipped = collect_runs(args.runs, args.metric)
    for run_dir, reason in skipped:
        print(f"skipped {run_dir}: {reason}")
    if not runs:
        fail(f"none of the {len(skipped)} run(s) under {', '.join(args.runs)} can be reported (see the skipped lines)")
    method_keys = [k.strip() for k in args.method_keys.split(",") if k.strip()] if args.method_keys else None
    for key in method_keys or []:
        _check_key(key, runs, "--method-keys")
    if args.sweep:
        _check_key(args.sweep, runs, "--sweep")
    labels, methods = method_labels(runs, method_keys)
    for run, label in zip(runs, labels):
        run.method = label
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f"cannot create the output directory {out}: {error.strerror}")
    report = Report(runs, methods, sorted({r.env for r in runs}), args.metric, args.last_k, args.reps, args.seed, out)
    dropped = sum(r.dropped_points for r in runs)
    if dropped:
        report.note(f"{dropped} non-finite scalar value(s) left out")
    colors = method_colors(methods)
    table(report)
    curves(report, colors)
    task_returns(report, colors)
    if args.sweep:
        sensitivity(report, args.sweep, args.sweep_stat, method_keys, colors)
    diagnostics(report, colors)
    curvature(report, colors)
    hessian_density(report, colors, density_choices)
    runs_table(report)

    header = (f"# Report: {len(runs)} runs, {len(report.envs)} environment(s), {len(methods)} method(s)\n\n"
              f"Runs from {', '.join(f'`{p}`' for p in args.runs)}; seeds pooled within each environment and "
              "method. Per-run final returns: `runs.csv`.")
    method_rows = []
    for m in methods:
        members = [r for r in runs if r.method == m]
        method_rows.append((m, len(members), ", ".join(sorted({r.env for r in members}))))
    parts = [header, *report.sections, "## Methods\n\n" + markdown_table(("method", "runs", "environments"), method_rows)]
    if skipped:
        parts.append("## Skipped runs\n\n" + "\n".join(f"- `{p}`: {reason}" for p, reason in skipped))
    if report.notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in report.notes))
    summary = out / "summary.md"
    summary.write_text("\n\n".join(parts) + "\n")
    report.written.append(summary)
    for path in report.written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
