"""Stop signals (SIGTERM, SIGINT, SLURM's and submitit's preemption signal): finish the step,
checkpoint, then hand the signal on."""
from __future__ import annotations

import sys
from typing import Any, Optional


class StopRequest:
    """Stop signals set a flag the loop checks after every env step; it then checkpoints and returns.

    Handled: SIGTERM, SIGINT and SIGUSR2 (what SLURM's `--signal` and submitit send before a time
    limit and, where the cluster allows, at a preemption; SUBMITIT_PREEMPT_SIGNAL may name
    another, handled too). The same signal twice aborts at once; different ones (SLURM sends
    SIGTERM and the user signal together at a preemption) do not.

    Leaving, once the loop has written its checkpoint, each handler replaced for a received
    signal is called, if it is a Python function: in a submitit job (hydra/launcher=submitit_*)
    that is submitit's, which for the preemption signal pickles the job again and requeues it
    (`scontrol requeue` and exit on SLURM, exit status 144 to the local controller); the requeued
    job runs the same Hydra job in the same directory and `train` resumes from the checkpoint.
    Then, in a multirun or a submitit job, the process exits with status 128 + signal instead of
    returning: an in-process sweep must not start its next job after a stop, and submitit must
    not record an unfinished run as a success (a requeued job writes the real result later).
    """

    def __init__(self) -> None:
        self.signal: Optional[int] = None   # the first stop signal received
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    @staticmethod
    def signals() -> tuple[int, ...]:
        import os
        import signal

        preempt = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)
        return tuple(dict.fromkeys((signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, preempt)))

    @staticmethod
    def _in_multirun() -> bool:
        try:
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        except Exception:  # no Hydra job around (train() called directly)
            return False

    def __enter__(self) -> "StopRequest":
        import signal

        for sig in self.signals():
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if signum in self.received:
            raise KeyboardInterrupt
        self.received.append(signum)
        if self.signal is None:
            self.signal = signum
            print(f"\nsignal {signum} received: finishing the current step, then writing a checkpoint", flush=True)

    def __call__(self) -> bool:
        return self.signal is not None

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        import os
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if exc_type is not None or self.signal is None:
            return
        for sig in self.received:
            previous = self._previous.get(sig)
            if callable(previous) and previous is not signal.default_int_handler:
                print(f"checkpoint written; passing signal {sig} on to the handler it replaced "
                      f"({getattr(previous, '__qualname__', previous)})", flush=True)
                previous(sig, None)  # submitit's requeue exits here
        if os.environ.get("SUBMITIT_EXECUTOR") or self._in_multirun():
            print(f"stopped by signal {self.signal} after writing a checkpoint: this job resumes when it is requeued "
                  f"or when the same multirun command runs again with the same hydra.sweep.dir",
                  file=sys.stderr, flush=True)
            raise SystemExit(128 + self.signal)
