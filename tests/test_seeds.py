"""num_seeds=N: seed i of an N-seed run is the single-seed run with that seed.

Batched (agents/seeds.py), SAC's and PPO's seeds agree with single-seed runs to float
tolerance (the batched matmuls sum in another order); updated one after the other
(batch_seeds=false), bitwise.  Also: per-seed directories, checkpoints and TensorBoard tags, exact
resumption of a multi-seed run, refused layouts, and a seed that diverges alone.
"""
import json
import signal
from pathlib import Path

import pytest
import torch

import numpy as np

from rl_plasticity.agents.ppo import PPOAgent, PPOConfig
from rl_plasticity.agents.sac import SACAgent, SACConfig
from rl_plasticity.agents.seeds import PPOSeedGroup, SACSeedGroup, SeedRNG
from rl_plasticity.buffers import Batch
from rl_plasticity.checkpoint import list_checkpoints
from rl_plasticity.plasticity.mixin import PlasticityConfig
from tests.test_cli import read_events, train
from tests.test_resume import popen, wait_for

SAC = ["env=gym", "env.id=Pendulum-v1", "agent.prefill_steps=100", "agent.replay_ratio=2", "agent.batch_size=32",
       "agent.hidden_sizes=[64,64]", "eval.every=400", "eval.episodes=1", "log.every=100", "checkpoint.every=400",
       "plasticity=spectral", "agent.reset_interval=500", "total_steps=800"]
PPO = ["agent=ppo", "env=slippery-ant", "env.change_every=300", "plasticity=cbp_l2", "plasticity.cbp_maturity=50",
       "plasticity.cbp_replacement_rate=0.01", "agent.rollout_steps=256", "agent.num_minibatches=8", "agent.epochs=2",
       "agent.hidden_sizes=[64,64]", "eval.every=256", "eval.episodes=1", "log.every=256", "checkpoint.every=256",
       "checkpoint.keep=4",
       "total_steps=1024"]
NETS = {"sac": ("actor", "critic", "critic_target"), "ppo": ("actor", "critic")}


def last_checkpoint(run_dir):
    return torch.load(list_checkpoints(Path(run_dir) / "checkpoints")[-1], weights_only=False)


def max_difference(a, b, nets):
    worst = 0.0
    for net in nets:
        for k, v in a["agent"][net].items():
            if torch.is_tensor(v) and v.dtype.is_floating_point:
                worst = max(worst, (v - b["agent"][net][k]).abs().max().item())
    return worst


# -- the batched update against separate agents ------------------------------------------------
def _agents(cfg, pcfg, seeds, kind=SACAgent, dims=(5, 3)):
    """One agent per seed, each built after torch.manual_seed(seed) as a run builds it, and its
    copy of the global generators."""
    agents, rngs = [], []
    for s in seeds:
        torch.manual_seed(s)
        agents.append(kind(*dims, cfg, plasticity=pcfg, seed=s))
        rngs.append(SeedRNG())
    return agents, rngs


@pytest.mark.parametrize("num_critics,layer_norm,plasticity,reset", [
    (1, True, PlasticityConfig(), None),
    (2, True, PlasticityConfig(name="spectral", coef=1e-3), None),
    (2, False, PlasticityConfig(name="l2_init", coef=1e-3), 5),
    (1, True, PlasticityConfig(name="cbp", cbp=True, cbp_maturity=2, cbp_replacement_rate=0.2), None),
    (2, True, PlasticityConfig(name="l2_er", coef=1e-3, er=True), 3),
    (1, True, PlasticityConfig(name="wasserstein", coef=1e-3), None),
    (2, True, PlasticityConfig(name="parseval", coef=1e-4), 5),
])
def test_batched_seeds_follow_separate_agents(num_critics, layer_norm, plasticity, reset):
    cfg = SACConfig(hidden_sizes=(32, 32), num_critics=num_critics, layer_norm=layer_norm, replay_ratio=4,
                    batch_size=16, reset_interval=reset)
    seeds = [3, 4, 5]
    single, single_rngs = _agents(cfg, plasticity, seeds)
    batched, rngs = _agents(cfg, plasticity, seeds)
    group = SACSeedGroup(batched, rngs)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        batches = [Batch(torch.randn(4, 16, 5, generator=g), torch.rand(4, 16, 3, generator=g) * 2 - 1,
                         torch.randn(4, 16, generator=g), torch.randn(4, 16, 5, generator=g),
                         (torch.rand(4, 16, generator=g) < 0.1).float()) for _ in seeds]
        metrics = group.update(batches)
        for i, (agent, batch, rng) in enumerate(zip(single, batches, single_rngs)):
            with rng:
                expected = agent.update(batch)
            for k, v in expected.items():
                assert torch.allclose(metrics[i][k], v, rtol=1e-4, atol=1e-5), k
    for a, b in zip(single, batched):
        assert a.update_count == b.update_count and a.reset_count == b.reset_count
        for net in ("actor", "critic", "critic_target"):
            for (k, v), w in zip(getattr(a, net).state_dict().items(), getattr(b, net).state_dict().values()):
                assert torch.allclose(v, w, atol=1e-5), f"{net}.{k}"
        assert torch.allclose(a.log_alpha, b.log_alpha, atol=1e-6)
    if reset is not None:
        assert batched[0].reset_count > 0
    # Each seed's parameters are still views of the group's stacks (also after resets).
    for i, agent in enumerate(batched):
        assert agent.actor.net[0].weight.data_ptr() == group._storage[0][0][i].data_ptr()
        assert agent.log_alpha.data_ptr() == group._alpha[i].data_ptr()


