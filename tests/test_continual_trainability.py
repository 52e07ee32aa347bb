"""benchmarks/continual_trainability.py on a tiny problem: every regularizer acts on training (the
directly-added gradients of spectral and wasserstein included), and the task-start curvature it writes
is the package's curvature of the network as it was when the task began."""
import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "continual_trainability.py"
TINY = ["--tasks", "3", "--epochs", "2", "--width", "16", "--depth", "2", "--n-samples", "64", "--input-dim", "4",
        "--batch-size", "32", "--er-batch", "16", "--curvature-rows", "32", "--curvature-samples", "8",
        "--lanczos-steps", "6"]


def _load_script():
    spec = importlib.util.spec_from_file_location("continual_trainability", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["spectral", "wasserstein", "l2"])
def test_every_regularizer_changes_training(method):
    """With a strong coefficient each regularizer leaves other weights than plain training (spectral
    and wasserstein add their gradient in plasticity_before_step; the script once skipped that call,
    and they then trained exactly like `none`)."""
    ct = _load_script()
    args = ct.parse_args(TINY + ["--coef", "1.0"])
    problem = ct.make_problem(args.n_samples, args.input_dim, args.classes, args.tasks, args.seed)
    torch.manual_seed(0)
    net = ct.make_mlp(args.input_dim, args.width, args.depth, args.classes, False)
    plain, regularized = ct.train_method("none", net, problem, args), ct.train_method(method, net, problem, args)
    assert regularized.max_sigma != plain.max_sigma


def test_curvature_at_task_start_is_the_package_measurement_of_the_initial_network(tmp_path):
    ct = _load_script()
    out = tmp_path / "ct.png"
    ct.main(TINY + ["--methods", "none,spectral", "--curvature", "--out", str(out)])
    for suffix in ("_curvature.png", "_density.png"):
        assert (tmp_path / f"ct{suffix}").read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "ct_curvature.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], int(r["task"])) for r in rows] == [(m, t) for m in ("none", "spectral") for t in (1, 2, 3)]
    # Task 1 starts from the initial network, the same for every method: recompute it here.
    args = ct.parse_args(TINY)
    problem = ct.make_problem(args.n_samples, args.input_dim, args.classes, args.tasks, args.seed)
    torch.manual_seed(args.seed)
    net = ct.make_mlp(args.input_dim, args.width, args.depth, args.classes, False)
    rows_in = args.curvature_rows
    want, _ = ct.measure_curvature(net, problem.inputs[:rows_in], problem.labels[0][:rows_in], args, 0)
    for r in rows[0], rows[3]:
        for key in ("fisher_rank", "epsilon_rank", "sharpness", "overlap_top"):
            assert float(r[key]) == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    # The spectra file holds every task start's SLQ nodes, whose largest is the sharpness written.
    with open(tmp_path / "ct_spectra.csv") as f:
        spectra = list(csv.DictReader(f))
    for r in rows:
        nodes = [float(s["node"]) for s in spectra if s["method"] == r["method"] and s["task"] == r["task"]]
        assert max(nodes) == pytest.approx(float(r["sharpness"]), rel=1e-6)
