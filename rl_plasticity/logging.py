"""TensorBoard writer and console progress line: the only place that writes metrics."""
from __future__ import annotations

import contextlib
import math
import re
import sys
import time
from pathlib import Path
from typing import IO, Iterator, Mapping

import torch
from torch.utils.tensorboard import SummaryWriter

from rl_plasticity import names


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Logger:
    """Scalars to TensorBoard (one namespace per concern: charts/, eval/, losses/, value/, ...)
    and a one-line progress report on the console."""

    def __init__(self, run_dir: str, total_steps: int, stream=None, purge_step: int | None = None,
                 label: str = "", progress_every_s: float = 30.0, start_step: int = 0, start_updates: int = 0,
                 mirror: "WandbMirror | None" = None):
        self.writer = SummaryWriter(log_dir=run_dir, purge_step=purge_step)
        self.mirror = mirror  # Weights & Biases, when log.wandb=true: the same tags, against the same steps
        self.total_steps = total_steps
        self.label = f"{label} | " if label else ""  # names the seed on the console in a multi-seed run
        self._stream = stream  # None: sys.stdout at the time of writing (tee_console's, in a run)
        self.last_return: float | None = None
        self.console = ConsoleProgress(progress_every_s, start_step, start_updates)

    def dashboard(self, networks: list[str], losses: tuple[str, ...] = ("critic", "actor", "alpha", "plasticity"),
                  values: tuple[str, ...] = ("q_mean", "alpha", "entropy"),
                  env_tags: Mapping[str, str] | tuple[str, ...] = (), task_returns: tuple[str, ...] = ()) -> None:
        """Register a custom-scalars layout so the run opens as a dashboard (CUSTOM SCALARS tab).

        `losses` and `values` name the agent's `losses/*` and `value/*` tags; `env_tags` (a
        non-stationary env's `env/friction`, `env/task`, each with its chart title: the env's
        `episode_tags`) get a chart each beside the returns; `task_returns` (`eval.all_tasks`'s
        `eval/<task>/return_mean`) one chart together.  See `dashboard_layout`."""
        self.writer.add_custom_scalars(dashboard_layout(networks, losses, values, env_tags, task_returns))

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, 0)

    def scalar(self, tag: str, value: float | torch.Tensor, step: int) -> None:
        self.writer.add_scalar(tag, float(value), step)
        if self.mirror is not None:
            self.mirror.log({tag: float(value)}, step)

    def scalars(self, values: Mapping[str, float | torch.Tensor], step: int) -> None:
        """Write many scalars; device tensors are moved to the host in one transfer."""
        if not values:
            return
        tags = list(values)
        tensors = [torch.as_tensor(values[t], dtype=torch.float32).reshape(()) for t in tags]
        host = torch.stack([t.to(tensors[0].device) for t in tensors]).cpu().tolist()
        for tag, v in zip(tags, host):
            self.writer.add_scalar(tag, v, step)
        if self.mirror is not None:
            self.mirror.log(dict(zip(tags, host)), step)

    def episode(self, episode_return: float, length: int, step: int) -> None:
        self.last_return = episode_return
        self.writer.add_scalar(names.EPISODE_RETURN, episode_return, step)
        self.writer.add_scalar(names.EPISODE_LENGTH, length, step)
        if self.mirror is not None:
            self.mirror.log({names.EPISODE_RETURN: episode_return, names.EPISODE_LENGTH: length}, step)

    def progress(self, step: int, updates: int, learning_starts: int = 0) -> None:
        """Console: one progress line (see `ConsoleProgress`)."""
        line = self.console.line(step, updates, self.total_steps, learning_starts, self.last_return)
        print(self.label + line, file=self._stream or sys.stdout, flush=True)

    def tick(self, step: int, updates: int, learning_starts: int = 0) -> None:
        """Called after every env step: a progress line when `progress_every_s` seconds have passed
        since the last one, so that a slow run never looks hung between `log.every` lines."""
        self.console.observe(step, learning_starts)
        if self.console.due():
            self.progress(step, updates, learning_starts)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        if self.mirror is not None:
            self.mirror.close()


