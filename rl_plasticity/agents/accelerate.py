"""`compile=true` and `cudagraphs=true`: torch.compile around an update function, with a fallback.

Either option only changes how an update runs, never what it computes, so a run may switch them
on or off when it resumes.  Where an option cannot work (CUDA graphs without a CUDA device,
torch.compile unavailable or failing on the first call) the run warns once and continues with
the plain function, so a flag never costs a run.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch


class Accelerated:
    """Calls the compiled function; on its first failure warns and falls back to the original.

    The wrapped functions are pure with respect to the failure: they only write outputs and
    `.grad` buffers that the fallback call overwrites again, so falling back mid-call is safe.
    """

    def __init__(self, fn: Callable[..., Any], compiled: Callable[..., Any], what: str):
        self.fn, self.compiled, self.what = fn, compiled, what
        self.active = True

    def __call__(self, *args: Any) -> Any:
        if self.active:
            try:
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler error means: run uncompiled
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                warnings.warn(f"{self.what} failed ({type(e).__name__}: {first}); continuing without it", stacklevel=2)
                self.active = False
        return self.fn(*args)


def accelerate(fn: Callable[..., Any], device: torch.device, compile: bool, cudagraphs: bool,
               what: str = "the update") -> Callable[..., Any]:
    """`fn`, compiled as asked: `compile` → torch.compile (inductor); `cudagraphs` → torch.compile
    with mode="reduce-overhead", which replays the compiled update as a CUDA graph (CUDA only;
    elsewhere a warning, then `compile` alone decides)."""
    if cudagraphs and device.type != "cuda":
        warnings.warn(f"cudagraphs=true needs a CUDA device, this run is on {device}: running "
                      f"{'compiled without CUDA graphs' if compile else 'without CUDA graphs'}", stacklevel=2)
        cudagraphs = False
    if not (compile or cudagraphs):
        return fn
    mode = "reduce-overhead" if cudagraphs else None
    label = f"torch.compile(mode={mode!r}) of {what}"
    try:
        compiled = torch.compile(fn, mode=mode, dynamic=False)
    except Exception as e:  # noqa: BLE001 - e.g. a Python version torch.compile does not support
        warnings.warn(f"{label} is unavailable ({type(e).__name__}: {e}); running uncompiled", stacklevel=2)
        return fn
    return Accelerated(fn, compiled, label)
