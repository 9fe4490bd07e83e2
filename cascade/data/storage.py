"""Tensors on disk: raw little-endian arrays plus a JSON manifest, written atomically, memory-mapped on read.

A directory holds one `<name>.bin` per tensor and `manifest.json` with, per tensor, its dtype,
shape, byte count and checksum. The directory is written under a temporary name, every file is
fsynced, and only then renamed into place, so a reader never sees a half-written directory.

The checksum is the SHA-256 of the SHA-256 digests of the file's consecutive 4 MiB blocks: as
strong a check as the SHA-256 of the whole file, but its blocks are hashed on several threads,
while the file is written and again when it is verified (one thread hashes about 1 GB/s, a
quarter of what a disk writes).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cascade.data.atomic import fsync_dir, replace_directory, writing

MANIFEST = "manifest.json"
_CHUNK = 1 << 24
BLOCK_BYTES = 1 << 22  # the unit of the checksum
_FLUSH_EVERY = 1 << 26  # bytes written to a file between starts of its writeback (fdatasync on a thread)
HASH_THREADS = min(8, os.cpu_count() or 1)

# torch dtype -> (name in the manifest, numpy dtype with the same bytes)
_DTYPES = {
    torch.int64: ("int64", np.int64),
    torch.int32: ("int32", np.int32),
    torch.uint16: ("uint16", np.uint16),
    torch.float32: ("float32", np.float32),
    torch.float16: ("float16", np.float16),
    torch.bfloat16: ("bfloat16", np.int16),  # numpy has no bf16: store the raw 16 bits
    torch.bool: ("bool", np.bool_),
}
_BY_NAME = {name: (dtype, np_dtype) for dtype, (name, np_dtype) in _DTYPES.items()}
_pool: ThreadPoolExecutor | None = None


def _hash_pool() -> ThreadPoolExecutor:
    """Threads for hashing blocks (hashlib releases the GIL on large buffers), shared by all writers and readers."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="sha256")
    return _pool


def _digest(block: memoryview) -> bytes:
    return hashlib.sha256(block).digest()


class BlockDigest:
    """SHA-256 over the SHA-256 digests of consecutive `BLOCK_BYTES` blocks of a byte stream fed in pieces.

    `update(data)` hashes the whole blocks inside `data` on the shared threads and returns their
    futures: `data` must stay unchanged until they are done.
    """

    def __init__(self):
        self._blocks: list[bytes | Future] = []
        self._open = hashlib.sha256()  # the block that the next piece continues
        self._open_bytes = 0

    def update(self, data: memoryview | bytes) -> list[Future]:
        data = memoryview(data).cast("B")
        pos = 0
        if self._open_bytes:  # complete the open block
            pos = min(BLOCK_BYTES - self._open_bytes, len(data))
            self._feed_open(data[:pos])
        futures = []
        while len(data) - pos >= BLOCK_BYTES:
            futures.append(_hash_pool().submit(_digest, data[pos : pos + BLOCK_BYTES]))
            pos += BLOCK_BYTES
        self._blocks += futures
        if pos < len(data):
            self._feed_open(data[pos:])
        return futures

    def _feed_open(self, piece: memoryview) -> None:
        self._open.update(piece)
        self._open_bytes += len(piece)
        if self._open_bytes == BLOCK_BYTES:
            self._blocks.append(self._open.digest())
            self._open, self._open_bytes = hashlib.sha256(), 0

    def hexdigest(self) -> str:
        digests = [b if isinstance(b, bytes) else b.result() for b in self._blocks]
        if self._open_bytes:
            digests.append(self._open.digest())
        return hashlib.sha256(b"".join(digests)).hexdigest()


def file_checksum(path: Path, block_bytes: int = BLOCK_BYTES) -> str:
    """What `BlockDigest` gives for the bytes of file `path`, its blocks hashed in parallel from a memory map."""
    if path.stat().st_size == 0:
        return hashlib.sha256(b"").hexdigest()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m, memoryview(m) as view:
        blocks = [view[i : i + block_bytes] for i in range(0, len(view), block_bytes)]
        try:
            digests = list(_hash_pool().map(_digest, blocks))
        finally:
            for block in blocks:  # before the map closes
                block.release()
    return hashlib.sha256(b"".join(digests)).hexdigest()


def _as_numpy(t: Tensor) -> np.ndarray:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


