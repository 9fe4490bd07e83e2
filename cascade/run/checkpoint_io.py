"""AtomicCheckpointIO: Lightning's checkpoints written so that no partial file is ever left where a run could read it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cascade.data.atomic import writing

TMP_MARK = ".tmp-"  # in the names of checkpoints being written: `.<name>.tmp-<pid>`


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into a temporary file beside the checkpoint, fsync, then rename it into place.

    Lightning's own writer serialises the whole checkpoint into memory, writes it into a temporary file of the
    system's temporary directory and moves it over; across file systems the move is a copy, so a full disk (or a
    kill) during it leaves a partial `.ckpt` that a later run could resume from. Here the file is renamed within its
    directory only once it is whole and on disk; a failed write removes its temporary file; a kill leaves only a
    `.<name>.tmp-<pid>` file, which `remove_partial_checkpoints` deletes before the next run resumes.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
        try:
            with writing(path), open(tmp, "wb") as f:
                self.write(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself
        finally:
            os.close(fd)

    def write(self, checkpoint: dict[str, Any], file) -> None:
        """Serialise `checkpoint` into the open `file`."""
        torch.save(checkpoint, file)


def remove_partial_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of checkpoint writes that a killed run left (only one run holds a run directory)."""
    partial = [p for p in Path(checkpoint_dir).glob(f".*{TMP_MARK}*") if p.is_file()]
    for p in partial:
        p.unlink(missing_ok=True)
    return partial
