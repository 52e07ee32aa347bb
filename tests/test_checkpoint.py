import errno
import os
import pickle

import pytest
import torch

from rl_plasticity.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint


def state(step):
    return {"format": 1, "step": step, "w": torch.arange(4.0) + step, "config": {"seed": 0, "name": "x"}}


def test_round_trip_with_weights_only(tmp_path):
    path = save_checkpoint(state(5), tmp_path, 5)
    assert path.name == "step_000000005.pt"
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 5 and torch.equal(raw["w"], torch.arange(4.0) + 5)
    assert load_checkpoint(path)["config"] == {"seed": 0, "name": "x"}


def test_keeps_only_the_newest(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(state(step), tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000030.pt", "step_000000040.pt"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    good = save_checkpoint(state(1), tmp_path, 1)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointError, match="No space left on device.*step_000000001.pt is intact"):
        save_checkpoint(state(2), tmp_path, 2)
    assert list_checkpoints(tmp_path) == [good]
    assert load_checkpoint(good)["step"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_missing_truncated_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    good = save_checkpoint(state(1), tmp_path, 1)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(cut)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(2048))
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"just": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="not a rl_plasticity checkpoint"):
        load_checkpoint(other)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_pickle_carrying_code_is_refused_and_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    torch.save({"format": 1, "x": _Payload()}, evil, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(evil)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()
