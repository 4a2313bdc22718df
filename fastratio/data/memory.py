"""Memory source: the whole set as uint8 on the training device, batches drawn inside the step.

Each step draws B indices uniformly (with replacement) from the run's generator, on the device, and
keeps its rank's rows (fastratio.shard): no loader, no host work, capturable in a CUDA graph. Right
for sets that fit (CIFAR-10 is 150 MB); fastratio.data.formats refuses a set above
``data.memory_budget_gb`` with a pointer to ``data.source=stream``.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..shard import Shard
from .formats import ImageData


class MemorySource:
    def __init__(self, data: ImageData, device: torch.device, conditional: bool):
        if conditional and data.labels is None:
            raise UserError(f"data.conditional: {data.source} has no labels")
        self.images = data.images.to(device)
        self.labels = data.labels.to(device) if conditional else None
        self.num_classes = data.num_classes if conditional else 0
        self.shape = tuple(data.images.shape[1:])
        self.device = device

    def __len__(self) -> int:
        return self.images.shape[0]

    def advance(self) -> None:
        """Nothing to do on the host: the step draws its own indices."""

    def draw(self, n: int, rng: torch.Generator, shard: Shard) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's rows of a global batch of n, drawn with the run's generator."""
        idx = shard.take(torch.randint(self.images.shape[0], (n,), generator=rng, device=self.device))
        return self.images[idx], None if self.labels is None else self.labels[idx]

    def reference(self, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.images[:count], None if self.labels is None else self.labels[:count]

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict, source: str) -> None:
        """The memory source has no position: its draws come from the run's generator, which is restored."""
