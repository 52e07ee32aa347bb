"""Loss of trainability on continual random-label memorisation, and the plasticity regularizers.

A small CPU version of the random-label experiment of the spectral regularization paper
(shared/papers/spectral-regularization.md §5, App. B): an MLP memorises fresh random labels on
a fixed set of inputs, task after task, with Adam (lr 1e-3) and no reset between tasks.  A
network that keeps its trainability reaches the same end-of-task training accuracy on every
task (the tasks are i.i.d.); loss of trainability shows as that accuracy falling over tasks.

Each method trains the same initial network (same seed, same weights) on the same inputs, the
same label sequence and the same minibatch order; only the regularizer differs.  Regularizers
come from the package (`rl_plasticity.plasticity`), through `PlasticityMixin`:
loss = cross-entropy + coef · penalty, and for `l2_er` the effective-rank step of Algorithm 1 of
shared/papers/spectral-collapse-l2-er.md runs after every update with its own Adam.

Measured at the end of each task: training accuracy and loss on all N inputs, and the package's
own diagnostics on those inputs (`PlasticityMixin.plasticity_diagnostics`: largest exact spectral
norm over the weight matrices, fraction of dead hidden units, effective rank of the last hidden
layer); plus the training wall time per method.  Printed: a table per method (first task, last
task, mean of the last 5 tasks, end-of-run σ₁ and dead fraction, wall time); written: a PNG figure
of end-of-task accuracy vs task (one line per method) at `--out` and a CSV beside it (same name,
.csv).  The last line reads `final_accuracy none=<acc> l2=<acc> ...`, each value the mean
end-of-task accuracy over the last 5 tasks.

Run (about 3 minutes on a 2-core CPU with the defaults; wasserstein and l2_er take most of it):

    python benchmarks/continual_trainability.py
    python benchmarks/continual_trainability.py --tasks 60 --epochs 40 --width 256 --depth 4
    python benchmarks/continual_trainability.py --methods none,spectral --layer-norm
    python benchmarks/continual_trainability.py --curvature --methods none,l2,spectral,l2_er \
        --out benchmarks/results/continual_curvature.png

Defaults: N = 1024 fixed standard Gaussian inputs of dimension 32, 10 classes, fresh uniform
random labels each task; `--tasks 30` tasks of `--epochs 20` epochs, minibatch 128 (8 updates
per epoch, 160 per task: about enough for a fresh network to memorise one task); MLP with
`--depth 3` hidden layers of `--width 256` ReLU units, PyTorch default init, no LayerNorm
(`--layer-norm` puts one after each hidden linear, before the ReLU); Adam lr 1e-3; `--coef 1e-4`
for every regularizer; methods none, l2, l2_init, spectral (k = 2), wasserstein, l2_er (L2 coef
as above; effective-rank step with its own Adam, lr `--er-lr 1e-4` — a tenth of the task step
size, the L2-ER pick for task lr 1e-3 in Table 4 of spectral-collapse-l2-er.md — on the first 128
inputs of each minibatch after every update); `--seed 0`; `--threads 1` torch thread.

With `--curvature`, the curvature diagnostics of the package (`rl_plasticity.plasticity.curvature`,
the ones the loops log as `curvature_task/...`) are measured at the start of every task, as the
papers measure them: after the labels have changed and before the first update on them, on the
new task's cross-entropy (unregularized) over the first `--curvature-rows` inputs with their new
labels: empirical-Fisher rank (srank₉₉ of the Gram matrix of `--curvature-samples` per-sample
gradients, divided by its maximum), gradient diversity, the normalised ε-Hessian rank (ε =
`--epsilon`) and sharpness by SLQ (`--lanczos-steps` steps, one probe vector, seeded by the task
index), and the gradient–Hessian overlap.  The same measurement on the end-of-task network with
the task's own labels is written too (`end_*` columns), so "at task start" and "after training"
can be told apart.  Written beside the figure: `<out>_curvature.csv` (one row per method and
task), `<out>_spectra.csv` (the SLQ nodes and weights of every task-start spectrum, from which the
density is drawn), `<out>_curvature.png` (accuracy and the diagnostics against task) and
`<out>_density.png` (the Hessian eigenvalue density at the first, middle and last task start per
method, as in App. F of spectral-collapse-l2-er.md).
"""
from __future__ import annotations

import argparse
import copy
import csv
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rl_plasticity.plasticity.curvature import CurvatureSettings, Spectrum, curvature_diagnostics
from rl_plasticity.plasticity.mixin import PlasticityConfig, PlasticityMixin
from rl_plasticity.plasticity.regularizers import REGULARIZERS

