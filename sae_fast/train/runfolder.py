"""The run folder: one run at a time in it (a lock), and what ``--resume`` may continue.

The lock is ``<out>/.lock``, held with ``flock`` for the whole run and holding the holder's pid. The
kernel drops it when the process dies however it dies (kill -9 included), so a stale lock is simply
taken over; a live holder makes the second run fail at once, naming its pid.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .config import TrainConfig

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not locked
    fcntl = None

LOCK_FILE = ".lock"

# Config fields that do not change the trajectory: a run may resume with different values for these.
# fused_step: the fused and unfused steps share the Adam state and the math (tests/test_train.py resumes across).
FREE_ON_RESUME = {"resume", "progress", "plot", "checkpoint_every", "keep_checkpoints", "log_every", "cache_dir",
                  "device", "out", "export", "fused_step", "distributed", "dist_timeout"}  # checkpoints move between world sizes
_PATH_FIELDS = ("model", "corpus")


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """``with RunLock(out):`` holds the run folder for this process (RunFolderBusy when another has it)."""

    def __init__(self, folder, log=print):
        self.folder, self.log, self.fd = Path(folder), log, None

    def __enter__(self) -> RunLock:
        if fcntl is None:
            return self
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderBusy(f"--out {self.folder} is in use by another sae-fast run (pid {holder}); wait for "
                                "it to finish, stop it, or pass another --out") from None
        previous = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if previous and previous != str(os.getpid()):
            self.log(f"taking over the lock of {self.folder} from pid {previous}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty lock file: nobody to name
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def _same_path(a, b) -> bool:
    if a == b:
        return True
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def trajectory_changes(saved: dict, now: dict) -> list[str]:
    """'name: old -> new' for every setting that would change the trajectory of a resumed run."""
    changes = []
    for key in sorted(now):
        if key in FREE_ON_RESUME:
            continue
        old, new = saved.get(key, _FIELD_DEFAULTS.get(key)), now[key]  # a setting newer than the checkpoint: its default
        if key in _PATH_FIELDS and _same_path(old, new):
            continue
        if old != new:
            changes.append(f"{key}: {old!r} -> {new!r}")
    return changes
