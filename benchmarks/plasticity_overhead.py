"""Cost of plasticity regularizers, interventions and diagnostics on the SAC update, measured in one run.

For each method, times SAC updates (paper settings: 2x256, LayerNorm, one critic, batch 256, 16
updates per call) against `plasticity=none` in alternating rounds, and prints the added time per
update as a percentage (median of per-round ratios).  Methods are the regularizers at their
defaults (coefficient 1e-4, `er` and `l2_er` with the presets' ER learning rates, er_batch 128,
er_step 1), continual backprop (`cbp`: replacement rate 1e-4, maturity 10,000, utilities every
update) and `reset` (a full reset every 2,560,000 updates, the `sac_reset` preset: its cost is
the time of one `reset_networks()` spread over that many updates), and the interventions of
plasticity/interventions.py at their default periods: `redo` (every 1000 updates, τ 0.025),
`partial_reset` (every 200,000), `shrink_perturb` (every 2,560,000, the sac_shrink_perturb
preset; its default acts only at task changes): each costs the time of one call spread over its
period plus, measured in alternating rounds, what it adds to every update in between (the
per-element Adam step correction of the entries re-initialised by the calls at the default τ;
and, separately, the correction's cost per Adam step with many entries tracked (one call at τ = 0.5,
and at τ = 100: every unit) against the same Adam steps without it); and `injection` (once; afterwards every update runs
a trunk and three heads: on the fused path, its ratio against the fused `none`, and for comparison
on the autograd path, agent.fused=false, against `none` on that path, and the fused injected update
against the autograd one).  Also times one diagnostics
call on a 256-sample probe batch and reports its share at the default frequency
(`plasticity.log_every` = 16,000 updates), and one curvature measurement (plasticity/curvature.py
at the default curvature_* keys, on both networks) with the smallest `plasticity.curvature_every`
that keeps it at or under 2 % of training time.  Last line: `max_overhead <percent> <method>`.

    python benchmarks/plasticity_overhead.py [--methods spectral,l2,...] [--rounds 7] [--threads 1]

On a machine shared with other processes use `--threads 1` (torch's intra-op threads slow down
many-fold when another process holds the cores they wait on).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch

from rl_plasticity.agents.sac import SACAgent, SACConfig
from rl_plasticity.buffers import Batch
from rl_plasticity.optim import adam_step
from rl_plasticity.plasticity.mixin import PlasticityConfig

OBS, ACT = 17, 6  # cheetah-run
ER = {"er": 1e-7, "l2_er": 1e-6}
RESET_INTERVAL = 2_560_000  # configs/experiment/sac_reset.yaml
PERIODIC = {"redo": 1000, "partial_reset": 200_000, "shrink_perturb": 2_560_000}  # default periods (updates)


def make(name: str, fused: bool = True) -> SACAgent:
    if name == "cbp":
        cfg = PlasticityConfig(name="cbp", cbp=True)
    elif name in PERIODIC:  # called by hand in the benchmark, never by the agent while timed
        cfg = PlasticityConfig(interventions=[name], **{name: {"every": 10**12}})
    elif name == "injection":
        cfg = PlasticityConfig(interventions=["injection"], injection={"at": 10**12})
    else:
        coef = 0.0 if name in ("none", "er", "reset") else 1e-4
        reg = "none" if name == "reset" else name
        cfg = PlasticityConfig(name=reg, coef=coef, er=name in ER, er_lr=ER.get(name, 0.01))
    torch.manual_seed(0)
    return SACAgent(OBS, ACT, SACConfig(fused=fused), "cpu", plasticity=cfg)


def call_seconds(agent: SACAgent, name: str, batch: Batch, repeats: int = 5) -> float:
    """Seconds of one call of intervention `name` on the update's batch."""
    iv = agent.intervention(name)
    inputs = agent.plasticity_inputs((batch.obs[0], batch.action[0]))
    start = time.perf_counter()
    for _ in range(repeats):
        iv.after_update(agent.plasticity_updates, inputs)
    return (time.perf_counter() - start) / repeats