DEFAULT_METHODS = ("none", "l2", "l2_init", "spectral", "wasserstein", "l2_er")
# The curvature diagnostics written per task (keys of curvature_diagnostics), in figure order.
CURVATURE_METRICS = ("fisher_rank", "epsilon_rank", "sharpness", "overlap_top", "grad_erank", "grad_norm")
CURVATURE_TITLES = {"fisher_rank": "empirical-Fisher rank (srank₉₉ / max)",
                    "epsilon_rank": "ε-Hessian rank (fraction of P)", "sharpness": "sharpness λ_max",
                    "overlap_top": "gradient–Hessian overlap (top subspace)",
                    "grad_erank": "gradient diversity (effective rank)", "grad_norm": "gradient norm ‖g‖"}
ER_METHODS = ("er", "l2_er")  # methods that run the effective-rank step


class Holder(PlasticityMixin):
    """The minimal agent the mixin needs: one network called "net", whose input is the batch."""

    def __init__(self, net: nn.Module, cfg: PlasticityConfig):
        self.init_plasticity(cfg)
        self.register_networks({"net": net})

    def plasticity_inputs(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"net": batch}


@dataclass
class Problem:
    """Fixed inputs and one label vector per task, shared by every method."""

    inputs: torch.Tensor           # (N, input_dim)
    labels: list[torch.Tensor]     # tasks × (N,) int64


@dataclass
class History:
    """End-of-task measurements of one method."""

    method: str
    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    max_sigma: list[float] = field(default_factory=list)
    dead: list[float] = field(default_factory=list)
    eff_rank: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    curvature: list[dict[str, float]] = field(default_factory=list)      # at each task start
    end_curvature: list[dict[str, float]] = field(default_factory=list)  # at each task end
    spectra: list[Spectrum] = field(default_factory=list)                # task-start SLQ spectra
    curvature_s: float = 0.0  # wall time of the curvature measurements (not in wall_s)


