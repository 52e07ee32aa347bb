"""The fused SAC update (hand-written gradients) against the autograd reference, and the
compile / cudagraphs options with their fallbacks, on CPU."""
from __future__ import annotations

import warnings

import pytest
import torch

from rl_plasticity.agents.sac import SACAgent, SACConfig
from rl_plasticity.buffers import Batch
from rl_plasticity.plasticity.mixin import PlasticityConfig

OBS, ACT = 11, 3


def make_agent(fused: bool, num_critics: int = 1, layer_norm: bool = True, plasticity: str = "none",
               coef: float = 0.0, **kw) -> SACAgent:
    torch.manual_seed(7)  # same initial parameters for every agent of a comparison
    cfg = SACConfig(num_critics=num_critics, layer_norm=layer_norm, fused=fused, hidden_sizes=(64, 64))
    return SACAgent(OBS, ACT, cfg, "cpu", plasticity=PlasticityConfig(name=plasticity, coef=coef), seed=3, **kw)


def make_batch(updates: int = 3, size: int = 32, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(updates, size, OBS, generator=g), torch.rand(updates, size, ACT, generator=g) * 2 - 1,
                 torch.randn(updates, size, generator=g), torch.randn(updates, size, OBS, generator=g),
                 (torch.rand(updates, size, generator=g) < 0.2).float())


def trained(agent: SACAgent) -> list[torch.Tensor]:
    return [*agent.actor.parameters(), *agent.critic.parameters(), *agent.critic_target.parameters(), agent.log_alpha]


def grads(agent: SACAgent) -> list[torch.Tensor]:
    return [p.grad for p in [*agent.actor.parameters(), *agent.critic.parameters(), agent.log_alpha]]


