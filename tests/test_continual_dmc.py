"""Continual DMC (env=continual-dmc): switch timing, spaces, checkpoint round trip, evaluation on
the current task, and training runs of SAC and PPO that log the task and resume exactly."""
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from rl_plasticity.config import ConfigError
from rl_plasticity.envs import make_env
from rl_plasticity.envs.dmc import UnknownEnvError
from rl_plasticity.envs.nonstationary import episode_metrics, follow_training
from rl_plasticity.envs.state import capture_env, restore_env
from tests.test_cli import read_events, train
from tests.test_resume import assert_same_parameters, final_agent, popen, wait_for

WALKER = ["walker-stand", "walker-walk", "walker-run"]


def cfg(**kw):
    return {"kind": "continual_dmc", "tasks": WALKER, "steps_per_task": 1500, "action_repeat": 1, **kw}


def test_tasks_switch_at_the_first_episode_end_after_each_period_and_cycle():
    env = make_env(cfg(steps_per_task=1500))
    env.reset(seed=0)
    env.action_space.seed(0)
    ends = []
    for t in range(1, 7001):
        # The task of step t is the one in force when its episode began: it never changes inside an episode.
        assert env.task == WALKER[(((t - 1) // 1000) * 1000 // 1500) % 3]
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            ends.append((t, env.task, episode_metrics(env)["env/task"]))
            env.reset()
    # Episodes end every 1000 steps; the period k*1500 begins at the first end at or after it.
    assert [(t, task) for t, task, _ in ends] == [(1000, "walker-stand"), (2000, "walker-walk"), (3000, "walker-run"),
                                                  (4000, "walker-run"), (5000, "walker-stand"), (6000, "walker-walk"),
                                                  (7000, "walker-walk")]
    assert [i for _, _, i in ends] == [0.0, 1.0, 2.0, 2.0, 0.0, 1.0, 1.0]


def test_spaces_and_bad_configs():
    env = make_env(cfg())
    assert env.observation_space.shape == (24,) and env.action_space.shape == (6,)
    with pytest.raises(ConfigError, match="env.tasks must share observation and action spaces"):
        make_env(cfg(tasks=["walker-walk", "cheetah-run"]))
    with pytest.raises(UnknownEnvError, match="walker-run"):
        make_env(cfg(tasks=["walker-walk", "walker-rnu"]))
    with pytest.raises(ConfigError, match="env.tasks must be a non-empty list"):
        make_env(cfg(tasks=[]))
    with pytest.raises(ConfigError, match="env.steps_per_task must be an integer >= 1"):
        make_env(cfg(steps_per_task=0))


def _rollout(env, actions):
    out = []
    for a in actions:
        obs, reward, terminated, truncated, _ = env.step(a)
        out.append((obs.copy(), reward, env.task))
        if terminated or truncated:
            out.append((env.reset()[0].copy(), None, env.task))
    return out


@pytest.mark.filterwarnings("ignore:env.steps_per_task")
def test_state_round_trip_continues_the_same_tasks_bit_for_bit():
    env = make_env(cfg(steps_per_task=700))
    env.reset(seed=3)
    rng = np.random.default_rng(0)
    _rollout(env, rng.uniform(-1, 1, (2300, 6)))  # mid-episode, in the third task (period 2)
    state = capture_env(env)
    assert state["exact"] and state["continual"]["period"] == 2
    fresh = make_env(cfg(steps_per_task=700))
    assert restore_env(fresh, state)
    actions = rng.uniform(-1, 1, (2500, 6))
    a, b = _rollout(env, actions), _rollout(fresh, actions)
    assert [t for *_, t in a] == [t for *_, t in b] and {t for *_, t in a} == {"walker-run", "walker-walk"}
    for (oa, ra, _), (ob, rb, _) in zip(a, b):
        assert np.array_equal(oa, ob) and ra == rb
    with pytest.raises(ConfigError, match="env.steps_per_task of the saved state is 700"):
        restore_env(make_env(cfg(steps_per_task=800)), state)


def test_the_evaluation_env_follows_the_training_task():
    train_env, eval_env = make_env(cfg(steps_per_task=1000)), make_env(cfg(steps_per_task=1000))
    train_env.reset(seed=0)
    _rollout(train_env, np.zeros((2000, 6)))
    follow_training(eval_env, train_env)
    assert train_env.task == eval_env.task == "walker-run"
    eval_env.reset(seed=1)
    _rollout(eval_env, np.zeros((3000, 6)))  # a held task does not move on
    assert eval_env.task == "walker-run"


def test_a_period_shorter_than_an_episode_is_warned_about():
    with pytest.warns(UserWarning, match="env.steps_per_task=500 is shorter than an episode"):
        make_env(cfg(steps_per_task=500))


SAC = ["env=continual-dmc", "env.steps_per_task=500", "env.action_repeat=4", "agent.prefill_steps=100",
       "agent.replay_ratio=1", "agent.batch_size=32", "agent.hidden_sizes=[32,32]", "eval.every=250",
       "eval.episodes=1", "log.every=125", "checkpoint.every=500"]


def test_sac_on_continual_dmc_logs_the_task_and_resumes_exactly(tmp_path):
    ref = tmp_path / "ref"
    result = train(*SAC, "total_steps=1250", f"run_dir={ref}")
    assert result.returncode == 0, result.stderr
    acc = read_events(ref)
    tasks = [(e.step, e.value) for e in acc.Scalars("env/task")]
    # 250 agent steps per episode (action repeat 4): tasks 0, 1, 2 begin at the ends at 500 and 1000.
    assert tasks == [(250, 0.0), (500, 1.0), (750, 1.0), (1000, 2.0), (1250, 2.0)]
    evals = acc.Scalars("eval/return_mean")
    assert len(evals) == 5
    # evaluate runs the checkpoint on the task training was on, reproducing training's evaluation.
    last = sorted((ref / "checkpoints").glob("step_*.pt"))[-1]
    ran = subprocess.run([sys.executable, "-m", "rl_plasticity.evaluate", f"checkpoint={last}", "episodes=1"],
                         capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr
    summary = json.loads(last.with_name(last.name[:-3] + ".eval.json").read_text())
    assert summary["task"] == "walker-run" and summary["return_mean"] == pytest.approx(evals[-1].value, rel=1e-5)
    killed = tmp_path / "killed"
    proc = popen([*SAC, "total_steps=1250"], killed)
    wait_for(lambda: (killed / "checkpoints" / "step_000000500.pt").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = train(*SAC, "total_steps=1250", f"run_dir={killed}")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_parameters(final_agent(killed), final_agent(ref))
    assert [(e.step, e.value) for e in read_events(killed).Scalars("env/task")] == tasks


def test_ppo_on_continual_dmc_runs_and_logs_the_task(tmp_path):
    result = train("agent=ppo", "env=continual-dmc", "env.tasks=[cheetah-run]", "env.steps_per_task=1000",
                   "agent.rollout_steps=256", "agent.num_minibatches=4", "agent.epochs=1", "agent.num_envs=2",
                   "agent.hidden_sizes=[32,32]", "total_steps=2048", "eval.every=1024", "eval.episodes=1",
                   "log.every=512", f"run_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert [e.value for e in read_events(tmp_path).Scalars("env/task")] == [0.0, 0.0, 0.0]


ALL_TASKS = ["env=continual-dmc", "env.tasks=[walker-stand,walker-walk]", "env.steps_per_task=500",
             "env.action_repeat=4", "agent.prefill_steps=100", "agent.replay_ratio=1", "agent.batch_size=32",
             "agent.hidden_sizes=[32,32]", "eval.every=250", "eval.episodes=1", "log.every=250",
             "checkpoint.every=750", "checkpoint.save_replay=false", "total_steps=750"]


def test_eval_all_tasks_logs_every_tasks_return_and_changes_nothing_else(tmp_path):
    plain, every = tmp_path / "plain", tmp_path / "every"
    for run_dir, extra in ((plain, []), (every, ["eval.all_tasks=true"])):
        result = train(*ALL_TASKS, *extra, f"run_dir={run_dir}")
        assert result.returncode == 0, result.stderr
    acc, ref = read_events(every), read_events(plain)
    names = ["walker-stand", "walker-walk"]
    for task in names:
        for stat in ("return_mean", "return_std"):
            assert [e.step for e in acc.Scalars(f"eval/{task}/{stat}")] == [250, 500, 750]
    assert not any(t.startswith(("eval/walker-stand", "eval/walker-walk")) for t in ref.Tags()["scalars"])
    # 250 agent steps per episode: task 0 until the episode end at step 500, then task 1.
    trained = {e.step: names[int(e.value)] for e in acc.Scalars("env/task")}
    assert trained == {250: "walker-stand", 500: "walker-walk", 750: "walker-walk"}
    # On the task being trained, the all-tasks evaluation is training's own: same episodes, same seeds.
    for e in acc.Scalars("eval/return_mean"):
        (same,) = [x.value for x in acc.Scalars(f"eval/{trained[e.step]}/return_mean") if x.step == e.step]
        assert same == e.value
    # The other task's return is measured too, and differs (another reward on the same body).
    other = {e.step: e.value for e in acc.Scalars("eval/walker-walk/return_mean")}
    assert all(other[e.step] != e.value for e in acc.Scalars("eval/return_mean") if trained[e.step] == "walker-stand")
    # The dashboard charts the tasks' returns together, and the env's task under its own title.
    from tests.test_dashboard import registered_layout

    charts = {chart.title: list(chart.multiline.tag) for c in registered_layout(every).category for chart in c.chart}
    assert charts["evaluation return on each task"] == ["^eval/walker\\-stand/return_mean$",
                                                        "^eval/walker\\-walk/return_mean$"]
    assert charts["task index (continual DMC)"] == ["^env/task$"]
    # Training and its own evaluation are exactly those of the run without it.
    for tag in ("charts/episode_return", "eval/return_mean", "env/task", "losses/critic", "value/overestimation"):
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == [(e.step, e.value) for e in ref.Scalars(tag)], tag


def test_eval_all_tasks_on_an_env_without_a_set_of_tasks_is_one_error(tmp_path):
    result = train("env=cartpole-balance", "eval.all_tasks=true", "total_steps=10", f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: eval.all_tasks=true needs an env with a fixed set of tasks "
                                     "(env=continual-dmc); env cartpole-balance has none. Use eval.all_tasks=false")
