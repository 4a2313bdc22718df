"""The run folder: one writer at a time, nothing lost, nothing written through a link.

- **Lock.** A run holds an exclusive POSIX record lock (``fcntl.lockf``) on ``<run>/.lock`` for its
  whole life (a ``.lock`` that is a symlink, a hard link, a FIFO or a device is refused, never written); the kernel releases it when the process dies, however it dies. Forked children (data
  loader workers) do not inherit it, unlike an ``flock``: a run killed with SIGKILL frees its folder
  at once, not when its orphaned workers notice and exit. A second run on the same folder stops with
  one line naming the holder (pid, host, start time).
- **Stale temporary files.** Atomic writes go through ``<name>.<random>.tmp`` files
  (``fastratio.checkpoint.atomic_write``); a run killed mid-write leaves one behind (hundreds of MB for
  a CIFAR-10 checkpoint). Once the lock is held, no live writer can own them, so they are removed.
- **What a resume may do.** ``--resume PATH`` of a checkpoint older than others in the folder would
  later prune or overwrite the newer ones and truncate their metrics: it is refused unless ``--force``,
  which first moves the newer checkpoints and a copy of ``metrics.jsonl`` into ``superseded-<time>/``.
  ``--resume auto`` falls back past unreadable (truncated, corrupt) checkpoints and moves those aside
  the same way. Nothing is deleted.
- Text files (``config.yaml``, plots) are written atomically: temp file, fsync, rename, which replaces
  a symlink instead of writing through it.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import time
from pathlib import Path

from . import checkpoint
from .atomic import atomic_write, open_regular
from .errors import UserError, os_error

_TEMP = re.compile(r"^(ckpt-\d{9}\.pt|best\.pt|config\.yaml|metrics\.jsonl|losses\.png|samples-\d{9}\.png)\.[a-z0-9_]{8}\.tmp$")


class RunFolder:
    """``with RunFolder(path) as folder:`` creates the folder, takes the lock and cleans stale temp files."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def __enter__(self) -> RunFolder:  # noqa: PYI034 - py3.10 has no typing.Self
        if str(self.path) in ("", "."):
            raise UserError("run.out_dir: empty; name a folder for the run (it would write into the current directory)")
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"run.out_dir: {self.path} exists and is not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise os_error(f"run.out_dir: cannot use {self.path}", err) from None
        try:
            # A .lock left by an earlier run is reused, so it is opened as hostile: a hard link to another
            # file would be truncated and overwritten below, a FIFO would hang or fail (atomic.open_regular).
            fd = open_regular(self.path / ".lock", os.O_RDWR | os.O_CREAT)
        except OSError as err:
            raise os_error(f"run.out_dir: cannot use {self.path}", err) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES, by platform
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"run.out_dir: {self.path} is in use by {holder}; wait for that run or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self._fd = fd
        self.clean_stale_temps()
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def clean_stale_temps(self) -> list[str]:
        removed = []
        for entry in self.path.iterdir():
            if _TEMP.match(entry.name) and (entry.is_symlink() or entry.is_file()):
                entry.unlink(missing_ok=True)
                removed.append(entry.name)
        return removed

    def _newer(self, step: int) -> list[Path]:
        return [p for p in checkpoint.list_checkpoints(self.path) if p.name > checkpoint.checkpoint_path(self.path, step).name]

    def check_newer(self, step: int, force: bool, source: Path) -> list[Path]:
        """The checkpoints newer than ``step``; they block a resume from ``step`` unless ``force``
        (checked before anything moves, so a resume refused later leaves the folder as it was)."""
        newer = self._newer(step)
        if newer and not force:
            raise UserError(f"--resume: {source} is at step {step}, but {self.path} holds {len(newer)} newer checkpoint(s) up to "
                            f"{newer[-1].name}; resuming would discard them. Pass --force to move them to superseded-*/")
        return newer

    def supersede_newer(self, step: int, force: bool, source: Path) -> Path | None:
        """Move the checkpoints newer than ``step`` (and a copy of metrics.jsonl) aside; returns that folder."""
        newer = self.check_newer(step, force, source)
        if not newer:
            return None
        aside = self._aside()
        for path in newer:
            os.replace(path, aside / path.name)
        metrics = self.path / "metrics.jsonl"
        if metrics.is_file() and not metrics.is_symlink():
            shutil.copy2(metrics, aside / "metrics.jsonl")
        return aside

    def set_aside_history(self) -> Path:
        """Move metrics.jsonl (an earlier run's, with no checkpoint to resume) into superseded-*/."""
        aside = self._aside()
        os.replace(self.path / "metrics.jsonl", aside / "metrics.jsonl")
        return aside

    def _aside(self) -> Path:
        aside = self.path / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
        suffix = 0
        while aside.exists():
            suffix += 1
            aside = aside.with_name(f"{aside.name.split('.')[0]}.{suffix}")
        aside.mkdir()
        return aside

    def write_text(self, name: str, text: str) -> Path:
        try:
            return atomic_write(self.path / name, lambda f: f.write(text.encode()))
        except OSError as err:
            raise os_error(f"run.out_dir: cannot write {self.path / name}", err) from None
