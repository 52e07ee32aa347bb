import io

import numpy as np
import pytest
import torch

from rl_plasticity.buffers import Batch, ReplayBuffer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class ReferenceBuffer:
    """The previous layout (obs and next_obs stored per transition), kept as the reference."""

    def __init__(self, obs_dim, action_dim, capacity, device="cpu", seed=0):
        self.capacity, self.device = capacity, torch.device(device)
        kw = dict(dtype=torch.float32, device=self.device)
        self.obs = torch.zeros((capacity, obs_dim), **kw)
        self.next_obs = torch.zeros((capacity, obs_dim), **kw)
        self.action = torch.zeros((capacity, action_dim), **kw)
        self.reward = torch.zeros((capacity,), **kw)
        self.terminated = torch.zeros((capacity,), **kw)
        self.pos = self.size = 0
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))

    def add(self, obs, action, reward, next_obs, terminated):
        i = self.pos
        self.obs[i] = torch.as_tensor(obs, dtype=torch.float32)
        self.next_obs[i] = torch.as_tensor(next_obs, dtype=torch.float32)
        self.action[i] = torch.as_tensor(action, dtype=torch.float32)
        self.reward[i] = float(reward)
        self.terminated[i] = float(bool(terminated))
        self.pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def _gather(self, idx):
        return Batch(self.obs[idx], self.action[idx], self.reward[idx], self.next_obs[idx], self.terminated[idx])

    def sample(self, num_batches, batch_size):
        idx = torch.randint(0, self.size, (num_batches, batch_size), device=self.device, generator=self.generator)
        return self._gather(idx)

    def probe(self, batch_size, seed):
        g = torch.Generator(device=self.device).manual_seed(int(seed) + 7919)
        return self._gather(torch.randint(0, self.size, (batch_size,), device=self.device, generator=g))

    def state_dict(self):
        n = self.size
        return {"obs": self.obs[:n], "next_obs": self.next_obs[:n], "action": self.action[:n],
                "reward": self.reward[:n], "terminated": self.terminated[:n], "pos": self.pos, "size": self.size,
                "capacity": self.capacity, "generator": self.generator.get_state()}


def stream(n, obs_dim=3, act_dim=2, seed=0):
    """(obs, action, reward, next_obs, terminated) as the loop adds them: episodes of random length
    (many of 1 step) ending by termination or truncation, the next add() starting from the reset
    observation; float64 observations (stored as float32), some with NaN and -0.0."""
    rng = np.random.default_rng(seed)
    obs, t = rng.normal(size=obs_dim), 0
    limit = int(rng.choice([1, 1, 2, 5, 13]))
    for _ in range(n):
        action = rng.uniform(-1, 1, act_dim)
        next_obs = rng.normal(size=obs_dim)
        if rng.random() < 0.05:
            next_obs[0] = np.nan
        if rng.random() < 0.05:
            next_obs[1] = -0.0
        t += 1
        terminated = rng.random() < 0.1
        ended = terminated or t >= limit
        kind = rng.random()
        if ended and 0.1 <= kind < 0.2:
            next_obs[1] = -0.0
        yield obs, action, float(rng.normal()), next_obs, terminated
        if ended:
            if kind < 0.1:
                obs = next_obs.copy()  # reset obs bitwise equal to the final obs
            elif kind < 0.2:
                obs = next_obs.copy()
                obs[1] = 0.0  # equal to the final obs, but not bitwise
            else:
                obs = rng.normal(size=obs_dim)
            t, limit = 0, int(rng.choice([1, 1, 2, 5, 13]))
        else:
            obs = next_obs


def assert_same(a: Batch, b: Batch):
    for name, x, y in zip(Batch._fields, a, b):
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert torch.equal(x.view(torch.int32), y.view(torch.int32)), name  # bitwise (NaN, -0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("capacity", [1, 2, 7, 64, 500])
def test_batches_bitwise_equal_to_reference(capacity, device):
    new, ref = ReplayBuffer(3, 2, capacity, device, seed=5), ReferenceBuffer(3, 2, capacity, device, seed=5)
    for step, transition in enumerate(stream(1500, seed=capacity)):
        new.add(*transition)
        ref.add(*transition)
        assert (len(new), new.pos, new.size) == (ref.size, ref.pos, ref.size)
        if step % 3 == 0:
            assert_same(new.sample(4, 16), ref.sample(4, 16))
        if step % 97 == 0:
            assert_same(new.probe(32, step), ref.probe(32, step))
    assert torch.equal(new.generator.get_state(), ref.generator.get_state())
    if capacity >= 64:  # most transitions continue into the next one: no final row of their own
        assert new._final_count < 0.6 * new.size


def test_final_rows_stay_bounded():
    one_step = ReplayBuffer(3, 2, 50)  # every transition ends its episode: one final row each
    for i in range(500):
        one_step.add(np.full(3, i), np.zeros(2), 0.0, np.full(3, i + 0.5), True)
    assert one_step._final_obs.shape[0] <= 50 and one_step._final_count == 50
    long = ReplayBuffer(3, 2, 1000)  # 100-step episodes: about one final row per stored episode
    for transition in stream_of_episodes(5050, 100):  # stored: 10 episode ends + the newest (pending)
        long.add(*transition)
    assert long._final_count == 11 and long._final_obs.shape[0] == 64
    assert long.nbytes == 1000 * ((3 + 2 + 1 + 1) * 4 + 4) + 64 * 3 * 4


def stream_of_episodes(n, length, obs_dim=3):
    obs = np.zeros(obs_dim, dtype=np.float32)
    for i in range(n):
        next_obs = np.full(obs_dim, i + 1, dtype=np.float32)
        yield obs, np.zeros(2), 1.0, next_obs, False
        obs = -next_obs if (i + 1) % length == 0 else next_obs  # truncation, then a reset obs