def per_sample_cross_entropy(forward, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """The task loss per sample, as plasticity/curvature.py takes a loss."""
    return F.cross_entropy(forward(data["x"]), data["y"], reduction="none")


def measure_curvature(net: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace,
                      seed: int) -> tuple[dict[str, float], Spectrum]:
    """The package's curvature diagnostics of the unregularized task loss on (x, y)."""
    settings = CurvatureSettings(samples=args.curvature_samples, lanczos_steps=args.lanczos_steps,
                                 lanczos_vectors=1, epsilon=args.epsilon)
    g = torch.Generator().manual_seed(args.seed * 1000 + seed)
    return curvature_diagnostics(net, per_sample_cross_entropy, {"x": x, "y": y}, settings, g)


def make_mlp(input_dim: int, width: int, depth: int, classes: int, layer_norm: bool) -> nn.Sequential:
    """`depth` hidden layers Linear(-LayerNorm)-ReLU of `width` units, then a linear head."""
    layers: list[nn.Module] = []
    fan_in = input_dim
    for _ in range(depth):
        layers.append(nn.Linear(fan_in, width))
        if layer_norm:
            layers.append(nn.LayerNorm(width))
        layers.append(nn.ReLU())
        fan_in = width
    layers.append(nn.Linear(fan_in, classes))
    return nn.Sequential(*layers)


def make_problem(n: int, input_dim: int, classes: int, tasks: int, seed: int) -> Problem:
    """Standard Gaussian inputs and i.i.d. uniform random labels per task, from `seed` alone."""
    g = torch.Generator().manual_seed(10_000 + seed)
    inputs = torch.randn(n, input_dim, generator=g)
    labels = [torch.randint(classes, (n,), generator=g) for _ in range(tasks)]
    return Problem(inputs, labels)


@torch.no_grad()
def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `net` on all of (x, y)."""
    logits = net(x)
    return float((logits.argmax(-1) == y).float().mean()), float(F.cross_entropy(logits, y))


def train_method(method: str, init_net: nn.Module, problem: Problem, args: argparse.Namespace) -> History:
    """Train a copy of `init_net` on every task in turn with regularizer `method`."""
    net = copy.deepcopy(init_net)
    cfg = PlasticityConfig(name=method, coef=args.coef, er=method in ER_METHODS, er_lr=args.er_lr,
                           er_batch=args.er_batch, er_step=1)
    holder = Holder(net, cfg)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(args.seed)  # same minibatch order for every method
    x_all = problem.inputs
    n = x_all.shape[0]
    hist = History(method)
    start = time.perf_counter()
    rows = args.curvature_rows
    for task, y_all in enumerate(problem.labels):
        if args.curvature:  # the new task's labels, before the first update on them
            t0 = time.perf_counter()
            values, spectrum = measure_curvature(net, x_all[:rows], y_all[:rows], args, task)
            hist.curvature.append(values)
            hist.spectra.append(spectrum)
            hist.curvature_s += time.perf_counter() - t0
            start += time.perf_counter() - t0  # keep wall_s the training time
        for _ in range(args.epochs):
            perm = torch.randperm(n, generator=order)
            for i in range(0, n, args.batch_size):
                idx = perm[i:i + args.batch_size]
                x = x_all[idx]
                loss = F.cross_entropy(net(x), y_all[idx])
                reg = holder.plasticity_loss("net")
                if reg is not None:
                    loss = loss + reg
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # Regularizers whose gradient is added directly (spectral, wasserstein) do it here;
                # without this call they have no effect at all.
                holder.plasticity_before_step()
                optimizer.step()
                holder.plasticity_after_update(x)
        acc, task_loss = evaluate(net, x_all, y_all)
        if args.curvature:  # the trained network on the task it has just learnt
            t0 = time.perf_counter()
            hist.end_curvature.append(measure_curvature(net, x_all[:rows], y_all[:rows], args, task)[0])
            hist.curvature_s += time.perf_counter() - t0
            start += time.perf_counter() - t0
        hist.accuracy.append(acc)
        hist.loss.append(task_loss)
        diag = holder.plasticity_diagnostics(x_all)
        hist.max_sigma.append(float(diag["plasticity/net/spectral_norm_max"]))
        hist.dead.append(float(diag["plasticity/net/dead_fraction"]))
        hist.eff_rank.append(float(diag["plasticity/net/feature_effective_rank"]))
        if args.verbose:
            curv = (f"  start: Fisher rank {hist.curvature[-1]['fisher_rank']:.3f}  "
                    f"ε-rank {hist.curvature[-1]['epsilon_rank']:.4f}  λmax {hist.curvature[-1]['sharpness']:.3g}"
                    if args.curvature else "")
            print(f"  {method:<12} task {task + 1:3d}/{len(problem.labels)}  acc {acc:.3f}  loss {task_loss:.3f}  "
                  f"max σ₁ {hist.max_sigma[-1]:.2f}  dead {hist.dead[-1]:.3f}  eff. rank {hist.eff_rank[-1]:.1f}{curv}",
                  flush=True)
    hist.wall_s = time.perf_counter() - start
    return hist


def write_csv(path: Path, histories: list[History]) -> None:
    """One row per (method, task): end-of-task accuracy, loss and the network diagnostics."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "task", "accuracy", "loss", "max_spectral_norm", "dead_fraction",
                         "last_layer_effective_rank", "wall_s_method"])
        for h in histories:
            rows = zip(h.accuracy, h.loss, h.max_sigma, h.dead, h.eff_rank)
            for t, (acc, loss, sigma, dead, rank) in enumerate(rows, start=1):
                writer.writerow([h.method, t, f"{acc:.4f}", f"{loss:.4f}", f"{sigma:.4f}", f"{dead:.4f}",
                                 f"{rank:.2f}", f"{h.wall_s:.1f}"])


def write_curvature_csv(path: Path, histories: list[History]) -> None:
    """One row per (method, task): accuracy, then each curvature metric at the task's start and end."""
    keys = sorted(histories[0].curvature[0])
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "task", "accuracy", "dead_fraction"] + keys + [f"end_{k}" for k in keys])
        for h in histories:
            for t, (acc, dead, start, end) in enumerate(zip(h.accuracy, h.dead, h.curvature, h.end_curvature), 1):
                writer.writerow([h.method, t, f"{acc:.4f}", f"{dead:.4f}"] + [f"{start[k]:.6g}" for k in keys]
                                + [f"{end[k]:.6g}" for k in keys])


