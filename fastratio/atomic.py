"""Atomic file writes: a crash leaves the old file or the new one, never half of one.

``atomic_write`` writes into ``<name>.<random>.tmp`` beside the target, fsyncs it, renames it over
the target and fsyncs the folder. The rename replaces a symlink at the target instead of writing
through it, so a run folder cannot make the trainer overwrite another file.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """``write(file)`` into a temporary file beside ``path``, fsync, then rename over ``path``: a crash
    leaves the old file or the new one, and a symlink at ``path`` is replaced, never followed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


TEMP_SUFFIX = ".tmp"  # atomic_write's temporary files: <name>.<random>.tmp


# How library writers word a failed write (disk full, over quota, I/O error) in their own exception
# types: torch.save's zip writer ("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs
# 598", "PytorchStreamWriter failed writing file data/0: file write failed", "basic_ios::clear:
# iostream error"), safetensors ("Error while serializing: IoError(Os { code: 28, ... })").
_WRITE_FAILED = re.compile(r"unexpected pos|file write failed|iostream error|IoError")
_SPACE = re.compile(r"No space left|code: 28\b|Errno 28\b|Disk quota")


@contextmanager
def write_errors_as_os_errors(fd: int | None = None) -> Iterator[None]:
    """Inside the block a library's failed write is an OSError, as a failed write through Python's own
    files is, so the one-line ``os_error`` handlers and ``atomic_write``'s clean-up see it. ``fd``, the
    file written, tells a full disk (ENOSPC) from another I/O error when the message does not."""
    try:
        yield
    except OSError:
        raise
    except Exception as err:
        text = str(err)
        if not (isinstance(err, RuntimeError) or type(err).__name__ == "SafetensorError") or not _WRITE_FAILED.search(text):
            raise
        full = bool(_SPACE.search(text)) or (fd is not None and os.fstatvfs(fd).f_bavail == 0)
        detail = os.strerror(errno.ENOSPC) if full else f"write failed ({(text.splitlines() or [''])[0][:100]})"
        raise OSError(errno.ENOSPC if full else errno.EIO, detail) from None


def open_regular(path: Path, flags: int, mode: int = 0o644) -> int:
    """A descriptor on ``path`` for writing into an existing file in place (appends, the run lock),
    refusing what would write elsewhere or hang: a symlink (O_NOFOLLOW), and after opening (O_NONBLOCK:
    a FIFO opens at once) anything but a regular file with one link: a FIFO, a device, or a hard link
    to a file outside the folder, which writing would change. Raises OSError naming the problem."""
    def refused(what: str) -> OSError:
        return OSError(errno.EPERM, f"{Path(path).name} {what}; remove it or choose another name", str(path))

    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENXIO):  # O_NOFOLLOW at a symlink; O_WRONLY at a FIFO nobody reads
            raise refused("is a symbolic link" if err.errno == errno.ELOOP else "is not a regular file (a FIFO?)") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise refused("is a hard link shared with another file" if stat.S_ISREG(info.st_mode) else "is not a regular file (a FIFO or device?)")
    os.set_blocking(fd, True)
    return fd
