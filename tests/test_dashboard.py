"""The TensorBoard custom-scalars dashboard: every chart plots one unit, and every tag it names is
one the agents write (SAC and PPO, Slippery Ant's friction, continual DMC's task)."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rl_plasticity.logging import Logger
from rl_plasticity.loops import log_curvature, probe_diagnostics
from rl_plasticity.plasticity.mixin import PlasticityConfig, PlasticityMixin
from tests.test_cli import read_events

NETWORK_UNITS = {"spectral_norm_max": "σ₁", "spectral_norm_mean": "σ₁", "param_norm": "‖θ‖", "grad_norm": "‖∇θ‖",
                 "distance_from_init": "‖θ − θ₀‖", "feature_effective_rank": "rank", "dormant_fraction": "fraction",
                 "dead_fraction": "fraction", "dead_units": "units", "cbp_replaced": "replaced units",
                 "update_norm": "‖Δθ‖", "redo_recycled": "recycled units", "shrink_perturb_count": "applications",
                 "partial_resets": "applications", "injected": "flag"}
# Units of the per-layer diagnostics (plasticity/<net>/layer<i>/<metric>): each metric its own.
LAYER_UNITS = {"stable_rank": "stable rank", "sigma_max": "singular value σ_max", "sigma_min": "singular value σ_min",
               "feature_srank": "feature srank", "feature_effective_rank": "feature entropy rank",
               "active_fraction": "active fraction", "feature_norm": "‖h‖"}
CURVATURE_UNITS = {"fisher_rank": "Fisher rank / max", "fisher_rank_count": "Fisher rank (count)",
                   "epsilon_rank": "ε-rank / P", "sharpness": "eigenvalue", "lambda_min": "eigenvalue",
                   "overlap": "cosine", "overlap_top": "cosine", "grad_erank": "gradient effective rank",
                   "grad_condition": "condition number", "grad_norm": "‖∇θ‖ unregularized"}


class Holder(PlasticityMixin):
    """A network registered with the mixin, to collect the tags the diagnostics really write."""

    def __init__(self, net: nn.Module):
        self.init_plasticity(PlasticityConfig(curvature_every=1, curvature_samples=4, curvature_lanczos_steps=4))
        self.register_networks({"net": net})
        self.optimizer = torch.optim.Adam(net.parameters())

    def plasticity_inputs(self, batch):
        return {"net": batch["x"]}

    def plasticity_optimizers(self):
        return [self.optimizer]

    def curvature_losses(self, probe, seed):
        loss = lambda forward, data: F.mse_loss(forward(data["x"]), data["y"], reduction="none").sum(-1)  # noqa: E731
        return {"net": (self._plasticity_networks["net"], loss, probe)}

    def diagnostics(self, batch):
        return self.plasticity_diagnostics(batch)


class Collect:
    """The part of Logger that log_curvature uses, keeping the tags."""

    def __init__(self):
        self.tags = set()

    def scalars(self, values, step):
        self.tags |= set(values)


@pytest.fixture(scope="module")
def written_tags():
    """The plasticity/, plasticity_ref/, curvature/ and curvature_task/ tags of a 3-hidden-layer
    network registered as "net", written by the mixin and the loops' own functions."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                        nn.Linear(8, 2))
    holder = Holder(net)
    batch = {"x": torch.randn(16, 3), "y": torch.randn(16, 2)}
    F.mse_loss(net(batch["x"]), batch["y"]).backward()
    holder.optimizer.step()
    tags = set(probe_diagnostics(holder, batch, batch))
    logger = Collect()
    log_curvature(holder, logger, batch, seed=0, step=1, task_start=True)
    return tags | logger.tags


def test_layout_names_every_diagnostic_the_mixin_writes(written_tags, tmp_path):
    """Every plasticity/curvature tag of a real network is in exactly one chart, and every chart of the
    network's categories plots one unit (ranks, fractions and norms of layers never share an axis)."""
    written = {t.replace("/net/", "/critic/") for t in written_tags if t.split("/")[0] != "losses"}
    assert {t for t in written if "/layer2/" in t}, "the network has three hidden layers"
    logger = Logger(str(tmp_path), total_steps=1)
    logger.dashboard(networks=["critic"])
    logger.close()
    charts = {f"{c.title}/{chart.title}": list(chart.multiline.tag) for c in registered_layout(tmp_path).category
              for chart in c.chart}

    def unit(tag):
        head, rest = tag.split("/", 1)
        metric = rest.rsplit("/", 1)[-1]
        if head.startswith("curvature"):
            return {"change": "task start", "updates_since_change": "updates"}.get(metric) or CURVATURE_UNITS[metric]
        return LAYER_UNITS[metric] if "/layer" in rest else NETWORK_UNITS[metric]

    placed = {}
    for title, regexes in charts.items():
        tags = {t for t in written if any(re.match(r, t) for r in regexes)}
        for t in tags:
            assert t not in placed, (t, title, placed.get(t))
            placed[t] = title
        if tags:
            assert len({unit(t) for t in tags}) == 1, (title, sorted(tags))
    assert set(placed) == written, written - set(placed)
    # The task-start value is drawn beside the periodic one; the reference batch beside the current one.
    assert placed["curvature/critic/fisher_rank"] == placed["curvature_task/critic/fisher_rank"]
    assert placed["plasticity/critic/layer0/feature_srank"] == placed["plasticity_ref/critic/layer2/feature_srank"]
    assert placed["plasticity/critic/layer0/stable_rank"] != placed["plasticity/critic/layer0/feature_srank"]
