"""Which process holds a run directory (an exclusive lock, one run at a time), and where a run directory may be."""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from cascade.data.atomic import refuse_links

LOCK = ".lock"


class RunDirectoryInUse(RuntimeError):
    """Another run holds the run directory."""


class RunDirectoryUnwritable(RuntimeError):
    """The run directory cannot be made or written: a file stands in its path, or the user may not write there."""


class RunLock:
    """One run at a time in a run directory: an exclusive `flock` on `<run_dir>/.lock`, held until the process ends.

    The file names the holder (host, pid, start time), for the message a second run gets. The kernel releases the
    lock of a process that dies, however it dies, so a killed run's lock is taken over by the next run; `previous`
    then describes the run that held it (None after a run that released it).
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a+")
        except (PermissionError, FileExistsError, NotADirectoryError, IsADirectoryError) as e:  # `check_writable` first
            raise RunDirectoryUnwritable(f"cannot write {e.filename or self.path} ({e.strerror}): give --runs_dir a "
                                         "directory you may write in, or another --name") from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise RunDirectoryInUse(
                f"{self.path.parent} is in use by another run ({holder}): wait for it to end, or give this run another --name"
            ) from None
        self._file.seek(0)
        self.previous = self._file.read().strip() or None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self._file.flush()

    def release(self) -> None:
        """Give the directory up; the file is emptied, so only a run that ended without releasing leaves its name."""
        self._file.truncate(0)
        self._file.flush()
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def check_writable(run_dir: Path) -> None:
    """RunDirectoryUnwritable, naming the path in the way and what to do, unless `run_dir` is a directory this user may
    write in or can be made as one: its nearest existing part is a directory they may write in."""
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not existing.is_dir():
        raise RunDirectoryUnwritable(f"{existing} is a file, where the run directory {run_dir} needs a directory: move "
                                     "it, or give another --runs_dir or --name")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirectoryUnwritable(f"this user may not write in {existing}, where the run directory {run_dir} is: "
                                     "give --runs_dir a directory you may write in")


def check_run_directory(runs_dir: str | os.PathLike, name: str) -> None:
    """ValueError unless `name` is a name (or relative path) under `runs_dir` and nothing in the run directory, at any
    depth, is a symbolic link (the run makes none; `runs_dir` itself may be one: the user chose it);
    RunDirectoryUnwritable unless the run directory can be written (`check_writable`)."""
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or parts in ((), (".",)):
        raise ValueError(f"--name {name!r} must name a directory under --runs_dir ({runs_dir}): no absolute path and no "
                         "'..'; give --runs_dir for another place")
    run_dir = Path(runs_dir) / name
    if not run_dir.resolve().is_relative_to(Path(runs_dir).resolve()):  # through a link between the two
        raise ValueError(f"--name {name!r} leads out of --runs_dir ({runs_dir}): {run_dir} resolves to "
                         f"{run_dir.resolve()}; remove the link, or give another --name")
    refuse_links(run_dir, "remove the link, or give another --name")
    check_writable(run_dir)


class RunHold:
    """The run directory's lock (`RunLock`), taken before the run's first write by the run's first process only (the
    other processes are its own)."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.lock = run_dir, None

    def take(self) -> None:
        if self.lock is None and rank_zero_only.rank == 0 and int(os.environ.get("NODE_RANK", 0)) == 0:
            self.lock = RunLock(self.run_dir)
            if self.lock.previous:
                rank_zero_info(f"{self.run_dir}: taking over from an earlier run that ended ({self.lock.previous})")

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
