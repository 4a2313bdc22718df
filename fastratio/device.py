"""The torch device a ``--device`` / ``run.device`` name means (shared by training and the CLIs)."""

from __future__ import annotations

import torch

from .errors import UserError


def resolve_device(name: str, what: str = "run.device") -> torch.device:
    """``auto``: CUDA when available, else the CPU; ``cuda`` without a CUDA device is one line naming ``what``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{what}: 'cuda' requested but no CUDA device is available")
    return torch.device(name)
