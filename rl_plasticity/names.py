"""Names the package's parts share, written once: the metric tags that more than one module writes
or reads, the config keys that do not change what is learned, and the answer to a misspelt name
(its close matches).

This module imports nothing of the package, so any module may import it.
"""
from __future__ import annotations

import difflib
from typing import Sequence

# -- metric tags: written by loops.py and logging.py, charted by logging.dashboard_layout, read by
# report.py and evaluate.py.  Env-specific tags (`env/friction`, `env/task`) belong to their env's
# wrapper (envs/nonstationary.py).
EPISODE_RETURN = "charts/episode_return"
EPISODE_LENGTH = "charts/episode_length"
ENV_STEPS_PER_S = "charts/sps"
UPDATES_PER_S = "charts/updates_per_s"
EVAL_RETURN = "eval/return_mean"              # mean over the evaluation episodes
EVAL_RETURN_STD = "eval/return_std"           # population standard deviation over them
OVERESTIMATION = "value/overestimation"       # critic's value of each episode's first state minus its discounted return
TASK_CHANGE = "curvature_task/change"         # 1 at every task start whose curvature is measured
UPDATES_SINCE_CHANGE = "curvature_task/updates_since_change"
CHECKPOINT_RETURN = "eval/checkpoint_return"  # evaluate's curve over a run's checkpoints


def eval_task_tag(task: str, statistic: str = "return_mean") -> str:
    """The tag of an evaluation statistic on one task of a non-stationary env (`eval.all_tasks`),
    named as the evaluation's own (`eval/return_mean`, `eval/return_std`): `eval/<task>/return_mean`."""
    return f"eval/{task}/{statistic}"


# -- config keys --------------------------------------------------------------------------------
# Top-level keys that do not change what is learned: a run may resume with other values
# (run/resume.py), and evaluation results do not depend on them beyond float rounding.
NOT_LEARNING_KEYS = ("total_steps", "device", "threads", "run_dir", "resume", "compile", "cudagraphs", "num_seeds",
                     "batch_seeds", "eval", "log", "checkpoint")


# -- a misspelt name ----------------------------------------------------------------------------
def did_you_mean(name: str, choices: Sequence[str], n: int = 5, cutoff: float = 0.5) -> str:
    """` Did you mean: a, b?` listing up to `n` of `choices` close to `name` (difflib's ratio ≥
    `cutoff`), or "" when none is: the middle of every "unknown X" message."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=cutoff)
    return f" Did you mean: {', '.join(close)}?" if close else ""
