"""Data-parallel randomness: every rank draws the *global* batch's random numbers from the same
stream and keeps its own rows.

With ``world`` ranks and a per-rank batch n, each random tensor of a step is drawn at n * world rows
from a generator seeded identically on every rank, and rank r keeps rows [r n, (r + 1) n). The ranks
see disjoint samples, the global batch is exactly what one process would draw, and a K-GPU run
reproduces the single-process run up to the order of the gradient all-reduce. The extra draws are
random numbers only (no network work); the Philox noise kernel avoids even those by offsetting its
element index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    def rows(self, n_local: int) -> int:
        """Rows of a global draw for n_local rows per rank."""
        return n_local * self.world

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global draw [rows(n), ...]."""
        if self.world == 1:
            return x
        n = x.shape[0] // self.world
        return x[self.rank * n : (self.rank + 1) * n]

    def row_offset(self, n_local: int) -> int:
        return self.rank * n_local


SINGLE = Shard()
