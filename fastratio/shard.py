"""Data-parallel randomness: every rank draws the *global* batch's random numbers from the same
stream and keeps its own rows.

With ``world`` ranks and a per-rank batch n, each random tensor of a step is drawn at n * world rows
from a generator seeded identically on every rank, and rank r keeps rows [r n, (r + 1) n). The ranks
see disjoint samples, the global batch is exactly what one process would draw, and a K-GPU run
reproduces the single-process run up to the order of the gradient all-reduce. The extra draws are
random numbers only (no network work); the Philox noise kernel avoids even those by offsetting its
element index.

Gradient accumulation (``optim.batch_gpu``) cuts each rank's rows once more: micro-batch k of K keeps
rows [r n + k m, r n + (k + 1) m) of the same global draw (m = n / K), so the K micro-batches of a
step see exactly the random numbers of the unsplit step. The step draws each tensor once, on the first
micro-batch, and serves the later ones the same tensors again (fastratio.draws, ``keep_served``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1
    micro: int = 0  # this micro-batch of the rank's rows (optim.batch_gpu)
    micros: int = 1  # micro-batches per rank and update (1: the rank's rows at once)

    def rows(self, n_local: int) -> int:
        """Rows of a global draw for n_local rows per rank (per micro-batch when split)."""
        return n_local * self.micros * self.world

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's (micro-batch's) rows of a global draw [rows(n), ...]."""
        if self.world == 1 and self.micros == 1:
            return x
        n = x.shape[0] // self.world
        m = n // self.micros
        start = self.rank * n + self.micro * m
        return x[start : start + m]

    def row_offset(self, n_local: int) -> int:
        """Index of this rank's (micro-batch's) first row in the global draw."""
        return (self.rank * self.micros + self.micro) * n_local

    def micro_batch(self, k: int, micros: int) -> Shard:
        """Micro-batch k of ``micros`` of this rank's rows (this shard unsplit)."""
        return Shard(self.rank, self.world, k, micros)

    def local(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """This micro-batch's rows of a per-rank tensor [n_local, ...] (None stays None)."""
        if x is None or self.micros == 1:
            return x
        m = x.shape[0] // self.micros
        return x[self.micro * m : (self.micro + 1) * m]


SINGLE = Shard()