class WandbMirror:
    """The run's scalars and resolved config, mirrored to Weights & Biases (`log.wandb=true`).

    Every scalar goes under its TensorBoard tag against a `global_step` metric (env steps), so
    the W&B charts have the TensorBoard curves' x axis.  The W&B run id is kept in
    `<run_dir>/wandb_run_id`: a resumed run continues the same W&B run (`resume="allow"`); W&B
    cannot drop points, so what a killed process logged after its last checkpoint stays there
    (TensorBoard purges it).  W&B's own files go to `<run_dir>/wandb/`; `mode=offline` needs no
    network (`wandb sync <run_dir>/wandb/offline-run-*` uploads later).
    """

    ID_FILE = "wandb_run_id"

    def __init__(self, run_dir: str | Path, config: Mapping, project: str, entity: str | None, group: str | None,
                 tags: tuple[str, ...], mode: str, name: str):
        import uuid

        import wandb

        id_file = Path(run_dir) / self.ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        self.run = wandb.init(project=project, entity=entity, group=group, tags=list(tags), name=name, id=run_id,
                              resume="allow", dir=str(run_dir), config=dict(config), mode=mode,
                              settings=wandb.Settings(console="off", save_code=False))
        id_file.write_text(run_id + "\n")
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.run.log({**values, "global_step": step})

    def close(self) -> None:
        self.run.finish()


class ConsoleProgress:
    """What the console's progress lines say, and when a line is due on a time basis.

    Rates are over the interval since the previous line.  The ETA is estimated from the learning
    phase only (env steps after `learning_starts`, the random prefill excluded, whose steps are
    hundreds of times faster): during prefill it is unknown and the line says when learning starts.
    """

    def __init__(self, every_s: float = 30.0, start_step: int = 0, start_updates: int = 0):
        self.every_s = float(every_s)
        self._last: tuple[float, int, int] | None = None      # (time, step, updates) of the previous line
        self._start = (start_step, start_updates)
        self._learning: tuple[float, int] | None = None       # (time, step) of the first line in the learning phase
        self._t0 = self._t_line = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._t_line >= self.every_s

    def observe(self, step: int, learning_starts: int) -> None:
        """Note the first step of the learning phase (the ETA's rate is measured from there)."""
        if self._learning is None and step >= learning_starts:
            self._learning = (time.monotonic(), step)

    def line(self, step: int, updates: int, total: int, learning_starts: int, last_return: float | None) -> str:
        now = time.monotonic()
        t_prev, step_prev, upd_prev = self._last if self._last is not None else (self._t0, *self._start)
        dt = max(now - t_prev, 1e-9)
        sps, ups = (step - step_prev) / dt, (updates - upd_prev) / dt
        self._last, self._t_line = (now, step, updates), now
        self.observe(step, learning_starts)
        if step >= total:
            eta = "0m00s"
        elif self._learning is None:
            eta = f"after prefill (learning starts at step {learning_starts:,})"
        elif step > self._learning[1]:
            rate = (step - self._learning[1]) / max(now - self._learning[0], 1e-9)
            eta = _fmt_duration((total - step) / rate)
        else:
            eta = "? (measuring)"
        ret = "n/a" if last_return is None else f"{last_return:.1f}"
        pct = 100.0 * step / max(total, 1)
        return (f"step {step:>9,}/{total:,} ({pct:5.1f}%) | {sps:7.1f} steps/s | {ups:8.1f} updates/s | "
                f"return {ret} | elapsed {_fmt_duration(now - self._t0)} | ETA {eta}")


class RateMeter:
    """Steps and updates per second over the interval since the last `rates()` call."""

    def __init__(self, step: int = 0, updates: int = 0):
        self.t0 = self.t_last = time.perf_counter()
        self.step_last, self.upd_last = step, updates

    def rates(self, step: int, updates: int) -> tuple[float, float]:
        now = time.perf_counter()
        dt = max(now - self.t_last, 1e-9)
        sps, ups = (step - self.step_last) / dt, (updates - self.upd_last) / dt
        self.t_last, self.step_last, self.upd_last = now, step, updates
        return sps, ups

