"""Writes that a reader sees whole or not at all: a file or directory is written under a temporary name beside its
place and renamed into it; what a killed process left under such a name is removed by the next run."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """Where a write of `path` happens before it is renamed into place: `.NAME.tmp-PID` beside it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def replace_directory(tmp: Path, path: Path) -> None:
    """Rename the finished directory `tmp` to `path`, replacing what was there: a reader sees the old or the new."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    fsync_dir(path.parent)


def write_directory(path: str | os.PathLike, write) -> None:
    """`write(folder)` into a temporary folder beside `path`, then put it in place (`replace_directory`): a kill in
    between leaves `path` as it was and a leftover that `remove_leftovers` removes."""
    path = Path(path)
    tmp = temporary_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    replace_directory(tmp, path)


def first_link(path: str | os.PathLike) -> Path | None:
    """The first symbolic link at or below `path` (not followed), or None: what a run is about to write, truncate or
    delete under must not lead somewhere it did not choose."""
    path = Path(path)
    if path.is_symlink():
        return path
    for root, dirs, files in os.walk(path):  # does not descend into linked directories, lists them in `dirs`
        for name in (*dirs, *files):
            if (Path(root) / name).is_symlink():
                return Path(root) / name
    return None


def refuse_links(path: str | os.PathLike, hint: str) -> None:
    """ValueError naming the first symbolic link at or below `path`, with `hint` (how to get out of it)."""
    if (link := first_link(path)) is not None:
        raise ValueError(f"{link} is a symbolic link: the run writes and deletes under {path}; {hint}")


LEFTOVER = re.compile(r"^\..+\.(tmp|old)-(\d+)$")


def remove_leftovers(directory: str | os.PathLike) -> list[Path]:
    """Remove what interrupted writes left in `directory` (`.NAME.tmp-PID`, `.NAME.old-PID` of processes no longer
    alive) and return it."""
    removed = []
    for path in Path(directory).glob(".*") if Path(directory).is_dir() else ():
        match = LEFTOVER.match(path.name)
        if match is None or _alive(int(match.group(2))):
            continue
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write `obj` as JSON to `path` through a temporary file, fsync and rename: readers see all of it or nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the disk that `path` is (or would be) on: that of its nearest existing parent."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free
