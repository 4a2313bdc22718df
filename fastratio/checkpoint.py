"""Checkpoints: state_dicts, resolved config, step, RNG and optimizer state; written atomically.

A checkpoint is a plain dict of tensors and Python scalars, loadable with
``torch.load(path, weights_only=True)``: no pickled code. Files are written to a temporary name in
the same folder, fsynced and renamed, so a crash leaves either the old or the new file, never half;
loading checks every zip member's CRC first, so a flipped bit counts as a corrupt file.
"""

from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write, write_errors_as_os_errors
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


def _torch_save(state: dict[str, Any], f) -> None:
    # torch's zip writer reports a full disk as RuntimeError ("unexpected pos"): made an OSError, so
    # atomic_write removes the temp file and the caller's os_error line reports it.
    with write_errors_as_os_errors(f.fileno()):
        torch.save(state, f)


def save(state: dict[str, Any], path: Path, keep: int | None = None) -> Path:
    """Write ``state`` atomically to ``path``; of the checkpoints *older* than it, keep the newest
    ``keep - 1`` (the file just written always stays, and newer ones are never touched)."""
    path = Path(path)
    atomic_write(path, lambda f: _torch_save(state, f))
    if keep is not None:
        older = [p for p in list_checkpoints(path.parent) if p.name < path.name]
        for old in older[: max(len(older) - (keep - 1), 0)]:
            old.unlink(missing_ok=True)
    return path


MAX_COUNT = 2**63 - 1  # steps, images and positions are int64 where they meet torch


def state_count(value: Any, what: str, source: str) -> int:
    """A step, image count or data position read from a checkpoint, as the int it must be: a bool, float
    (a fractional position would be truncated silently), string or negative value is one line."""
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise UserError(f"{source}: {what} {value!r:.40} is not a non-negative integer")
    return value


class CorruptCheckpoint(Exception):
    """A checkpoint whose bytes fail their CRC (torch's own zip reader does not check them)."""


def verify(path: Path) -> None:
    """Check every member's CRC-32 of a checkpoint (torch.save writes a zip with CRCs): a flipped bit
    is found here instead of loading silently."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CorruptCheckpoint(f"not a readable checkpoint archive ({type(err).__name__}: {err})") from None
    if bad is not None:
        raise CorruptCheckpoint(f"CRC mismatch in {bad}")


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's dict, CRC-verified and read as data (weights_only)."""
    verify(path)
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"holds a {type(state).__name__}, not a checkpoint dict")
    return state


def load_or_fail(path: Path, culprit: str) -> dict[str, Any]:
    """``load`` for a file a user named: a corrupt or foreign file is one UserError line naming ``culprit``."""
    try:
        return load(path)
    except Exception as err:  # noqa: BLE001 - corrupt or foreign file
        raise UserError(f"{culprit}: cannot read checkpoint {path} ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})") from None


def load_latest(run_dir: Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """Newest checkpoint that loads; unreadable (truncated, corrupt) ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load(path, map_location)
        except Exception as err:  # noqa: BLE001 - any failure to read means "use the previous one"
            warnings.warn(f"{path}: unreadable checkpoint skipped ({type(err).__name__}: {err})", stacklevel=2)
    return None
