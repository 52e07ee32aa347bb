"""The run directory: its default name, what may be trained into, who writes it, how to resume it.

- `default_name`: the name a run gets when `run_dir` is not given, made only of characters that
  a shell and Hydra's override grammar both take as they are (no `=`, `,`, quotes or brackets).
- `check_trainable`: a non-empty directory that holds no run of this package is refused, so that
  run files never mix into a user's own directory.
- `RunLock`: one writer per run directory.  An exclusive `flock` on `<run_dir>/.rl_plasticity.lock`,
  held for the life of the process; the file names the holder (pid, host, start time, command).
  The kernel releases the lock when its process dies, however it dies, so the lock of a crashed
  or killed run never blocks its resumption (also on NFS, where Linux maps `flock` to POSIX
  locks).
- `shell_command`: a command line that runs verbatim when pasted into a POSIX shell (the printed
  `Resume with:` line and the hints of error messages).
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import socket
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from rl_plasticity.config import ConfigError

LOCK_NAME = ".rl_plasticity.lock"
EVENT_PREFIX = "events.out.tfevents."  # the name of every TensorBoard event file starts so


def has_event_files(path: Path) -> bool:
    """Whether `path` directly holds TensorBoard event files."""
    return any(path.glob(EVENT_PREFIX + "*"))


def shown_path(path: Path, base: Optional[Path] = None) -> str:
    """`path` as a committed report names it: relative to `base` (default: the working directory)
    where it lies below it, so the report carries no machine's absolute paths; as given otherwise."""
    try:
        return str(path.relative_to((base or Path.cwd()).resolve()))
    except ValueError:
        return str(path)


# What this package writes into a run directory: a directory holding any of these is a run.
_RUN_MARKERS = (".hydra", "checkpoints", "train.log", LOCK_NAME, "diverged.json")


def default_name(root: str, stamp: str, overrides: str, max_len: int = 120) -> str:
    """`<root>/<stamp>_<overrides>` with the overrides spelled for typing: `agent=sac,env=cheetah-run`
    becomes `agent-sac_env-cheetah-run` (`=` to `-`, `,` and `/` to `_`, other characters outside
    letters, digits, `.`, `_`, `-` dropped; cut at `max_len` characters)."""
    if not overrides:
        return f"{root}/{stamp}"
    name = overrides.replace("=", "-").replace(",", "_").replace("/", "_")
    name = re.sub(r"[^A-Za-z0-9._-]", "", name)[:max_len].strip("._-")
    return f"{root}/{stamp}_{name}" if name else f"{root}/{stamp}"


def is_run(path: Path) -> bool:
    """Whether `path` holds a run of this package (or the seed directories of one)."""
    if any((path / m).exists() for m in _RUN_MARKERS) or has_event_files(path):
        return True
    return any(is_run(d) for d in path.glob("seed_*") if d.is_dir())


def check_trainable(path: Path) -> None:
    """Refuse (ConfigError) a `run_dir` that is a file, or a non-empty directory holding no run."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run_dir {path} is a file, not a directory: choose a new or empty directory")
    if not path.is_dir() or is_run(path):
        return
    entries = sorted(p.name for p in path.iterdir())
    if entries:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise ConfigError(f"run_dir {path} is not empty ({shown}) and holds no rl_plasticity run: "
                          f"choose a new or empty directory; nothing was written")


class RunLock:
    """Exclusive, non-blocking lock of a run directory for the life of this process (see module doc).

    `acquire` raises ConfigError naming the holder when another live process holds it.  Taking a
    lock this process already holds is a no-op, so the entry point and `train` may both ask."""

    _held: dict[str, int] = {}  # resolved directory -> open file descriptor, per process

    @classmethod
    def acquire(cls, directory: Path) -> None:
        import fcntl

        key = str(directory.resolve())
        if key in cls._held:
            return
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f"run_dir {directory} is being written by another process ({cls.holder(path)}); "
                              f"a run directory has one writer: wait for that run to end (or stop it) and "
                              f"run this command again, or choose another run_dir") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds"),
                  "command": shell_command(sys.argv[1:])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        cls._held[key] = fd

    @classmethod
    def release(cls, directory: Path) -> None:
        fd = cls._held.pop(str(directory.resolve()), None)
        if fd is not None:
            os.close(fd)  # closing the only descriptor releases the flock

    @staticmethod
    def holder(path: Path) -> str:
        try:
            record = json.loads(path.read_text())
            return f"pid {record['pid']} on {record['host']}, started {record['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"lock file {path}"


def hydra_value(value: str) -> str:
    """`value` as a Hydra override value that parses back to itself: as it is where Hydra reads
    it so, else in single or double quotes (checked with Hydra's own override parser)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    tail = re.search(r"\\*$", value).group(0)  # backslashes before the closing quote are doubled
    candidates = [value] + [q + re.sub(r"(\\*)" + q, lambda m: m.group(1) * 2 + "\\" + q, value[:len(value) - len(tail)])
                            + tail * 2 + q for q in ('"', "'")]
    for candidate in candidates:
        try:
            if parser.parse_overrides([f"k={candidate}"])[0].value() == value:
                return candidate
        except HydraException:
            pass
    raise ConfigError(f"the path {value!r} cannot be written as a Hydra override value: choose another run_dir")


def shell_command(args: Sequence[str], program: str = "python -m rl_plasticity.train",
                  run_dir: Optional[str] = None) -> str:
    """`program args...` quoted for a POSIX shell; with `run_dir`, any `run_dir=` argument is
    replaced by `run_dir=<run_dir>` quoted for Hydra, so the line runs as printed."""
    args = list(args)
    if run_dir is not None:
        args = [a for a in args if not a.startswith("run_dir=")] + [f"run_dir={hydra_value(str(run_dir))}"]
    return " ".join([program] + [shlex.quote(a) for a in args])


def run_dir_override(run_dir: Any) -> str:
    """`run_dir=<path>` as one shell word that Hydra parses back to `path` (for hints in messages)."""
    return shlex.quote(f"run_dir={hydra_value(str(run_dir))}")
