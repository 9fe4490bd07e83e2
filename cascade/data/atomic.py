"""Writes that a reader sees whole or not at all: a file or directory is written under a temporary name beside its
place and renamed into it; what a killed process left under such a name is removed by the next run."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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
    with writing(path):
        write(tmp)
    replace_directory(tmp, path)


DISK_FULL_BYTES = 16 << 20  # less room than this, after a failed write, is a full disk


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Make a disk error raised while `path` is written name it: an OSError without a file name gets `path`, and the
    error of a library that hides the OSError (`torch.save`'s RuntimeError, safetensors' SafetensorError) becomes
    OSError(ENOSPC, ..., path) where the disk has less than `DISK_FULL_BYTES` left."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except Exception as e:
        if free_bytes(path) < DISK_FULL_BYTES:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise


def link_out_of(path: str | os.PathLike) -> Path | None:
    """The first symbolic link at or below `path` (not followed) that leads out of it, or None. Links within `path`
    (Lightning's `last.ckpt`, for one) keep what is written through them inside it."""
    path = Path(path)
    if path.is_symlink():
        return path
    inside = path.resolve()
    for root, dirs, files in os.walk(path):  # does not descend into linked directories, lists them in `dirs`
        for name in (*dirs, *files):
            link = Path(root) / name
            if link.is_symlink() and not link.resolve().is_relative_to(inside):
                return link
    return None


def refuse_links(path: str | os.PathLike, hint: str) -> None:
    """ValueError naming the first symbolic link at or below `path` that leads out of it, with `hint` (the way out)."""
    if (link := link_out_of(path)) is not None:
        raise ValueError(f"{link} is a symbolic link out of {path}, where the run writes and deletes; {hint}")


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
    with writing(path), open(tmp, "w") as f:
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
