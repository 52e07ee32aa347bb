"""TensorBoard writer and console progress line: the only place that writes metrics."""
from __future__ import annotations

import math
import re
import sys
import time
from typing import Mapping

import torch
from torch.utils.tensorboard import SummaryWriter


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

    def __init__(self, run_dir: str, total_steps: int, stream=sys.stdout, purge_step: int | None = None,
                 label: str = ""):
        self.writer = SummaryWriter(log_dir=run_dir, purge_step=purge_step)
        self.total_steps = total_steps
        self.label = f"{label} | " if label else ""  # names the seed on the console in a multi-seed run
        self.stream = stream
        self.last_return: float | None = None

    def dashboard(self, networks: list[str], losses: tuple[str, ...] = ("critic", "actor", "alpha", "plasticity"),
                  values: tuple[str, ...] = ("q_mean", "alpha", "entropy"), friction: bool = False) -> None:
        """Register a custom-scalars layout so the run opens as a dashboard (CUSTOM SCALARS tab).

        `losses` and `values` name the agent's `losses/*` and `value/*` tags; `friction` adds
        `env/friction` (Slippery Ant) beside the returns.  See `dashboard_layout`."""
        self.writer.add_custom_scalars(dashboard_layout(networks, losses, values, friction))

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, 0)

    def scalar(self, tag: str, value: float | torch.Tensor, step: int) -> None:
        self.writer.add_scalar(tag, float(value), step)

    def scalars(self, values: Mapping[str, float | torch.Tensor], step: int) -> None:
        """Write many scalars; device tensors are moved to the host in one transfer."""
        if not values:
            return
        tags = list(values)
        tensors = [torch.as_tensor(values[t], dtype=torch.float32).reshape(()) for t in tags]
        host = torch.stack([t.to(tensors[0].device) for t in tensors]).cpu().tolist()
        for tag, v in zip(tags, host):
            self.writer.add_scalar(tag, v, step)

    def episode(self, episode_return: float, length: int, step: int) -> None:
        self.last_return = episode_return
        self.writer.add_scalar("charts/episode_return", episode_return, step)
        self.writer.add_scalar("charts/episode_length", length, step)

    def progress(self, step: int, sps: float, ups: float, elapsed_s: float) -> None:
        """Console: env steps, steps/s, updates/s, last episode return, ETA."""
        remaining = (self.total_steps - step) / sps if sps > 0 else float("inf")
        ret = "n/a" if self.last_return is None else f"{self.last_return:.1f}"
        pct = 100.0 * step / max(self.total_steps, 1)
        print(f"{self.label}step {step:>9,}/{self.total_steps:,} ({pct:5.1f}%) | {sps:7.1f} steps/s | {ups:8.1f} updates/s | "
              f"return {ret} | elapsed {_fmt_duration(elapsed_s)} | ETA {_fmt_duration(remaining)}",
              file=self.stream, flush=True)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


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

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


# The custom-scalars dashboard: one unit per chart (steps/s and updates/s, or a parameter norm and a
# gradient norm, differ by orders of magnitude and would flatten each other on a shared axis).
# (chart title, tags under plasticity/<network>/): several tags only where they share a unit.
NETWORK_CHARTS = (
    ("spectral norm σ₁ (max and mean over layers)", ("spectral_norm_max", "spectral_norm_mean")),
    ("parameter norm ‖θ‖", ("param_norm",)),
    ("gradient norm ‖∇θ‖", ("grad_norm",)),
    ("distance from initialisation ‖θ − θ₀‖", ("distance_from_init",)),
    ("feature effective rank", ("feature_effective_rank",)),
    ("dormant and dead fractions of hidden units", ("dormant_fraction", "dead_fraction")),
    ("dead units (count)", ("dead_units",)),
    ("units replaced by CBP (count)", ("cbp_replaced",)),
)
VALUE_TITLES = {"q_mean": "mean Q on the batch", "alpha": "temperature α", "entropy": "policy entropy −log π",
                "log_std": "policy log σ (mean)"}


def _chart(*tags: str) -> list:
    """A multiline chart of exactly these tags (custom scalars reads each entry as a regex)."""
    return ["Multiline", [f"^{re.escape(tag)}$" for tag in tags]]


def dashboard_layout(networks: list[str], losses: tuple[str, ...] = ("critic", "actor", "alpha", "plasticity"),
                     values: tuple[str, ...] = ("q_mean", "alpha", "entropy"),
                     friction: bool = False) -> dict[str, dict[str, list]]:
    """The custom-scalars layout {category: {chart title: ["Multiline", [tag regexes]]}}: returns,
    speed, losses, values and per network its plasticity diagnostics, one unit per chart."""
    returns = {"episode and evaluation return": _chart("charts/episode_return", "eval/return_mean"),
               "env steps per second": _chart("charts/sps"),
               "gradient updates per second": _chart("charts/updates_per_s")}
    if friction:
        returns["ground friction"] = _chart("env/friction")
    layout = {
        "Return": returns,
        "Losses": {name: _chart(f"losses/{name}") for name in losses},
        "Value": {"Q overestimation (return units)": _chart("value/overestimation"),
                  **{VALUE_TITLES.get(v, v): _chart(f"value/{v}") for v in values}},
    }
    for net in networks:
        layout[f"Plasticity: {net}"] = {title: _chart(*(f"plasticity/{net}/{m}" for m in metrics))
                                        for title, metrics in NETWORK_CHARTS}
    return layout