def write_spectra_csv(path: Path, histories: list[History]) -> None:
    """The task-start SLQ spectra: one row per Ritz node (method, task, probe vector, node, weight,
    P); the density is ψ_σ(u) = mean over probe vectors of Σ weight · N(u; node, σ²)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "task", "vector", "node", "weight", "dim"])
        for h in histories:
            for t, spectrum in enumerate(h.spectra, start=1):
                for v, (nodes, weights) in enumerate(zip(spectrum.nodes, spectrum.weights)):
                    for node, weight in zip(nodes.tolist(), weights.tolist()):
                        writer.writerow([h.method, t, v, f"{node:.9g}", f"{weight:.9g}", spectrum.dim])


def density_tasks(tasks: int) -> list[int]:
    """The task starts whose density is drawn: first, middle and last (1-based, distinct)."""
    return sorted({1, (tasks + 1) // 2, tasks})


def write_curvature_figure(path: Path, histories: list[History], title: str) -> None:
    """End-of-task accuracy and each task-start curvature metric against task, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [("end-of-task training accuracy", None)] + [(CURVATURE_TITLES[k], k) for k in CURVATURE_METRICS]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    axes = axes.flatten()
    for ax, (label, key) in zip(axes, panels):
        for h in histories:
            ys = h.accuracy if key is None else [c[key] for c in h.curvature]
            ax.plot(range(1, len(ys) + 1), ys, marker="o", markersize=2.5, label=h.method)
        ax.set_xlabel("task")
        ax.set_title(label if key is None else f"at task start: {label}", fontsize=9)
        ax.set_ylabel(label if key is None else key, fontsize=8)
        if key == "sharpness":
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    # The last panel: the Fisher rank after training on the task (what the network ends each task with).
    ax = axes[len(panels)]
    for h in histories:
        ys = [c["fisher_rank"] for c in h.end_curvature]
        ax.plot(range(1, len(ys) + 1), ys, marker="o", markersize=2.5, label=h.method)
    ax.set_xlabel("task")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("fisher_rank", fontsize=8)
    ax.set_title(f"at task end: {CURVATURE_TITLES['fisher_rank']}", fontsize=9)
    ax.grid(alpha=0.3)
    for extra in axes[len(panels) + 1:]:
        extra.axis("off")
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 150), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_density_figure(path: Path, histories: list[History], title: str) -> None:
    """Hessian eigenvalue density ψ_σ (log scale) at the first, middle and last task start, one
    panel per method (spectral-collapse-l2-er.md App. F); σ = 1 % of the panel's eigenvalue range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = density_tasks(len(histories[0].spectra))
    fig, axes = plt.subplots(1, len(histories), figsize=(4.2 * len(histories), 3.8), squeeze=False)
    for ax, h in zip(axes[0], histories):
        nodes = torch.cat([torch.cat(h.spectra[t - 1].nodes) for t in tasks])
        lo, hi = float(nodes.min()), float(nodes.max())
        pad = 0.05 * max(hi - lo, 1e-6)
        grid = torch.linspace(lo - pad, hi + pad, 800, dtype=torch.float64)
        sigma = 0.01 * max(hi - lo, 1e-6)
        for t in tasks:
            density = h.spectra[t - 1].density(grid, sigma).clamp_min(1e-12)
            ax.plot(grid.numpy(), density.numpy(), label=f"task {t} start")
        ax.set_yscale("log")
        ax.set_ylim(bottom=1e-6)
        ax.set_xlabel("Hessian eigenvalue λ")
        ax.set_ylabel("density ψ_σ(λ)")
        ax.set_title(f"{h.method}  (σ = {sigma:.2g})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, max(60, 40 * len(histories))), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_figure(path: Path, histories: list[History], title: str) -> None:
    """End-of-task training accuracy vs task, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for h in histories:
        ax.plot(range(1, len(h.accuracy) + 1), h.accuracy, marker="o", markersize=3, label=h.method)
    ax.set_xlabel("task")
    ax.set_ylabel("end-of-task training accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(textwrap.fill(title, 90), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", type=int, default=30, help="number of random-label tasks")
    p.add_argument("--epochs", type=int, default=20, help="epochs per task")
    p.add_argument("--width", type=int, default=256, help="hidden units per layer")
    p.add_argument("--depth", type=int, default=3, help="hidden layers")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from: {', '.join(sorted(REGULARIZERS))}")
    p.add_argument("--coef", type=float, default=1e-4, help="regularization strength, every method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/continual_trainability.png",
                   help="figure path; the CSV goes beside it with a .csv suffix")
    p.add_argument("--layer-norm", action="store_true", help="LayerNorm after each hidden linear layer")
    p.add_argument("--n-samples", type=int, default=1024, help="fixed inputs N")
    p.add_argument("--input-dim", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam step size of the task loss")
    p.add_argument("--er-lr", type=float, default=1e-4, help="Adam step size of the effective-rank step (l2_er, er)")
    p.add_argument("--er-batch", type=int, default=128, help="inputs per effective-rank step (first of the minibatch)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: small matrices gain little from more, and it stays fast on a busy machine)")
    p.add_argument("--verbose", action="store_true", help="print every task")
    p.add_argument("--curvature", action="store_true",
                   help="measure the curvature diagnostics at every task start and end (see the module docstring)")
    p.add_argument("--curvature-rows", type=int, default=256, help="inputs of the curvature loss (the first ones)")
    p.add_argument("--curvature-samples", type=int, default=64, help="per-sample gradients (empirical Fisher)")
    p.add_argument("--lanczos-steps", type=int, default=32, help="Lanczos steps (SLQ and overlap)")
    p.add_argument("--epsilon", type=float, default=0.1, help="ε of the ε-Hessian rank")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in REGULARIZERS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; valid: {', '.join(sorted(REGULARIZERS))}")
    for name in ("tasks", "epochs", "width", "depth", "n_samples", "input_dim", "batch_size", "er_batch", "threads",
                 "curvature_rows", "lanczos_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.classes < 2:
        p.error("--classes must be >= 2")
    if args.curvature_samples < 2 or args.curvature_samples > min(args.curvature_rows, args.n_samples):
        p.error("--curvature-samples must be >= 2 and at most --curvature-rows and --n-samples")
    if args.epsilon <= 0:
        p.error("--epsilon must be > 0")
    return args


def curvature_setting(args: argparse.Namespace) -> str:
    return (f" | curvature at task start on {args.curvature_rows} inputs: m={args.curvature_samples} per-sample "
            f"gradients, SLQ {args.lanczos_steps} Lanczos steps x 1 vector, ε={args.epsilon:g}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    problem = make_problem(args.n_samples, args.input_dim, args.classes, args.tasks, args.seed)
    torch.manual_seed(args.seed)
    init_net = make_mlp(args.input_dim, args.width, args.depth, args.classes, args.layer_norm)
    setting = (f"N={args.n_samples} d={args.input_dim} classes={args.classes} tasks={args.tasks} "
               f"epochs={args.epochs} batch={args.batch_size} MLP {args.depth}x{args.width}"
               f"{' +LN' if args.layer_norm else ''} Adam lr={args.lr:g} coef={args.coef:g} "
               f"er_lr={args.er_lr:g} seed={args.seed}")
    print(f"# continual random-label memorisation: {setting}  (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)", flush=True)

    histories: list[History] = []
    for method in args.methods:
        hist = train_method(method, init_net, problem, args)
        histories.append(hist)
        print(f"  done {method:<12} last-task acc {hist.accuracy[-1]:.3f}  ({hist.wall_s:.1f} s)", flush=True)

    last = min(5, args.tasks)
    print()
    print(f"{'method':<12} {'task 1':>8} {'task ' + str(args.tasks):>9} {'last ' + str(last) + ' mean':>12} "
          f"{'max σ₁ end':>11} {'dead end':>9} {'wall s':>8}")
    for h in histories:
        print(f"{h.method:<12} {h.accuracy[0]:8.3f} {h.accuracy[-1]:9.3f} {sum(h.accuracy[-last:]) / last:12.3f} "
              f"{h.max_sigma[-1]:11.2f} {h.dead[-1]:9.3f} {h.wall_s:8.1f}")
    total = sum(h.wall_s for h in histories)
    print(f"total training wall time {total:.1f} s")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path = out.with_suffix(".csv")
    write_csv(csv_path, histories)
    write_figure(out, histories, setting)
    print(f"wrote {out} and {csv_path}")
    if args.curvature:
        stem = out.with_suffix("")
        paths = [Path(f"{stem}_curvature.csv"), Path(f"{stem}_spectra.csv"), Path(f"{stem}_curvature.png"),
                 Path(f"{stem}_density.png")]
        write_curvature_csv(paths[0], histories)
        write_spectra_csv(paths[1], histories)
        write_curvature_figure(paths[2], histories, setting + curvature_setting(args))
        write_density_figure(paths[3], histories, setting + curvature_setting(args))
        print()
        print(f"{'method':<12} {'Fisher rank t1':>15} {'t' + str(args.tasks):>8} {'ε-rank t1':>10} "
              f"{'t' + str(args.tasks):>8} {'λmax t1':>9} {'t' + str(args.tasks):>9} {'curv. s':>8}")
        for h in histories:
            a, b = h.curvature[0], h.curvature[-1]
            print(f"{h.method:<12} {a['fisher_rank']:15.3f} {b['fisher_rank']:8.3f} {a['epsilon_rank']:10.4f} "
                  f"{b['epsilon_rank']:8.4f} {a['sharpness']:9.3g} {b['sharpness']:9.3g} {h.curvature_s:8.1f}")
        print("wrote " + ", ".join(str(p) for p in paths))
    print("final_accuracy " + " ".join(f"{h.method}={sum(h.accuracy[-last:]) / last:.4f}" for h in histories))


if __name__ == "__main__":
    main()