def test_a_seed_of_the_group_is_still_a_whole_agent():
    cfg = SACConfig(hidden_sizes=(16, 16), replay_ratio=2, batch_size=8)
    agents, rngs = _agents(cfg, PlasticityConfig(), [0, 1])
    SACSeedGroup(agents, rngs)
    state = agents[1].state_dict()
    torch.manual_seed(1)
    alone = SACAgent(5, 3, cfg, seed=1)
    alone.load_state_dict(state)
    obs = torch.randn(5).numpy()
    assert (alone.act(obs, deterministic=True) == agents[1].act(obs, deterministic=True)).all()
    assert state["actor"]["net.0.weight"].shape == alone.actor.net[0].weight.shape


def _rollout(rng, rows, obs_dim=6, action_dim=2):
    f32 = np.float32
    return {"obs": rng.standard_normal((rows, obs_dim)).astype(f32),
            "action": rng.standard_normal((rows, action_dim)).astype(f32),
            "log_prob": (rng.standard_normal(rows) - 2.0).astype(f32), "value": rng.standard_normal(rows).astype(f32),
            "advantage": rng.standard_normal(rows).astype(f32), "return": rng.standard_normal(rows).astype(f32)}


@pytest.mark.parametrize("layer_norm,plasticity,reset,max_grad_norm", [
    (True, PlasticityConfig(), None, None),
    (False, PlasticityConfig(name="l2_init", coef=1e-3), 7, 0.5),
    (True, PlasticityConfig(name="cbp_l2", coef=1e-3, cbp=True, cbp_maturity=2, cbp_replacement_rate=0.2), None, None),
    (False, PlasticityConfig(name="l2_er", coef=1e-3, er=True, er_batch=12), 5, None),
    (True, PlasticityConfig(name="spectral", coef=1e-3), None, None),
    (False, PlasticityConfig(name="wasserstein", coef=1e-3), None, None),
    (False, PlasticityConfig(name="parseval", coef=1e-4), 5, None),
    (True, PlasticityConfig(name="spectral", coef=1e-3), 5, None),
])
def test_batched_ppo_seeds_follow_separate_agents(layer_norm, plasticity, reset, max_grad_norm):
    """PPOSeedGroup against each agent's own `update`: every metric and parameter to float
    tolerance (measured: within 1.2e-7), over regularizers, continual backprop, the
    effective-rank step (its block larger than a minibatch), resets and gradient clipping."""
    cfg = PPOConfig(rollout_steps=32, num_minibatches=4, epochs=2, hidden_sizes=(16, 16), layer_norm=layer_norm,
                    reset_interval=reset, max_grad_norm=max_grad_norm)
    seeds = [3, 4, 5]
    single, single_rngs = _agents(cfg, plasticity, seeds, PPOAgent, (6, 2))
    batched, rngs = _agents(cfg, plasticity, seeds, PPOAgent, (6, 2))
    group = PPOSeedGroup(batched, rngs)
    data = np.random.default_rng(0)
    for _ in range(4):
        rollouts = [_rollout(data, 32) for _ in seeds]
        metrics = group.update(rollouts)
        for i, (agent, rollout, rng) in enumerate(zip(single, rollouts, single_rngs)):
            with rng:
                expected = agent.update(rollout)
            assert metrics[i].keys() == expected.keys()
            for k, v in expected.items():
                assert torch.allclose(metrics[i][k], v, rtol=1e-4, atol=1e-5), k
    for a, b in zip(single, batched):
        assert a.update_count == b.update_count == 4 * 2 * 4 and a.reset_count == b.reset_count
        for net in ("actor", "critic"):
            for (k, v), w in zip(getattr(a, net).state_dict().items(), getattr(b, net).state_dict().values()):
                assert torch.allclose(v, w, atol=1e-5), f"{net}.{k}"
        assert torch.allclose(a.log_std, b.log_std, atol=1e-6)
        assert torch.equal(a.generator.get_state(), b.generator.get_state())
    if reset is not None:
        assert batched[0].reset_count > 0
    if plasticity.cbp:
        assert all(c.replaced_total > 0 for c in batched[0]._cbp.values())
    for i, agent in enumerate(batched):  # still views of the stacks, also after resets
        assert agent.actor[0].weight.data_ptr() == group._storage["actor"][0][i].data_ptr()
        assert agent.log_std.data_ptr() == group._storage["log_std"][0][i].data_ptr()
        assert agent.critic[0].weight.grad.data_ptr() == group._storage["critic"][0].grad[i].data_ptr()