# The custom-scalars dashboard: one unit per chart (steps/s and updates/s, or a parameter norm and a
# gradient norm, differ by orders of magnitude and would flatten each other on a shared axis).
# (chart title, tags under plasticity/<network>/): several tags only where they share a unit.  The
# data-dependent ones (mixin.DATA_METRICS) are drawn beside their value on the fixed reference batch
# (plasticity_ref/<network>/...), the same quantity in the same unit.
NETWORK_CHARTS = (
    ("spectral norm σ₁ (max and mean over layers)", ("spectral_norm_max", "spectral_norm_mean")),
    ("parameter norm ‖θ‖", ("param_norm",)),
    ("gradient norm ‖∇θ‖", ("grad_norm",)),
    ("update norm ‖Δθ‖ of the last step", ("update_norm",)),
    ("distance from initialisation ‖θ − θ₀‖", ("distance_from_init",)),
    ("feature effective rank (last hidden layer)", ("feature_effective_rank",)),
    ("dormant and dead fractions of hidden units", ("dormant_fraction", "dead_fraction")),
    ("dead units (count)", ("dead_units",)),
    ("units replaced by CBP (count)", ("cbp_replaced",)),
    ("units recycled by ReDo (count)", ("redo_recycled",)),
    ("shrink-and-perturb and partial-reset applications (count)", ("shrink_perturb_count", "partial_resets")),
    ("plasticity injected (0 or 1)", ("injected",)),
)
# Per-layer diagnostics (plasticity/<network>/layer<i>/<metric>): one chart per metric, every layer
# (and, for the feature metrics, the reference batch) as its own line.
LAYER_CHARTS = (
    ("stable rank ‖W‖²_F / ‖W‖²₂ per layer", "stable_rank"),
    ("largest singular value σ_max per layer", "sigma_max"),
    ("smallest singular value σ_min per layer", "sigma_min"),
    ("feature srank₉₉ per hidden layer", "feature_srank"),
    ("feature effective rank per hidden layer", "feature_effective_rank"),
    ("fraction of active (> 0) unit activations per hidden layer", "active_fraction"),
    ("mean feature norm ‖h‖ per hidden layer", "feature_norm"),
)
LAYER_DATA_METRICS = frozenset({"feature_srank", "feature_effective_rank", "active_fraction", "feature_norm"})
REFERENCE_METRICS = frozenset({"feature_effective_rank", "dormant_fraction", "dead_fraction", "dead_units"})
# Curvature (plasticity/curvature.py, curvature/<network>/<metric>): each chart shows the periodic
# measurement and the one at task starts (curvature_task/<network>/<metric>), the same unit.
CURVATURE_CHARTS = (
    ("empirical-Fisher rank (srank₉₉ / max)", ("fisher_rank",)),
    ("empirical-Fisher rank (count)", ("fisher_rank_count",)),
    ("ε-Hessian rank (fraction of parameters)", ("epsilon_rank",)),
    ("Hessian extreme eigenvalues: sharpness λ_max and λ_min", ("sharpness", "lambda_min")),
    ("gradient–Hessian overlap gᵀHg/(‖g‖‖Hg‖): full and top subspace", ("overlap", "overlap_top")),
    ("gradient diversity: effective rank of per-sample gradients", ("grad_erank",)),
    ("gradient diversity: condition number of per-sample gradients", ("grad_condition",)),
    ("gradient norm ‖∇θ‖ of the unregularized loss", ("grad_norm",)),
)
VALUE_TITLES = {"q_mean": "mean Q on the batch", "alpha": "temperature α", "entropy": "policy entropy −log π",
                "log_std": "policy log σ (mean)"}


