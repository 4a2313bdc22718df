"""Checkpoints: state_dicts, resolved config, step, RNG and optimizer state; written atomically.

A checkpoint is a plain dict of tensors and Python scalars, loadable with
``torch.load(path, weights_only=True)``: no pickled code. Files are written to a temporary name in
the same folder, fsynced and renamed, so a crash leaves either the old or the new file, never half.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"ckpt-{step:09d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run folder, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if _NAME.match(p.name))


def save(state: dict[str, Any], path: Path, keep: int | None = None) -> Path:
    """Write ``state`` atomically to ``path``; keep only the newest ``keep`` checkpoints beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
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
    if keep is not None:
        for old in list_checkpoints(path.parent)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)


def load_or_fail(path: Path, culprit: str) -> dict[str, Any]:
    """``load`` for a file a user named: a corrupt or foreign file is one UserError line naming ``culprit``."""
    try:
        return load(path)
    except Exception as err:  # noqa: BLE001 - corrupt or foreign file
        raise UserError(f"{culprit}: cannot read checkpoint {path} ({type(err).__name__})") from None


def load_latest(run_dir: Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """Newest checkpoint that loads; unreadable (truncated, corrupt) ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load(path, map_location)
        except Exception as err:  # noqa: BLE001 - any failure to read means "use the previous one"
            warnings.warn(f"{path}: unreadable checkpoint skipped ({type(err).__name__}: {err})", stacklevel=2)
    return None