def test_batch_seeds_default_follows_the_measurements():
    """null: PPO batched everywhere, SAC batched on CUDA only (here: in turn); true/false force it;
    SAC's autograd path always updates in turn."""
    from rl_plasticity.agents.seeds import SequentialGroup
    from rl_plasticity.run.lockstep import seed_group as _seed_group

    ppo = [PPOAgent(6, 2, PPOConfig(hidden_sizes=(8,)), seed=s) for s in (0, 1)]
    assert isinstance(_seed_group(ppo, [SeedRNG(), SeedRNG()], None), PPOSeedGroup)
    assert isinstance(_seed_group(ppo, [SeedRNG(), SeedRNG()], False), SequentialGroup)
    sac = [SACAgent(5, 3, SACConfig(hidden_sizes=(8, 8)), seed=s) for s in (0, 1)]
    assert isinstance(_seed_group(sac, [SeedRNG(), SeedRNG()], None), SequentialGroup)
    assert isinstance(_seed_group(sac, [SeedRNG(), SeedRNG()], True), SACSeedGroup)
    reference = [SACAgent(5, 3, SACConfig(hidden_sizes=(8, 8), fused=False), seed=s) for s in (0, 1)]
    assert isinstance(_seed_group(reference, [SeedRNG(), SeedRNG()], True), SequentialGroup)


def test_ppo_seed_group_refuses_different_settings():
    agents = [PPOAgent(6, 2, PPOConfig(hidden_sizes=(8,))), PPOAgent(6, 2, PPOConfig(hidden_sizes=(8,), lr=1e-3))]
    with pytest.raises(ValueError, match="settings must be the same"):
        PPOSeedGroup(agents)


# -- whole runs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-seed run (seeds 5, 6) and the single-seed runs of those seeds, for SAC and PPO."""
    out = {}
    for kind, args in (("sac", SAC), ("ppo", PPO)):
        root = tmp_path_factory.mktemp(kind)
        # The batched update (PPO's default; SAC's on CUDA only, so asked for) ...
        result = train(*args, "seed=5", "num_seeds=2", "batch_seeds=true", f"run_dir={root / 'multi'}")
        assert result.returncode == 0, result.stderr
        # ... and each seed's own update, one after the other (SAC's CPU default).
        result = train(*args, "seed=5", "num_seeds=2", "batch_seeds=false", f"run_dir={root / 'multi_in_turn'}")
        assert result.returncode == 0, result.stderr
        for seed in (5, 6):
            result = train(*args, f"seed={seed}", f"run_dir={root / f'single_{seed}'}")
            assert result.returncode == 0, result.stderr
        out[kind] = root
    return out


FIRST_CHECKPOINT = {"sac": 400, "ppo": 256}


