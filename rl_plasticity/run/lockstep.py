"""The lockstep driver of a multi-seed run: every seed's loop advances to its next update request,
then the requests are served together (batched along a seed dimension, or in turn)."""
from __future__ import annotations

import sys
from typing import Any, Optional

from rl_plasticity.run.seed import SeedRun, record_divergence


class RoundStop:
    """The stop flag as the seeds of a lockstep run see it: live until the first batched update
    (prefill runs many steps per seed at a time), then read once per round, so that all seeds stop
    after the same update and the resumed run batches them exactly as the uninterrupted one."""

    def __init__(self, stop: Any):
        self.stop = stop
        self.snapshot: Optional[bool] = None

    def new_round(self) -> None:
        self.snapshot = bool(self.stop())

    def __call__(self) -> bool:
        return bool(self.stop()) if self.snapshot is None else self.snapshot


def seed_group(agents: list[Any], rngs: list[Any], batch_seeds: Optional[bool]) -> Any:
    """How the seeds' updates are served: batched along a seed dimension (`SACSeedGroup` for the
    fused SAC update, `PPOSeedGroup`), or each agent's own update in turn.

    `batch_seeds=None` chooses what measured faster (benchmarks/seed_scaling.py): PPO batched
    everywhere (its 16-row minibatch steps are bound by per-op overhead, which batching shares:
    about 2x with 4-8 seeds on 2 CPU cores); SAC batched on CUDA only (on a CPU its 256-row
    update is bound by the matmuls, which cost the same batched or one by one).
    """
    from rl_plasticity.agents.ppo import PPOAgent
    from rl_plasticity.agents.sac import SACAgent
    from rl_plasticity.agents.seeds import PPOSeedGroup, SACSeedGroup, SequentialGroup

    first = agents[0]
    if isinstance(first, PPOAgent):
        return PPOSeedGroup(agents, rngs) if batch_seeds is not False else SequentialGroup(agents, rngs)
    batched = batch_seeds if batch_seeds is not None else first.device.type == "cuda"
    if batched and isinstance(first, SACAgent) and first.cfg.fused:
        return SACSeedGroup(agents, rngs)
    return SequentialGroup(agents, rngs)


def lockstep(runs: list[SeedRun], steps: list[Any], stop: RoundStop,
             batch_seeds: Optional[bool]) -> tuple[dict[int, Any], dict[int, Any]]:
    """Run the seeds' loops side by side: each advances (under its own global generators) to its
    next update request, then the requests are served together (`seed_group`): by one batched
    update of all seeds (agents/seeds.py), or by each agent's own update in turn.
    A seed that diverges stops with its diverged.json; the others go on."""
    from rl_plasticity.loops import DivergenceError

    results: dict[int, Any] = {}
    diverged: dict[int, Any] = {}
    pending: dict[int, Any] = {}

    def advance(i: int, value: Any, first: bool = False) -> None:
        with runs[i].rng:
            try:
                pending[i] = next(steps[i]) if first else steps[i].send(value)
            except StopIteration as stop:
                results[runs[i].seed] = stop.value
            except DivergenceError as e:
                diverged[runs[i].seed] = record_divergence(runs[i], e)
                print(f"seed {runs[i].seed}: {diverged[runs[i].seed]}", file=sys.stderr, flush=True)

    group: Any = None
    members: tuple[int, ...] = ()
    for i in range(len(runs)):
        advance(i, None, first=True)
    while pending:
        stop.new_round()
        order = tuple(sorted(pending))
        if order != members:  # the first round, or a seed finished or diverged before the others
            agents, rngs = [runs[i].job.agent for i in order], [runs[i].rng for i in order]
            group = seed_group(agents, rngs, batch_seeds)
            members = order
        metrics = group.update([pending.pop(i) for i in order])
        for i, m in zip(order, metrics):
            advance(i, m)
    return results, diverged