def alternate(base: SACAgent, agent: SACAgent, batch: Batch, rounds: int, calls: int) -> tuple[list, list, list]:
    ratios, t_base, t_other = [], [], []
    for _ in range(rounds):
        a, b = timed(base, batch, calls), timed(agent, batch, calls)
        t_base.append(a)
        t_other.append(b)
        ratios.append(b / a)
    return ratios, t_base, t_other


def batches(n: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    return Batch(torch.randn(n, 256, OBS, generator=g), torch.rand(n, 256, ACT, generator=g) * 2 - 1,
                 torch.randn(n, 256, generator=g), torch.randn(n, 256, OBS, generator=g), torch.zeros(n, 256))


def timed(agent: SACAgent, batch: Batch, calls: int) -> float:
    """Seconds per update."""
    start = time.perf_counter()
    for _ in range(calls):
        metrics = agent.update(batch)
    float(metrics["losses/critic"])
    return (time.perf_counter() - start) / (calls * batch.obs.shape[0])


def correction_seconds(agent: SACAgent, repeats: int = 20, rounds: int = 5) -> float:
    """Seconds the per-element Adam step correction adds to one optimizer step: Adam steps on fixed
    random gradients with `before_step()` / `after_step()` around them against the same steps
    without (alternating, median of the differences)."""
    steps, g = agent.plasticity_element_steps, torch.Generator().manual_seed(1)
    params = [p for group in agent.optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-2

    def run(corrected: bool) -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            if corrected:
                steps.before_step()
            adam_step(agent.optimizer)
            if corrected:
                steps.after_step()
        return (time.perf_counter() - start) / repeats

    run(True)
    return statistics.median(run(True) - run(False) for _ in range(rounds))


def reset_seconds(agent: SACAgent, repeats: int = 5) -> float:
    """Seconds of one full reset (`reset_networks`, what `agent.reset_interval` triggers)."""
    start = time.perf_counter()
    for _ in range(repeats):
        agent.reset_networks()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods",
                   default="spectral,l2,l2_init,wasserstein,er,l2_er,cbp,reset,redo,partial_reset,shrink_perturb,injection")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=5, help="calls of 16 updates per round and side")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = batches(16)
    base = make("none")
    timed(base, batch, 2)
    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}, device cpu, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
          f"SAC 2x256 LayerNorm, 1 critic, batch 256")
    results = {}
    for name in args.methods.split(","):
        agent = make(name)
        timed(agent, batch, 2)
        if name == "reset":
            per_update = statistics.median(timed(base, batch, args.calls) for _ in range(3))
            seconds = statistics.median(reset_seconds(agent) for _ in range(args.rounds))
            results[name] = 100 * seconds / (RESET_INTERVAL * per_update)
            print(f"{name:12s} one reset {1e3 * seconds:.1f} ms every {RESET_INTERVAL} updates of "
                  f"{1e3 * per_update:.2f} ms, overhead {results[name]:+.5f}%", flush=True)
            continue
        if name in PERIODIC:
            every = PERIODIC[name]
            seconds = statistics.median(call_seconds(agent, name, batch) for _ in range(3))
            steps = agent.plasticity_element_steps
            tracked = sum(int(i.numel()) for i, _ in steps.tracked.values())
            ratios, t_base, t_iv = alternate(base, agent, batch, args.rounds, args.calls)
            between = 100 * (statistics.median(ratios) - 1)
            spread = 100 * seconds / (every * statistics.median(t_base))
            results[name] = between + spread
            print(f"{name:14s} one call {1e3 * seconds:.1f} ms every {every} updates = {spread:+.4f}%; between calls "
                  f"{between:+.1f}% ({tracked} entries on per-element Adam steps; rounds "
                  f"{min(ratios):.2f}-{max(ratios):.2f}x); overhead {results[name]:+.1f}%", flush=True)
            if name == "redo":  # the correction's cost per tracked entry, after one call at larger τ
                for tau in (0.5, 100.0):  # 100: every unit recycled (as CBP's steady state tracks nearly all)
                    many = make("redo")
                    timed(many, batch, 2)
                    many.intervention("redo").cfg.tau = tau
                    call_seconds(many, name, batch, repeats=1)
                    tracked = sum(int(i.numel()) for i, _ in many.plasticity_element_steps.tracked.values())
                    per = correction_seconds(many)
                    print(f"{'':14s} per-element Adam correction after one call at τ {tau}: {1e3 * per:.2f} ms per "
                          f"Adam step for {tracked} tracked entries ({1e9 * per / tracked:.0f} ns each) = "
                          f"{100 * per / statistics.median(t_base):.1f}% of an update", flush=True)
            continue
        if name == "injection":
            seconds = call_seconds(agent, name, batch, repeats=1)
            timed(agent, batch, 2)
            ratios, t_base, t_iv = alternate(base, agent, batch, args.rounds, args.calls)
            results[name] = 100 * (statistics.median(ratios) - 1)
            print(f"{name:14s} one injection {1e3 * seconds:.1f} ms (once, fused plans rebuilt); after it, fused "
                  f"none {1e3 * statistics.median(t_base):.2f} ms/update, fused injected "
                  f"{1e3 * statistics.median(t_iv):.2f} ms/update, overhead {results[name]:+.1f}% "
                  f"(rounds {min(ratios):.2f}-{max(ratios):.2f}x)", flush=True)
            autograd, base_autograd = make(name, fused=False), make("none", fused=False)
            call_seconds(autograd, name, batch, repeats=1)
            timed(autograd, batch, 2)
            timed(base_autograd, batch, 2)
            a_ratios, t_a_base, t_a_iv = alternate(base_autograd, autograd, batch, args.rounds, args.calls)
            f_ratios, _, _ = alternate(agent, autograd, batch, args.rounds, args.calls)
            a_overhead = 100 * (statistics.median(a_ratios) - 1)
            print(f"{'':14s} autograd path: none {1e3 * statistics.median(t_a_base):.2f} ms/update, injected "
                  f"{1e3 * statistics.median(t_a_iv):.2f} ms/update, overhead {a_overhead:+.1f}% "
                  f"(rounds {min(a_ratios):.2f}-{max(a_ratios):.2f}x); injected, autograd against fused (alternating): "
                  f"{statistics.median(f_ratios):.2f}x (rounds {min(f_ratios):.2f}-{max(f_ratios):.2f}x)", flush=True)
            continue
        ratios, t_base, t_reg = alternate(base, agent, batch, args.rounds, args.calls)
        results[name] = 100 * (statistics.median(ratios) - 1)
        print(f"{name:12s} none {1e3 * statistics.median(t_base):.2f} ms/update, {name} "
              f"{1e3 * statistics.median(t_reg):.2f} ms/update, overhead {results[name]:+.1f}% "
              f"(rounds {min(ratios):.2f}-{max(ratios):.2f}x)", flush=True)
    probe = Batch(*(t[0] for t in batch))
    base.diagnostics(probe)
    start = time.perf_counter()
    for _ in range(5):
        {k: float(v) for k, v in base.diagnostics(probe).items()}
    diag = (time.perf_counter() - start) / 5
    per_update = timed(base, batch, args.calls)
    share = 100 * diag / (16_000 * per_update)
    print(f"diagnostics: {1e3 * diag:.1f} ms per call; at plasticity.log_every=16000 updates that is "
          f"{share:.3f}% of training time")
    base.plasticity_curvature(probe, 0)
    start = time.perf_counter()
    for i in range(3):
        base.plasticity_curvature(probe, i)
    curv = (time.perf_counter() - start) / 3
    every = curv / (0.02 * per_update)
    cfg = base.plasticity_cfg
    print(f"curvature: {1e3 * curv:.0f} ms per measurement (samples {cfg.curvature_samples}, Lanczos "
          f"{cfg.curvature_lanczos_steps} steps x {cfg.curvature_lanczos_vectors} vector(s) + the overlap run) = "
          f"{curv / per_update:.0f} updates; <= 2% of training time needs plasticity.curvature_every >= {every:,.0f}")
    worst = max(results, key=results.get)
    print(f"max_overhead {results[worst]:.1f} {worst}")


if __name__ == "__main__":
    main()