@pytest.mark.parametrize("kind", ["sac", "ppo"])
def test_each_seed_of_a_multi_seed_run_is_the_single_seed_run(kind, runs):
    """Seeds updated in turn are bitwise the single-seed runs.  Batched matmuls sum in another
    order (about 1e-7 per update, tests above); in a closed loop the differences then grow with
    training (the actions change the data), so batched seeds are compared at the first
    checkpoint: SAC after a reset and about 600 updates (measured: parameters within 6e-6), PPO
    after its first update, 16 minibatch steps (3e-8; after the second update, on a rollout the
    slightly different policy collected on the contact-rich ant, 4e-3: with Adam's normalised
    steps a tiny change of a small gradient moves a parameter by up to lr per step)."""
    root = runs[kind]
    assert sorted(p.name for p in (root / "multi").iterdir() if p.name.startswith("seed_")) == ["seed_5", "seed_6"]
    for seed in (5, 6):
        multi_dir, single_dir = root / "multi" / f"seed_{seed}", root / f"single_{seed}"
        multi, single = last_checkpoint(multi_dir), last_checkpoint(single_dir)
        assert multi["config"]["seed"] == seed and multi["step"] == single["step"]
        assert multi["agent"]["update_count"] == single["agent"]["update_count"]
        first = f"checkpoints/step_{FIRST_CHECKPOINT[kind]:09d}.pt"
        a = torch.load(multi_dir / first, weights_only=False)
        b = torch.load(single_dir / first, weights_only=False)
        assert a["agent"]["plasticity"]["reset_count"] == b["agent"]["plasticity"]["reset_count"]
        assert max_difference(a, b, NETS[kind]) < 1e-4
        # Each seed's checkpoint holds its own parameters, not the stacks of all seeds they alias.
        for net in NETS[kind]:
            for k, v in a["agent"][net].items():
                assert v.untyped_storage().nbytes() == v.numel() * v.element_size(), f"{net}.{k}"
        if kind == "sac":
            assert a["agent"]["plasticity"]["reset_count"] == 1
            assert torch.allclose(a["replay"]["obs"], b["replay"]["obs"], atol=1e-3)
        assert a["loop"]["last_eval"]["eval/return_mean"] == pytest.approx(b["loop"]["last_eval"]["eval/return_mean"],
                                                                            rel=1e-4)
        # SAC: the episodes up to there; PPO (1000-step episodes): the first update's losses.
        tag = "charts/episode_return" if kind == "sac" else "losses/policy"
        got = [(e.step, e.value) for e in read_events(multi_dir).Scalars(tag) if e.step <= FIRST_CHECKPOINT[kind]]
        want = [(e.step, e.value) for e in read_events(single_dir).Scalars(tag) if e.step <= FIRST_CHECKPOINT[kind]]
        assert [s for s, _ in got] == [s for s, _ in want] and len(got) >= (2 if kind == "sac" else 1)
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-4)
        # Unbatched, the seeds are bitwise the single-seed runs, curves included.
        in_turn_dir = root / "multi_in_turn" / f"seed_{seed}"
        in_turn = last_checkpoint(in_turn_dir)
        assert max_difference(in_turn, single, NETS[kind]) == 0.0
        assert in_turn["loop"]["last_eval"] == single["loop"]["last_eval"]
        tags = ("charts/episode_return", "eval/return_mean") + (("losses/policy", "env/friction") if kind == "ppo" else ())
        for tag in tags:
            got = [(e.step, e.value) for e in read_events(in_turn_dir).Scalars(tag)]
            assert got == [(e.step, e.value) for e in read_events(single_dir).Scalars(tag)], tag
    # The seeds are different runs.
    assert max_difference(last_checkpoint(root / "multi" / "seed_5"), last_checkpoint(root / "multi" / "seed_6"),
                          NETS[kind]) > 1e-3


def test_a_seed_directory_continues_as_a_single_seed_run(runs, tmp_path):
    import shutil

    seed_dir = tmp_path / "seed_6"
    shutil.copytree(runs["sac"] / "multi" / "seed_6", seed_dir)
    result = train(*[a for a in SAC if not a.startswith("total_steps")], "total_steps=900", "seed=6",
                   f"run_dir={seed_dir}")
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout
    assert last_checkpoint(seed_dir)["step"] == 900


def test_multi_seed_run_refuses_the_other_layout(runs, tmp_path):
    multi, single = runs["ppo"] / "multi", runs["ppo"] / "single_5"
    before = sorted(p.name for p in multi.rglob("*"))
    result = train(*PPO, "seed=5", f"run_dir={multi}")
    assert result.returncode == 2 and "multi-seed run (seed_5, seed_6)" in result.stderr
    assert "num_seeds=2" in result.stderr
    result = train(*PPO, "seed=5", "num_seeds=2", f"run_dir={single}")
    assert result.returncode == 2 and "holds a single-seed run" in result.stderr
    result = train(*PPO, "num_seeds=0", f"run_dir={tmp_path / 'x'}")
    assert result.returncode == 2 and "num_seeds must be >= 1" in result.stderr
    assert sorted(p.name for p in multi.rglob("*")) == before


