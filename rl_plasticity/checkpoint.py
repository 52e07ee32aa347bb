"""Checkpoints: one file of tensors, numbers, strings and containers of them.

Every file loads with `torch.load(weights_only=True)`, so opening a checkpoint never runs code.
Writes go to a temporary file that is flushed, fsynced and atomically renamed, so a crash while
writing leaves the previous checkpoint intact; only the newest `keep` files are kept.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

_NAME = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or unsafe; the message names the file."""


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:09d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files of a run's checkpoint folder, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def numpy_rng_to_torch(state: tuple) -> dict[str, Any]:
    """A NumPy `RandomState.get_state()` tuple as checkpoint-safe values (tensors and numbers)."""
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def numpy_rng_from_torch(s: dict[str, Any]) -> tuple:
    """The `RandomState.set_state()` tuple of `numpy_rng_to_torch`'s result."""
    return s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]


def own_storage(obj: Any) -> Any:
    """`obj` with every tensor that views part of a larger storage replaced by a tensor whose
    storage is exactly its own bytes.

    `torch.save` writes a tensor's whole storage: the filled rows of a replay buffer would carry
    the buffer's full capacity into the file, and a seed's parameter that aliases a slice of the
    stacked parameters of N seeds (agents/seeds.py) all N seeds' values.  A contiguous view gets a
    storage that is the byte range it covers of the same memory (no copy: the state must be saved
    before the viewed tensor changes again, as `save_checkpoint` does); other views are copied.
    Tensors that own their storage are returned as they are.
    """
    if isinstance(obj, torch.Tensor):
        size = obj.numel() * obj.element_size()
        storage = obj.untyped_storage()
        if storage.nbytes() <= size:
            return obj
        if not obj.is_contiguous():
            return obj.clone()
        start = obj.storage_offset() * obj.element_size()
        return torch.empty(0, dtype=obj.dtype, device=obj.device).set_(storage[start:start + size], 0, obj.shape)
    if isinstance(obj, dict):
        return type(obj)((k, own_storage(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(own_storage(v) for v in obj)
    if isinstance(obj, tuple):  # a named tuple
        return type(obj)(*(own_storage(v) for v in obj))
    return obj


def save_checkpoint(state: dict[str, Any], directory: str | Path, step: int, keep: int = 3) -> Path:
    """Write `state` as `<directory>/step_<step>.pt` atomically, then prune to the newest `keep`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(d, step)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as e:  # a full disk, a quota, a vanished file system: the previous files stay
        Path(tmp).unlink(missing_ok=True)
        previous = [p.name for p in list_checkpoints(d)]
        raise CheckpointError(f"cannot write checkpoint {final}: {e.strerror or e}; nothing was lost: "
                              + (f"the previous checkpoint {previous[-1]} is intact" if previous
                                 else "no earlier checkpoint exists")) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if keep > 0:
        for old in list_checkpoints(d)[:-keep]:
            old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; any failure is a CheckpointError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint file not found: {p}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on foreign pickles: the error below says it all
            state = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {p}: it holds objects that only arbitrary unpickling could "
                              f"rebuild (not a rl_plasticity checkpoint): {str(e).splitlines()[0]}") from None
    # A text file or random bytes reach the legacy unpickler, which fails with whatever the first
    # bytes happen to mean (KeyError, IndexError, ...): any failure here means "not a torch file".
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read checkpoint {p}: truncated or not a torch file "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{p} is a torch file but not a rl_plasticity checkpoint")
    return state