SAC = dict(networks=["critic", "actor"])
PPO = dict(networks=["policy", "value"], losses=("policy", "value", "entropy", "approx_kl", "clip_fraction", "plasticity"),
           values=("log_std",), env_tags=("env/friction",))
CONTINUAL = dict(networks=["critic", "actor"], env_tags=("env/task",))


def units(networks, losses=("critic", "actor", "alpha", "plasticity"), values=("q_mean", "alpha", "entropy"),
          env_tags=()):
    """Unit of every tag the run writes (losses: each its own)."""
    out = {"charts/episode_return": "return", "eval/return_mean": "return", "charts/sps": "env steps/s",
           "charts/updates_per_s": "updates/s", "value/overestimation": "return"}
    out |= {f"losses/{name}": f"loss {name}" for name in losses}
    out |= {f"value/{name}": f"value {name}" for name in values}
    out |= {f"plasticity/{net}/{m}": unit for net in networks for m, unit in NETWORK_UNITS.items()}
    out |= {f"plasticity_ref/{net}/{m}": NETWORK_UNITS[m] for net in networks
            for m in ("feature_effective_rank", "dormant_fraction", "dead_fraction", "dead_units")}
    out |= {f"plasticity/{net}/layer{i}/{m}": f"{net} {unit}" for net in networks for i in range(2)
            for m, unit in LAYER_UNITS.items()}
    out |= {f"plasticity_ref/{net}/layer{i}/{m}": f"{net} {LAYER_UNITS[m]}" for net in networks for i in range(2)
            for m in ("feature_srank", "feature_effective_rank", "active_fraction", "feature_norm")}
    out |= {f"{prefix}/{net}/{m}": unit for net in networks for m, unit in CURVATURE_UNITS.items()
            for prefix in ("curvature", "curvature_task")}
    out["curvature_task/change"] = "task start"
    out["curvature_task/updates_since_change"] = "updates"
    out |= {tag: tag for tag in env_tags}  # each its own unit
    return out


def registered_layout(run_dir):
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    (event,) = read_events(run_dir).Tensors(metadata.CONFIG_SUMMARY_TAG)
    return layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])


@pytest.mark.parametrize("agent", [SAC, PPO, CONTINUAL], ids=["sac", "ppo-slippery-ant", "sac-continual-dmc"])
def test_every_dashboard_chart_has_one_unit(agent, tmp_path):
    logger = Logger(str(tmp_path), total_steps=1)
    logger.dashboard(**agent)
    logger.close()
    tag_units = units(**agent)
    charts = {}
    for category in registered_layout(tmp_path).category:
        for chart in category.chart:
            # TensorBoard's custom-scalars plugin matches each entry as a regular expression.
            tags = {t for regex in chart.multiline.tag for t in tag_units if re.match(regex, t)}
            for regex in chart.multiline.tag:
                assert any(re.match(regex, t) for t in tag_units), f"{chart.title}: {regex} matches no tag"
            assert len({tag_units[t] for t in tags}) == 1, (chart.title, sorted(tags))
            charts[f"{category.title}/{chart.title}"] = tags
    plotted = set().union(*charts.values())
    assert plotted == set(tag_units), set(tag_units) ^ plotted
    # The two cases: steps/s next to updates/s, parameter norms next to gradient norms.
    net = agent["networks"][0]
    for a, b in (("charts/sps", "charts/updates_per_s"), (f"plasticity/{net}/param_norm", f"plasticity/{net}/grad_norm"),
                 (f"curvature/{net}/fisher_rank", f"curvature/{net}/epsilon_rank"),
                 (f"plasticity/{net}/layer0/sigma_max", f"plasticity/{net}/layer0/stable_rank")):
        assert not any(a in tags and b in tags for tags in charts.values())
