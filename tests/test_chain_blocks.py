"""ensemble.chain_blocks, the one walker of the Linear → [LayerNorm] → [ReLU | CReLU] chain that
the fused update, the feature recorder and unit surgery read networks with."""
import pytest
from torch import nn

from rl_plasticity.agents.networks import EnsembleMLP, TanhGaussianActor, mlp
from rl_plasticity.agents.ppo import policy_mlp
from rl_plasticity.ensemble import CReLU, EnsembleLayerNorm, EnsembleLinear, chain_blocks


@pytest.mark.parametrize("activation", ["relu", "crelu"])
@pytest.mark.parametrize("layer_norm", [True, False])
def test_every_builder_gives_hidden_blocks_and_a_bare_head(activation, layer_norm):
    for net, linear, norm in ((mlp(4, [8, 6], 2, layer_norm, activation), nn.Linear, nn.LayerNorm),
                              (policy_mlp(4, (8, 6), 2, layer_norm, 0.01, activation), nn.Linear, nn.LayerNorm),
                              (EnsembleMLP(3, 4, [8, 6], 2, layer_norm, activation), EnsembleLinear, EnsembleLayerNorm),
                              (TanhGaussianActor(4, 1, [8, 6], layer_norm, activation=activation), nn.Linear,
                               nn.LayerNorm)):
        blocks = chain_blocks(net, strict="test")
        assert len(blocks) == 3
        assert all(isinstance(b.linear, linear) for b in blocks)
        assert [isinstance(b.norm, norm) for b in blocks] == [layer_norm, layer_norm, False]
        assert [b.relu for b in blocks] == [True, True, False]
        assert [b.crelu for b in blocks] == [activation == "crelu"] * 2 + [False]
        assert blocks[1].linear.in_features == (16 if activation == "crelu" else 8)  # CReLU: 2n features


def test_other_leaf_layers_are_passed_over_unless_strict():
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 1))
    blocks = chain_blocks(net)
    assert [type(b.linear) for b in blocks] == [nn.Conv2d, nn.Linear, nn.Linear]
    assert [b.relu for b in blocks] == [True, False, False]
    with pytest.raises(TypeError, match="fused path: unexpected layer Flatten"):
        chain_blocks(net, strict="fused path")


@pytest.mark.parametrize("net", [nn.Sequential(nn.ReLU(), nn.Linear(2, 2)),
                                 nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.LayerNorm(2)),
                                 nn.Sequential(nn.Linear(2, 2), CReLU(), CReLU())])
def test_a_norm_or_activation_without_its_linear_layer_is_an_error(net):
    with pytest.raises(TypeError, match="without a linear layer"):
        chain_blocks(net)