@pytest.mark.parametrize("kind", ["sac", "ppo"])
def test_sigterm_stops_every_seed_and_the_resumed_run_is_exact(kind, runs, tmp_path):
    """A batched 2-seed run stopped after its first checkpoint (PPO: in the middle of its second
    rollout), then resumed: each seed ends bitwise where the uninterrupted run ended, and its
    curves have the same points."""
    args = [*(SAC if kind == "sac" else PPO), "seed=5", "num_seeds=2", "batch_seeds=true"]
    first, last = (400, 800) if kind == "sac" else (256, 1024)
    proc = popen(args, tmp_path)
    wait_for(lambda: (tmp_path / "seed_6" / "checkpoints" / f"step_{first:09d}.pt").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "Resume with:" in out and "done" not in out
    stopped = {list_checkpoints(tmp_path / f"seed_{s}" / "checkpoints")[-1].name for s in (5, 6)}
    assert len(stopped) == 1 and stopped != {f"step_{last:09d}.pt"}  # both seeds stop after the same step
    result = train(*args, f"run_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    for seed in (5, 6):
        a, b = last_checkpoint(tmp_path / f"seed_{seed}"), last_checkpoint(runs[kind] / "multi" / f"seed_{seed}")
        assert a["step"] == b["step"] == last
        assert max_difference(a, b, NETS[kind]) == 0.0
        tags = ("charts/episode_return", "losses/critic") if kind == "sac" else ("losses/policy", "eval/return_mean")
        got, want = read_events(tmp_path / f"seed_{seed}"), read_events(runs[kind] / "multi" / f"seed_{seed}")
        for tag in tags:
            assert [(e.step, e.value) for e in got.Scalars(tag)] == [(e.step, e.value) for e in want.Scalars(tag)]


def test_a_diverging_seed_stops_alone(tmp_path, monkeypatch):
    """Seed 1's critic is poisoned mid-run: it stops with its diverged.json, seed 0 finishes, and
    the run exits with the divergence error naming seed 1's checkpoint."""
    from hydra import compose, initialize_config_module

    from rl_plasticity import train as train_module
    from rl_plasticity.loops import DivergenceError
    from rl_plasticity.run import seed as seed_module

    original = seed_module.start_seed

    def start(seed, *args, **kwargs):
        seed_run = original(seed, *args, **kwargs)
        if seed == 1:
            agent, calls = seed_run.job.agent, [0]
            update = agent.plasticity_after_update

            def poisoned(batch, features=None):
                calls[0] += 1
                if calls[0] == 800:  # updates start at step 100, two per step: step 500
                    with torch.no_grad():
                        agent.critic.net.layers[0].weight[0, 0, 0] = float("nan")
                return update(batch, features)

            agent.plasticity_after_update = poisoned
        return seed_run

    monkeypatch.setattr(seed_module, "start_seed", start)
    args = [a for a in SAC if not a.startswith(("total_steps", "plasticity"))] + ["total_steps=1200", "num_seeds=2",
                                                                                  "batch_seeds=true"]
    with initialize_config_module(config_module="rl_plasticity.configs", version_base=None):
        cfg = compose("train", overrides=args)
    with pytest.raises(DivergenceError, match="diverged at env step"):
        train_module.train(cfg, str(tmp_path))
    record = json.loads((tmp_path / "seed_1" / "diverged.json").read_text())
    assert record["step"] == 500 and record["last_good_checkpoint"].endswith("seed_1/checkpoints/step_000000400.pt")
    assert not (tmp_path / "seed_0" / "diverged.json").exists()
    assert last_checkpoint(tmp_path / "seed_0")["step"] == 1200
    assert [p.name for p in list_checkpoints(tmp_path / "seed_1" / "checkpoints")] == ["step_000000400.pt"]


def test_evaluate_and_report_read_a_multi_seed_run(runs, tmp_path):
    import subprocess
    import sys

    multi = runs["sac"] / "multi"
    result = subprocess.run([sys.executable, "-m", "rl_plasticity.evaluate", f"checkpoint={multi}", "episodes=1"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for seed in (5, 6):
        assert (multi / f"seed_{seed}" / "checkpoint_returns.csv").exists()
    result = subprocess.run([sys.executable, "-m", "rl_plasticity.report", str(multi), "--out", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    import csv

    rows = list(csv.DictReader((tmp_path / "final_performance.csv").open()))
    assert len(rows) == 1  # both seeds pooled into one method
    assert rows[0]["method"] == "sac+LN+reset+spectral" and rows[0]["runs"] == "2"
    assert rows[0]["final_step_min"] == rows[0]["final_step_max"] == "800"
