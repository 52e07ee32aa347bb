"""The TensorBoard custom-scalars dashboard: every chart plots one unit, and every tag it names is
one the agents write (SAC and PPO, Slippery Ant's friction, continual DMC's task)."""
import re

import pytest

from rl_plasticity.logging import Logger
from tests.test_cli import read_events

NETWORK_UNITS = {"spectral_norm_max": "σ₁", "spectral_norm_mean": "σ₁", "param_norm": "‖θ‖", "grad_norm": "‖∇θ‖",
                 "distance_from_init": "‖θ − θ₀‖", "feature_effective_rank": "rank", "dormant_fraction": "fraction",
                 "dead_fraction": "fraction", "dead_units": "units", "cbp_replaced": "replaced units",
                 "redo_recycled": "recycled units", "shrink_perturb_count": "applications",
                 "partial_resets": "applications", "injected": "flag"}
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
    for a, b in (("charts/sps", "charts/updates_per_s"), (f"plasticity/{net}/param_norm", f"plasticity/{net}/grad_norm")):
        assert not any(a in tags and b in tags for tags in charts.values())
