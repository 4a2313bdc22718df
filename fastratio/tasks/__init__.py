"""Tasks: what the training loop needs from one data/model family (data, latents, networks, evaluation).

The loop in ``fastratio.train`` only talks to this interface, so adding a family (images, text-to-image) means
adding a module here, not changing the loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ..config import Config
from ..data.formats import DATASET_KINDS
from ..shard import SINGLE, Shard
from ..step import Networks


class Task(Protocol):
    def build_networks(self) -> Networks:
        """Fresh networks for the configured method (unused roles None)."""

    def sample_real(self, n: int, rng: torch.Generator, shard: Shard = SINGLE) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The shard's rows of a global batch of n training samples [n / world, ...] and their one-hot
        labels (None: unconditional), on the task's device. Called inside the step (may be captured)."""

    def advance(self) -> None:
        """Host-side work before each step (a streaming source copies the next batch to the device)."""

    def data_state(self) -> dict:
        """Where the run is in its data (saved with every checkpoint)."""

    def load_data_state(self, state: dict, source: str) -> None:
        """Continue from a checkpoint's ``data_state`` (``source`` names the checkpoint in errors)."""

    def sample_latent(self, n: int, rng: torch.Generator, shard: Shard = SINGLE) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The shard's rows of n generator inputs [n / world, ...] and their conditioning (one-hot
        classes, text embeddings; None: unconditional)."""

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Sample-quality metrics of the trained model's EMA (deterministic: fixed evaluation seed)."""

    def plot(self, model: torch.nn.Module, path: Path) -> None:
        """Write a picture of the model's samples."""

    def checkpoint_extras(self) -> dict:
        """Plain data saved with every checkpoint (e.g. how to rebuild a network)."""


def build_task(cfg: Config, device: torch.device, shard: Shard = SINGLE) -> Task:
    if cfg.data.kind == "toy2d":
        from .toy2d import Toy2DTask

        return Toy2DTask(cfg, device)
    if cfg.data.kind == "text2image":
        from .text2image import TextToImageTask

        return TextToImageTask(cfg, device, shard)
    if cfg.data.kind in DATASET_KINDS:
        from .image import ImageTask

        return ImageTask(cfg, device, shard)
    raise ValueError(f"data.kind: unknown task {cfg.data.kind!r}")