def fill(buf, start, n, obs_dim=3, act_dim=2):
    for i in range(start, start + n):
        buf.add(np.full(obs_dim, i), np.full(act_dim, i), float(i), np.full(obs_dim, i + 0.5), i % 7 == 0)


def test_shapes_and_fields_line_up():
    buf = ReplayBuffer(3, 2, capacity=100)
    fill(buf, 0, 50)
    b = buf.sample(16, 32)
    assert b.obs.shape == (16, 32, 3) and b.next_obs.shape == (16, 32, 3)
    assert b.action.shape == (16, 32, 2) and b.reward.shape == (16, 32) and b.terminated.shape == (16, 32)
    assert all(t.dtype == torch.float32 for t in b)
    i = b.reward  # each field of one sample belongs to the same transition
    assert torch.equal(b.obs[..., 0], i) and torch.equal(b.action[..., 1], i)
    assert torch.equal(b.next_obs[..., 2], i + 0.5)
    assert torch.equal(b.terminated, (i.long() % 7 == 0).float())


def test_samples_only_come_from_filled_slots():
    buf = ReplayBuffer(3, 2, capacity=1000)
    fill(buf, 1, 10)  # slot values 1..10; slot 0 of an empty buffer would read as 0
    r = buf.sample(64, 256).reward
    assert r.min() >= 1 and r.max() <= 10
    assert len(torch.unique(r)) == 10


def test_wrap_around_overwrites_oldest():
    buf = ReplayBuffer(3, 2, capacity=8)
    fill(buf, 0, 13)  # 0..12; 0..4 overwritten by 8..12
    assert len(buf) == 8 and buf.pos == 13 % 8
    stored = sorted(buf.reward.tolist())
    assert stored == [float(x) for x in range(5, 13)]
    r = buf.sample(32, 64).reward
    assert r.min() >= 5 and r.max() <= 12


def test_sampling_is_seeded():
    a, b = ReplayBuffer(3, 2, 100, seed=4), ReplayBuffer(3, 2, 100, seed=4)
    fill(a, 0, 50)
    fill(b, 0, 50)
    assert torch.equal(a.sample(4, 8).reward, b.sample(4, 8).reward)


def save_load(state):
    f = io.BytesIO()
    torch.save(state, f)
    f.seek(0)
    return torch.load(f, weights_only=True)


@pytest.mark.parametrize("capacity", [1, 7, 300])
def test_state_dict_round_trip_continues_exactly(capacity):
    a, ref = ReplayBuffer(3, 2, capacity, seed=1), ReferenceBuffer(3, 2, capacity, seed=1)
    transitions = list(stream(700, seed=3))
    for t in transitions[:400]:
        a.add(*t)
        ref.add(*t)
    state = a.state_dict()
    assert state["obs"].shape[0] == a.size and state["obs"].data_ptr() == a.obs.data_ptr()  # views, no copy
    b = ReplayBuffer(3, 2, capacity, seed=99)
    b.load_state_dict(save_load(state))
    assert (b.pos, b.size) == (a.pos, a.size)
    for t in transitions[400:]:
        for buf in (a, b, ref):
            buf.add(*t)
        batch = ref.sample(2, 9)
        assert_same(a.sample(2, 9), batch)
        assert_same(b.sample(2, 9), batch)


@pytest.mark.parametrize("capacity", [1, 7, 300])
def test_loads_a_checkpoint_of_the_previous_layout(capacity):
    ref, new = ReferenceBuffer(3, 2, capacity, seed=2), ReplayBuffer(3, 2, capacity, seed=8)
    transitions = list(stream(600, seed=4))
    for t in transitions[:350]:
        ref.add(*t)
    new.load_state_dict(save_load(ref.state_dict()))
    assert_same(new.probe(64, 0), ref.probe(64, 0))
    for t in transitions[350:]:
        new.add(*t)
        ref.add(*t)
        assert_same(new.sample(2, 9), ref.sample(2, 9))


def test_empty_round_trip_and_mismatched_checkpoints():
    a = ReplayBuffer(3, 2, 10)
    b = ReplayBuffer(3, 2, 10)
    b.load_state_dict(save_load(a.state_dict()))
    assert len(b) == 0
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(3, 2, 11).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="dims"):
        ReplayBuffer(4, 2, 10).load_state_dict(a.state_dict())


def test_memory_per_transition():
    buf = ReplayBuffer(17, 6, capacity=1000)  # cheetah-run: obs, action, reward, terminated, next index
    assert buf.nbytes == 1000 * ((17 + 6 + 1 + 1) * 4 + 4) + 64 * 17 * 4  # + the initial final-obs ring


def test_recent_returns_the_newest_transitions_in_order_across_the_wrap():
    """ReplayBuffer.recent(n): the n newest transitions, oldest first, with their next observations
    (the newest one's still pending in the final ring), after the ring has wrapped."""
    buf = ReplayBuffer(1, 1, capacity=5)
    for t in range(7):  # one episode: obs t, next obs t + 1
        buf.add(np.array([t], np.float32), np.array([0.0], np.float32), float(t), np.array([t + 1], np.float32), False)
    batch = buf.recent(3)
    assert batch.obs.flatten().tolist() == [4.0, 5.0, 6.0]
    assert batch.next_obs.flatten().tolist() == [5.0, 6.0, 7.0]
    assert batch.reward.tolist() == [4.0, 5.0, 6.0]
    with pytest.raises(ValueError):
        buf.recent(6)
