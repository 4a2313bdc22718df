"""The order a streaming run reads its dataset in: a function of (seed, position), nothing else.

The run walks an endless sequence of epochs; epoch e is a permutation of the N items drawn from
(seed, e). Global position p is item ``perm_{p // N}[p % N]``, and step s of a run with global batch
B reads positions [s B, (s + 1) B). Rank k of K (per-rank batch n = B / K) reads rows
[k n, (k + 1) n) of that global batch, so K ranks together read exactly the batch one process would,
and a run resumed at position p reads what an uninterrupted run reads from p on. The position is
the only state a checkpoint needs; no sampler or loader state is saved.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..shard import Shard


class EpochOrder:
    def __init__(self, size: int, seed: int):
        if size <= 0:
            raise ValueError("an epoch order needs at least one item")
        self.size, self.seed = size, seed
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:  # one epoch's permutation is kept (ImageNet: 10 MB)
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._epoch, self._perm = epoch, rng.permutation(self.size)
        return self._perm

    def items(self, start: int, count: int) -> np.ndarray:
        """The items at global positions [start, start + count)."""
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            epoch, offset = divmod(start + done, self.size)
            take = min(count - done, self.size - offset)
            out[done : done + take] = self.permutation(epoch)[offset : offset + take]
            done += take
        return out


class ShardedBatches:
    """Endless per-step index lists for one rank: a DataLoader ``batch_sampler``. Iterating starts at
    ``start`` (a global position) every time, so a loader rebuilt at a checkpoint's position resumes."""

    def __init__(self, order: EpochOrder, global_batch: int, shard: Shard, start: int = 0):
        if global_batch % shard.world:
            raise ValueError(f"global batch {global_batch} is not divisible by {shard.world} ranks")
        self.order, self.global_batch, self.shard, self.start = order, global_batch, shard, start
        self.local = global_batch // shard.world

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start + self.shard.rank * self.local
        while True:
            yield self.order.items(position, self.local).tolist()
            position += self.global_batch
