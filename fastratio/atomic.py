"""Atomic file writes: a crash leaves the old file or the new one, never half of one.

``atomic_write`` writes into ``<name>.<random>.tmp`` beside the target, fsyncs it, renames it over
the target and fsyncs the folder. The rename replaces a symlink at the target instead of writing
through it, so a run folder cannot make the trainer overwrite another file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
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