def assert_close_lists(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float, atol: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("num_critics", [1, 2])
@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("plasticity,coef", [("none", 0.0), ("l2_init", 1e-2), ("spectral", 1e-2), ("wasserstein", 1e-2),
                                               ("parseval", 1e-4)])
def test_fused_gradients_and_metrics_match_autograd(num_critics, layer_norm, plasticity, coef):
    """One update: every gradient (critic, actor through the critic, temperature, regularizer)
    and every metric of the fused path equals the autograd reference."""
    ref, fused = (make_agent(f, num_critics, layer_norm, plasticity, coef) for f in (False, True))
    batch = make_batch(updates=1)
    m_ref, m_fused = ref.update(batch), fused.update(batch)
    assert set(m_ref) == set(m_fused)
    for key in m_ref:
        torch.testing.assert_close(m_fused[key], m_ref[key], rtol=1e-5, atol=1e-6, msg=key)
    g_ref, g_fused = grads(ref), grads(fused)
    assert all(g is not None for g in g_fused)
    assert_close_lists(g_fused, g_ref, rtol=1e-4, atol=1e-6)
    # The gradients are not trivially zero: the comparison has something to compare.
    assert all(float(g.abs().max()) > 0 for g in g_ref[:-1])


def test_fused_training_follows_the_reference_over_many_updates():
    """Several env steps of 4 updates each (parameters, targets, temperature, optimizer state)."""
    ref, fused = make_agent(False, 2), make_agent(True, 2)
    for step in range(5):
        batch = make_batch(updates=4, seed=step)
        ref.update(batch)
        fused.update(batch)
    assert_close_lists(trained(fused), trained(ref), rtol=1e-4, atol=1e-6)
    assert fused.update_count == ref.update_count == 20


def test_fused_path_keeps_resets_and_effective_rank_step():
    """Interventions run the same way on the fused path: a reset rebuilds the plan, ER steps."""
    for plasticity in ("l2_er",):
        ref, fused = (make_agent(f, plasticity=plasticity, coef=1e-3) for f in (False, True))
        for step in range(2):
            ref.update(make_batch(updates=2, seed=step))
            fused.update(make_batch(updates=2, seed=step))
        assert_close_lists(trained(fused), trained(ref), rtol=1e-4, atol=1e-6)
    ref = make_agent(False)
    fused = make_agent(True)
    ref.reset_interval = fused.reset_interval = 3
    for step in range(3):
        torch.manual_seed(100 + step)  # resets draw fresh weights from the global generator
        ref.update(make_batch(updates=2, seed=step))
        torch.manual_seed(100 + step)
        fused.update(make_batch(updates=2, seed=step))
    assert ref.reset_count == fused.reset_count == 2
    assert_close_lists(trained(fused), trained(ref), rtol=1e-4, atol=1e-6)


def test_cudagraphs_without_cuda_warns_and_changes_nothing():
    plain, asked = make_agent(True), None
    with pytest.warns(UserWarning, match="cudagraphs=true needs a CUDA device"):
        asked = make_agent(True, cudagraphs=True)
    batch = make_batch()
    plain.update(batch)
    asked.update(batch)
    assert all(torch.equal(a, b) for a, b in zip(trained(asked), trained(plain)))


def test_a_failing_compiler_falls_back_with_one_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("backend exploded\nlong inductor trace")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    plain = make_agent(True)
    agent = make_agent(True, compile=True)
    with pytest.warns(UserWarning, match=r"backend exploded\); continuing without it") as record:
        agent.update(make_batch())
    assert len([w for w in record if "continuing without it" in str(w.message)]) == 1
    plain.update(make_batch())
    assert all(torch.equal(a, b) for a, b in zip(trained(agent), trained(plain)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        agent.update(make_batch(seed=1))


def test_compile_option_on_the_reference_path_warns():
    with pytest.warns(UserWarning, match="apply to the fused update"):
        make_agent(False, compile=True)


def test_compiled_update_matches_the_eager_update():
    """compile=true (inductor on CPU) computes the same update as the uncompiled fused path."""
    pytest.importorskip("torch._inductor")
    plain, compiled = make_agent(True, 2), make_agent(True, 2, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback would hide a broken compile
        for step in range(2):
            batch = make_batch(updates=2, seed=step)
            plain.update(batch)
            compiled.update(batch)
    assert compiled._losses_and_grads.active
    assert_close_lists(trained(compiled), trained(plain), rtol=1e-4, atol=1e-6)


def test_compile_keys_may_change_on_resume():
    from rl_plasticity.run.resume import config_differences

    saved = {"seed": 0, "compile": False, "cudagraphs": False, "agent": {"fused": True}}
    assert config_differences(saved, {**saved, "compile": True, "cudagraphs": True}) == []
    # agent.fused picks an implementation of the same update (equal to float tolerance, like
    # compile); runs saved before the key was in the config (no agent.fused) resume too.
    assert config_differences(saved, {**saved, "agent": {"fused": False}}) == []
    assert config_differences({"seed": 0, "agent": {}}, {"seed": 0, "agent": {"fused": True}}) == []
    assert config_differences(saved, {**saved, "agent": {"fused": True, "tau": 0.01}}) != []


@pytest.mark.slow
def test_compiled_update_with_cbp_hands_out_the_same_features():
    """compile=true with continual backprop: the compiled function returns the cached activations
    it takes them from, and CBP replaces the same units as on the uncompiled fused path."""
    pytest.importorskip("torch._inductor")
    pcfg = PlasticityConfig(name="cbp", cbp_maturity=2, cbp_replacement_rate=0.1)
    agents = []
    for compile_ in (False, True):
        torch.manual_seed(7)
        cfg = SACConfig(num_critics=2, hidden_sizes=(32, 32), batch_size=16, replay_ratio=2)
        agents.append(SACAgent(OBS, ACT, cfg, "cpu", plasticity=pcfg, seed=3, compile=compile_))
    plain, compiled = agents
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for step in range(3):
            batch = make_batch(updates=2, size=16, seed=step)
            for agent in agents:
                torch.manual_seed(100 + step)  # replacements draw from the global generator
                agent.update(batch)
    assert compiled._losses_and_grads.active
    for name in ("actor", "critic"):
        assert compiled._cbp[name].replaced_total == plain._cbp[name].replaced_total > 0


def make_injected(fused: bool, num_critics: int, layer_norm: bool, interventions: tuple[str, ...] = (),
                  layers: int = 2, activation: str = "relu", regularizer: str = "l2", **kw) -> SACAgent:
    """An agent that injects plasticity after update 2 (Nikishin et al. 2023), with a regularizer
    and `interventions` (redo / partial_reset / shrink_perturb) due after it."""
    torch.manual_seed(7)
    pcfg = PlasticityConfig(name=regularizer, coef=1e-3, interventions=["injection", *interventions],
                            injection={"at": 2, "layers": layers}, redo={"every": 3, "tau": 0.3},
                            partial_reset={"every": 4, "layers": 1}, shrink_perturb={"every": 5})
    cfg = SACConfig(num_critics=num_critics, layer_norm=layer_norm, fused=fused, hidden_sizes=(32, 32),
                    activation=activation)
    return SACAgent(OBS, ACT, cfg, "cpu", plasticity=pcfg, seed=3, **kw)


@pytest.mark.parametrize("num_critics,layer_norm,interventions,layers,activation,regularizer", [
    (1, True, (), 2, "relu", "l2"), (2, False, (), 2, "relu", "l2"),
    (2, True, ("redo", "partial_reset", "shrink_perturb"), 2, "relu", "l2"), (2, True, (), 3, "relu", "l2"),
    (2, True, ("shrink_perturb",), 2, "crelu", "spectral")])
def test_fused_update_after_plasticity_injection_matches_autograd(num_critics, layer_norm, interventions, layers,
                                                                  activation, regularizer):
    """After injection the fused path runs trunk → three heads (`fused.InjectedPlan`): every update's
    metrics, the trained parameters' gradients and all parameters (frozen heads, target) follow
    the autograd reference, also with redo, partial resets and shrink-and-perturb after the
    injection, with the whole network as the head (`layers`=3: no trunk), and with CReLU and the
    spectral regularizer's closed-form gradient."""
    ref, fused = (make_injected(f, num_critics, layer_norm, interventions, layers, activation, regularizer)
                  for f in (False, True))
    for step in range(5):
        batch = make_batch(updates=2, seed=step)
        torch.manual_seed(100 + step)  # the fresh head and the surgery draw from the global generator
        m_ref = ref.update(batch)
        torch.manual_seed(100 + step)
        m_fused = fused.update(batch)
        for key in m_ref:
            torch.testing.assert_close(m_fused[key], m_ref[key], rtol=1e-5, atol=1e-6, msg=key)
        live = lambda agent: [p.grad for p in [*agent.actor.parameters(), *agent.critic.parameters()]  # noqa: E731
                              if p.requires_grad]
        assert_close_lists(live(fused), live(ref), rtol=1e-4, atol=1e-6)
        assert_close_lists(trained(fused), trained(ref), rtol=1e-4, atol=1e-6)
    assert fused.intervention("injection").injected and type(fused._fused.critic).__name__ == "InjectedPlan"
    head = fused.actor.net[-1]
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in head.fresh.parameters())
    assert all(not torch.equal(p, q) for p, q in zip(head.fresh.parameters(), head.fresh_frozen.parameters()))
    if "redo" in interventions:
        assert fused.intervention("redo").recycled == ref.intervention("redo").recycled
        assert fused.intervention("partial_reset").count == ref.intervention("partial_reset").count == 2
        assert fused.intervention("shrink_perturb").count == ref.intervention("shrink_perturb").count == 2


def test_injection_rebuilds_and_rewraps_the_fused_update(monkeypatch):
    """The injected structure needs a new plan, and a compiled update must be compiled again over it."""
    compiled = []

    def recording_compile(fn, **kwargs):
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", recording_compile)
    agent = make_injected(True, 2, True, compile=True)
    before = agent._losses_and_grads
    agent.update(make_batch(updates=2))
    assert agent.intervention("injection").injected
    assert len(compiled) == 2 and compiled[-1] == agent._fused.losses_and_grads
    assert agent._losses_and_grads is not before and agent._losses_and_grads.compiled == compiled[-1]


def test_a_run_injected_on_the_autograd_path_resumes_on_the_fused_path():
    """agent.fused may change when a run resumes (run/resume.py): a checkpoint written after an
    injection on the autograd path (all such runs before the fused path could inject) loads into
    a fused agent, which injects first (`prepare_load`) and continues as the autograd run does."""
    import copy

    ref = make_injected(False, 1, True)
    ref.update(make_batch(updates=3, seed=0))
    assert ref.intervention("injection").injected
    fused = make_injected(True, 1, True)
    fused.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert type(fused._fused.actor).__name__ == "InjectedPlan"
    for step in range(1, 4):
        ref.update(make_batch(updates=2, seed=step))
        fused.update(make_batch(updates=2, seed=step))
    assert_close_lists(trained(fused), trained(ref), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_update_after_injection_matches_the_eager_update():
    """compile=true (inductor on CPU, about a minute): the update compiled anew over the injected
    plan computes what the uncompiled fused path does."""
    pytest.importorskip("torch._inductor")
    plain, compiled = make_injected(True, 2, True), make_injected(True, 2, True, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback would hide a broken compile
        for step in range(3):
            batch = make_batch(updates=2, seed=step)
            torch.manual_seed(100 + step)
            plain.update(batch)
            torch.manual_seed(100 + step)
            compiled.update(batch)
    assert compiled.intervention("injection").injected and compiled._losses_and_grads.active
    assert_close_lists(trained(compiled), trained(plain), rtol=1e-4, atol=1e-6)
