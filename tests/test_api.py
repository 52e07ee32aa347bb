"""The public Python API: the exports of `rl_plasticity` and the README's example, run verbatim."""
import re
from pathlib import Path

import pytest
import torch

import rl_plasticity as rp

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text.split("## Use the toolbox on your own model", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)[:1]
    return code


def test_the_readme_example_runs_and_regularizes(capsys):
    namespace: dict = {}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    learner = namespace["learner"]
    assert learner.plasticity_updates == 600
    out = capsys.readouterr().out
    assert "plasticity/net/spectral_norm_max" in out and "'parseval'" in out
    assert namespace["diagnostics"]["losses/plasticity"].item() > 0


def test_public_names():
    from rl_plasticity.plasticity.mixin import PlasticityConfig, PlasticityMixin
    from rl_plasticity.plasticity.regularizers import REGULARIZERS, register

    assert rp.PlasticityMixin is PlasticityMixin and rp.PlasticityConfig is PlasticityConfig
    assert rp.REGULARIZERS is REGULARIZERS and rp.register_regularizer is register
    assert {"spectral", "parseval", "l2", "wasserstein"} <= set(rp.REGULARIZERS)
    assert set(rp.__all__) <= set(dir(rp)) | {"__version__"}
    with pytest.raises(AttributeError):
        rp.not_a_name  # noqa: B018


def test_a_name_alone_takes_the_papers_defaults_and_an_unknown_name_lists_the_valid_ones():
    assert rp.PlasticityConfig(name="spectral").coef == 1e-4
    assert rp.PlasticityConfig(name="parseval").coef == 1e-3
    with pytest.raises(rp.ConfigError, match=r"unknown plasticity 'parsevel'. Valid choices: .*parseval.*spectral"):
        rp.PlasticityConfig(name="parsevel")


def test_a_registered_regularizer_is_chosen_by_name():
    @rp.register_regularizer("test_l1")
    class L1(rp.Regularizer):
        def penalty(self):
            return torch.stack([p.abs().sum() for p in self.network.parameters()]).sum()

    try:
        net = torch.nn.Linear(3, 2)
        with torch.no_grad():
            net.weight.fill_(-0.5)
            net.bias.fill_(2.0)

        class Holder(rp.PlasticityMixin):
            def __init__(self):
                self.init_plasticity(rp.PlasticityConfig(name="test_l1", coef=0.5))
                self.register_networks({"net": net})

        assert Holder().plasticity_loss("net").item() == pytest.approx(0.5 * (6 * 0.5 + 2 * 2.0))
    finally:
        rp.REGULARIZERS.pop("test_l1")
