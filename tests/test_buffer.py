import numpy as np
import torch

from rl_plasticity.buffers import ReplayBuffer


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


def test_state_dict_round_trip():
    a = ReplayBuffer(3, 2, 20, seed=1)
    fill(a, 0, 25)
    b = ReplayBuffer(3, 2, 20, seed=99)
    b.load_state_dict(a.state_dict())
    assert (b.pos, b.size) == (a.pos, a.size)
    assert torch.equal(a.sample(2, 5).obs, b.sample(2, 5).obs)


def test_memory_per_transition():
    buf = ReplayBuffer(17, 6, capacity=1000)  # cheetah-run
    assert buf.nbytes == 1000 * (2 * 17 + 6 + 1 + 1) * 4
