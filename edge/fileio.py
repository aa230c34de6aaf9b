"""Small durable-file helpers shared by the agent and the controller."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Files being written carry this suffix (and a leading dot) until they are complete.
PART_SUFFIX = ".part"


def sha256_of(path: Path, chunk_bytes: int = 64 * 1024) -> str:
    """Hex sha256 of a file, read through one small reused buffer.

    64 KiB stays below glibc's mmap threshold: a fresh megabyte per read would be mapped and
    unmapped, raise that threshold, and leave the agent's heap larger for good.
    """
    digest = hashlib.sha256()
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new content."""
    tmp = path.with_name(f".{path.name}{PART_SUFFIX}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)
