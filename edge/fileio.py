"""Small durable-file helpers shared by the agent and the controller."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import IO

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


def open_log(path: Path) -> IO[bytes]:
    """Open a line log for `append_line`: appending, readable, unbuffered (a buffered writer
    would keep what a failed write left over and write it before the next line)."""
    return path.open("a+b", buffering=0)


def append_line(handle: IO[bytes], line: bytes) -> int:
    """Append `line` (ending in a newline) to a log opened by `open_log`, fsync it, and return
    the offset where it starts. Raises OSError.

    All or nothing: when the disk fills (or fails) part way, what was written is cut off
    again, so the log ends with its last whole line. Should even that fail, the next line
    starts on a line of its own: the cut one is then a bad line that readers skip.
    """
    fd = handle.fileno()
    size = os.fstat(fd).st_size
    start = size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        line = b"\n" + line
        start += 1
    view = memoryview(line)
    try:
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])
        os.fsync(fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
            os.fsync(fd)
        raise
    return start
