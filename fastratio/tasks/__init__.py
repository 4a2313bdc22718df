"""Tasks: what the training loop needs from one data/model family (data, latents, networks, evaluation).

The loop in ``fastratio.train`` only talks to this interface, so adding a family (images) means
adding a module here, not changing the loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ..config import Config
from ..step import Networks


class Task(Protocol):
    def build_networks(self) -> Networks:
        """Fresh networks for the configured method (unused roles None)."""

    def sample_real(self, n: int, rng: torch.Generator) -> torch.Tensor:
        """n training samples [n, ...] on the task's device."""

    def sample_latent(self, n: int, rng: torch.Generator) -> torch.Tensor:
        """n generator inputs [n, ...] on the task's device."""

    def evaluate(self, generator: torch.nn.Module) -> dict[str, float]:
        """Sample-quality metrics of a generator (deterministic: fixed evaluation seed)."""

    def plot(self, generator: torch.nn.Module, path: Path) -> None:
        """Write a picture of the generator's samples next to the data."""


def build_task(cfg: Config, device: torch.device) -> Task:
    if cfg.data.kind == "toy2d":
        from .toy2d import Toy2DTask

        return Toy2DTask(cfg, device)
    raise ValueError(f"data.kind: unknown task {cfg.data.kind!r}")