def _chart(*tags: str) -> list:
    """A multiline chart of exactly these tags (custom scalars reads each entry as a regex)."""
    return ["Multiline", [f"^{re.escape(tag)}$" for tag in tags]]


def _layer_chart(net: str, metric: str) -> list:
    """A multiline chart of `metric` of every layer of `net` (and on the reference batch, for the
    features), as one regex: the number of layers is not known before the first diagnostic."""
    prefix = "plasticity(_ref)?" if metric in LAYER_DATA_METRICS else "plasticity"
    return ["Multiline", [f"^{prefix}/{re.escape(net)}/layer[0-9]+/{re.escape(metric)}$"]]


def dashboard_layout(networks: list[str], losses: tuple[str, ...] = ("critic", "actor", "alpha", "plasticity"),
                     values: tuple[str, ...] = ("q_mean", "alpha", "entropy"),
                     env_tags: Mapping[str, str] | tuple[str, ...] = (),
                     task_returns: tuple[str, ...] = ()) -> dict[str, dict[str, list]]:
    """The custom-scalars layout {category: {chart title: ["Multiline", [tag regexes]]}}: returns,
    speed, losses, values and per network its plasticity diagnostics (network-wide, per layer) and
    its curvature diagnostics, one unit per chart.  Charts of what a run does not measure (CBP's
    replaced units without CBP, curvature with `plasticity.curvature_every` null) stay empty."""
    returns = {"episode and evaluation return": _chart(names.EPISODE_RETURN, names.EVAL_RETURN),
               "env steps per second": _chart(names.ENV_STEPS_PER_S),
               "gradient updates per second": _chart(names.UPDATES_PER_S)}
    if task_returns:
        returns["evaluation return on each task"] = _chart(*task_returns)
    titles = env_tags if isinstance(env_tags, Mapping) else {tag: tag for tag in env_tags}
    for tag, title in titles.items():
        returns[title] = _chart(tag)
    layout = {
        "Return": returns,
        "Losses": {name: _chart(f"losses/{name}") for name in losses},
        "Value": {"Q overestimation (return units)": _chart(names.OVERESTIMATION),
                  **{VALUE_TITLES.get(v, v): _chart(f"value/{v}") for v in values}},
    }
    for net in networks:
        charts = {}
        for title, metrics in NETWORK_CHARTS:
            tags = [f"plasticity/{net}/{m}" for m in metrics]
            tags += [f"plasticity_ref/{net}/{m}" for m in metrics if m in REFERENCE_METRICS]
            charts[title] = _chart(*tags)
        layout[f"Plasticity: {net}"] = charts
        layout[f"Plasticity per layer: {net}"] = {title: _layer_chart(net, metric) for title, metric in LAYER_CHARTS}
        layout[f"Curvature: {net}"] = {
            title: _chart(*(f"{prefix}/{net}/{m}" for m in metrics for prefix in ("curvature", "curvature_task")))
            for title, metrics in CURVATURE_CHARTS}
    if networks:
        layout["Curvature: task starts"] = {
            "task starts measured (1 at each)": _chart(names.TASK_CHANGE),
            "gradient updates between the task change and its measurement": _chart(names.UPDATES_SINCE_CHANGE)}
    return layout


class _Tee:
    """A text stream that writes to the console stream and to a log file (flushed per write)."""

    def __init__(self, console: IO[str], file: IO[str]):
        self.console, self.file = console, file

    def write(self, text: str) -> int:
        self.file.write(text)
        self.file.flush()
        return self.console.write(text)

    def flush(self) -> None:
        self.console.flush()
        self.file.flush()

    def __getattr__(self, name: str):  # isatty, fileno, encoding, ...: the console's
        return getattr(self.console, name)


@contextlib.contextmanager
def tee_console(path: str | Path) -> Iterator[None]:
    """Everything printed to stdout and stderr (progress lines, messages, warnings) is also
    appended to `path` (a run's `train.log`) while the context is open."""
    with open(path, "a", encoding="utf-8") as f:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, f), _Tee(err, f)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err