class TensorDirWriter:
    """Write a directory of arrays chunk by chunk (bounded memory), then commit it atomically.

    `append(name, chunk)` adds rows to array `name` (all chunks share dtype and trailing shape);
    `commit(meta)` fsyncs every file, writes the manifest and renames the directory into place.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self._files: dict[str, object] = {}
        self._arrays: dict[str, dict] = {}
        self._digests: dict[str, BlockDigest] = {}
        self._unflushed: dict[str, int] = {}
        self._flusher = ThreadPoolExecutor(1, thread_name_prefix="fdatasync")
        self._flushing: Future | None = None

    def _write(self, name: str, data: memoryview | bytes) -> None:
        """Write `data` to array `name`'s file while its blocks are hashed on other threads; every
        `_FLUSH_EVERY` bytes, start writing the file back to disk, so that the fsync at commit waits less."""
        hashing = self._digests[name].update(data)
        file = self._files[name]
        with writing(self.path):
            file.write(data)
        for future in hashing:
            future.result()
        self._unflushed[name] += len(data)  # bytes: `data` is bytes or a memoryview of bytes
        if self._unflushed[name] >= _FLUSH_EVERY and (self._flushing is None or self._flushing.done()):
            file.flush()
            self._flushing = self._flusher.submit(os.fdatasync, file.fileno())
            self._unflushed[name] = 0

    def append(self, name: str, chunk: Tensor) -> None:
        assert chunk.dim() >= 1, "chunks are rows of an array"
        if chunk.dtype not in _DTYPES:
            raise TypeError(f"cannot store {name} of dtype {chunk.dtype}; supported: {sorted(n for n, _ in _DTYPES.values())}")
        if name not in self._files:
            self._files[name] = open(self.tmp / f"{name}.bin", "wb")
            self._digests[name] = BlockDigest()
            self._unflushed[name] = 0
            self._arrays[name] = {"file": f"{name}.bin", "dtype": _DTYPES[chunk.dtype][0], "shape": [0, *chunk.shape[1:]], "bytes": 0}
        entry = self._arrays[name]
        assert entry["dtype"] == _DTYPES[chunk.dtype][0] and entry["shape"][1:] == list(chunk.shape[1:]), "chunks of one array agree"
        flat = memoryview(_as_numpy(chunk).reshape(-1)).cast("B")
        self._write(name, flat)
        entry["shape"][0] += chunk.shape[0]
        entry["bytes"] += len(flat)

    def append_stored(self, name: str, directory: str | os.PathLike, entry: dict) -> None:
        """Append array `entry` (a manifest entry of `directory`) by copying its file's bytes, chunk by chunk."""
        dtype = _BY_NAME[entry["dtype"]][0]
        self.append(name, torch.empty(0, *entry["shape"][1:], dtype=dtype))  # opens the file, checks dtype and shape
        with open(Path(directory) / entry["file"], "rb") as source:
            while block := source.read(_CHUNK):
                self._write(name, block)
        self._arrays[name]["shape"][0] += entry["shape"][0]
        self._arrays[name]["bytes"] += entry["bytes"]

    def commit(self, meta: dict) -> None:
        with writing(self.path):
            self._commit(meta)

    def _commit(self, meta: dict) -> None:
        self._flusher.shutdown()  # waits for a writeback under way
        if self._flushing is not None:
            self._flushing.result()  # raises what it raised
        for name, f in self._files.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            self._arrays[name].update(block_bytes=BLOCK_BYTES, sha256_blocks=self._digests[name].hexdigest())
        with open(self.tmp / MANIFEST, "w") as f:
            json.dump({**meta, "arrays": self._arrays}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.tmp)
        replace_directory(self.tmp, self.path)


def save_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], meta: dict) -> None:
    """Write `tensors` and `meta` to directory `path` atomically, replacing what was there."""
    writer = TensorDirWriter(path)
    for name, tensor in tensors.items():
        writer.append(name, tensor)
    writer.commit(meta)


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: {path} is not a saved directory, or its save was interrupted; write it again"
        )
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}); the directory is corrupted, write it again") from e


def _checksum_matches(file: Path, entry: dict) -> bool:
    if "sha256_blocks" not in entry:
        raise ValueError(f"{file.parent} was written by a pre-release version of cascade (no block checksums); write it again")
    return file_checksum(file, entry["block_bytes"]) == entry["sha256_blocks"]


def load_tensors(path: str | os.PathLike, verify: bool = True) -> tuple[dict[str, Tensor], dict]:
    """Read what `save_tensors` wrote: memory-mapped tensors (copy-on-write) and the manifest.

    Sizes are always checked against the manifest; with `verify`, so are the checksums (one
    read of every file, its blocks hashed in parallel).
    """
    path = Path(path)
    manifest = read_manifest(path)
    tensors = {}
    for name, entry in manifest["arrays"].items():
        file = path / entry["file"]
        if not file.is_file():
            raise FileNotFoundError(f"{file} is listed in {path / MANIFEST} but missing; write {path} again")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise ValueError(
                f"{file} has {size} bytes but its manifest says {entry['bytes']}: "
                "the file is truncated or was changed; write it again"
            )
        if verify and not _checksum_matches(file, entry):
            raise ValueError(f"{file} does not match the checksum in its manifest: the file is corrupted; write it again")
        dtype, np_dtype = _BY_NAME[entry["dtype"]]
        shape = tuple(entry["shape"])
        if size == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        array = np.memmap(file, dtype=np_dtype, mode="c", shape=shape)
        tensors[name] = torch.from_numpy(array).view(dtype)
    return tensors, manifest
