"""Streaming source: worker processes read and decode the step's batch from disk while the device trains.

For sets that do not fit in device memory (ImageNet 64x64: 1.28M images; EDM2 latents: ~170 GB). The
host holds the index (member names and labels) and a few batches in flight, whatever the set's size.

    index      fastratio.data.formats.Archive over an image folder or a dataset_tool zip
    order      fastratio.data.order: step s of rank k reads its rows of global positions [sB, (s+1)B)
    workers    a torch DataLoader with ``data.workers`` processes, ``data.prefetch`` batches each,
               pinned host memory on CUDA; members are decoded in the workers
    device     ``advance()`` (host side, before each step) copies the next batch into fixed device
               buffers with non-blocking copies; the step reads those buffers. A captured CUDA graph
               reads the same buffers, so ``step.mode=graph`` replays over fresh data with the
               augmentation and noise still drawn inside the graph.

The position (global samples consumed) is saved with every checkpoint; a resumed run rebuilds the
loader there and reads exactly the batches an uninterrupted run would have. Building a loader draws
nothing from the global torch RNG, which the step's dropout reads (``make_loader``), so a resumed run
also draws the uninterrupted run's dropout masks.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

from ..checkpoint import state_count
from ..errors import UserError
from ..shard import Shard
from .formats import Archive, dataset_path
from .order import EpochOrder, ShardedBatches

_REFERENCE_SEED = 12345  # the fixed subset evaluation compares against
T = TypeVar("T")


def first_readable(i: int, size: int, skip: bool, read: Callable[[int], T]) -> tuple[T | None, int, str]:
    """``read(i)``, or with ``skip`` the first readable member from i on (wrapping around), as
    (value, member, note): the first problem met ('' if none), and value None when nothing could be
    read. A problem comes back as a note rather than raised: an error raised inside a worker would
    reach the trainer as a wrapped traceback."""
    note = ""
    for j in range(size if skip else 1):
        k = (i + j) % size
        try:
            return read(k), k, note
        except UserError as err:
            note = note or str(err)
    return None, i, note or "no readable member"


class _Members(torch.utils.data.Dataset):
    """Member i as (array, label, note), decoded in a worker; an unreadable member comes back as
    zeros (see ``first_readable``)."""

    def __init__(self, archive: Archive, shape: tuple[int, ...], dtype: np.dtype, skip: bool):
        self.archive, self.shape, self.dtype, self.skip = archive, shape, dtype, skip
        self.labels = archive.labels

    def __len__(self) -> int:
        return len(self.archive)

    def _decode(self, i: int) -> np.ndarray:
        arr = self.archive.decode(i)
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise UserError(f"{self.archive.member(i)}: {arr.dtype} {arr.shape} differs from the dataset's {self.dtype} {self.shape}")
        return arr

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        arr, k, note = first_readable(i, len(self.archive), self.skip, self._decode)
        if arr is None:
            return torch.from_numpy(np.zeros(self.shape, self.dtype)), 0, note
        return torch.from_numpy(np.array(arr)), int(self.labels[k]) if self.labels is not None else 0, note


# torch's messages: "DataLoader worker (pid 12) is killed by signal: Killed.", "DataLoader worker
# (pid(s) 12, 13) exited unexpectedly", "DataLoader worker (pid 12) exited unexpectedly with exit code 1"
_WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([^)]*)\) (?:is killed by signal: (.*)|exited unexpectedly.*)", re.DOTALL)


def loader_failure(err: BaseException) -> UserError | None:
    """One line for a DataLoader failure torch raises as a RuntimeError: a worker killed (say by the
    OOM killer) or gone, or no batch within data.timeout_s."""
    text = str(err)
    died = _WORKER_DIED.search(text)
    if died:
        how = f"killed by {died.group(2).strip().rstrip('.')}" if died.group(2) else "exited unexpectedly"
        pids = died.group(1).strip()
        return UserError(f"data.workers: loader worker ({f'pid {pids}' if pids else 'pid unknown'}) {how}; the run stopped at its last "
                         "checkpoint (out of host memory? lower data.workers or data.prefetch)")
    if "DataLoader timed out" in text:
        return UserError(f"data.timeout_s: no batch from the loader workers in {text.split('after')[-1].strip().rstrip('.')} "
                         "(a hung or slow filesystem?); the run stopped at its last checkpoint")
    return None


_LOADER_WORD = 2  # SeedSequence([seed, position, 2]): apart from EpochOrder's [seed, epoch] and caption dropout's [.., 1]


def _ignore_stop_signals(_worker: int) -> None:
    """A worker's start: Ctrl-C and a scheduler's SIGTERM reach the whole process group, and a worker
    that died of them would turn the trainer's clean stop (a checkpoint, then exit) into a dead-worker
    error. The trainer alone handles them, and shuts its workers down itself."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset: torch.utils.data.Dataset, batch_sampler, *, seed: int, position: int, workers: int, prefetch: int,
                timeout_s: float, persistent: bool, pin: bool = False) -> torch.utils.data.DataLoader:
    """The DataLoader of both streaming sources. Its ``generator`` is seeded from (seed, position): each
    iterator draws its workers' base seed from it, where without one torch draws from the global RNG, the
    stream of the step's dropout: a run resumed at a checkpoint rebuilds its iterator at another point of
    that stream than an uninterrupted run, and every later dropout mask would differ."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, position, _LOADER_WORD]).generate_state(1, np.uint64)[0]))
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin,
        prefetch_factor=prefetch if workers else None, persistent_workers=persistent and workers > 0,
        timeout=timeout_s if workers else 0, generator=generator, worker_init_fn=_ignore_stop_signals if workers else None,
    )


def _iterate(loader: torch.utils.data.DataLoader):
    """``iter(loader)`` without torch's SIGCHLD handler. That handler raises a worker's death as a
    RuntimeError in whatever the main thread is doing when the signal lands (writing a checkpoint,
    replaying a CUDA graph, pytest's own reporting); without it the iterator's liveness check reports
    the same death at the next batch (within torch's 5 s status interval), where ``_next`` turns it
    into one line. The handler that was there before is put back."""
    import signal
    import threading

    previous = signal.getsignal(signal.SIGCHLD) if threading.current_thread() is threading.main_thread() else None
    batches = iter(loader)
    if previous is not None:
        signal.signal(signal.SIGCHLD, previous)
    return batches


def next_batch(batches) -> tuple:
    """The loader's next batch; a worker that died or sent nothing within data.timeout_s is one line."""
    try:
        return next(batches)
    except RuntimeError as err:
        failure = loader_failure(err)
        if failure is None:
            raise
        raise failure from None
    except (EOFError, ConnectionError):  # a worker died while handing over a batch's shared memory
        time.sleep(0.5)  # let it be reaped, to name it
        dead = [str(w.pid) for w in getattr(batches, "_workers", []) if not w.is_alive()]
        raise loader_failure(RuntimeError(f"DataLoader worker (pid(s) {', '.join(dead)}) exited unexpectedly")) from None


def count_skipped(notes: list[str], skip_corrupt: bool, skipped: int) -> int:
    """``skipped`` plus the batch's unreadable members (each already replaced by the next readable
    one); without skip_corrupt the first stops the run in one line."""
    problems = [n for n in notes if n]
    if problems and not skip_corrupt:
        raise UserError(f"{problems[0]} (set data.skip_corrupt=true to skip unreadable members)")
    if problems and not skipped:
        print(f"data.skip_corrupt: skipping {problems[0]}; later skips are counted in the checkpoint's data state")
    return skipped + len(problems)


class StreamSource:
    def __init__(self, path: str, *, max_items: int, global_batch: int, shard: Shard, seed: int, device: torch.device,
                 conditional: bool, workers: int, prefetch: int, timeout_s: float, skip_corrupt: bool):
        self.archive = Archive(dataset_path("folder", path), max_items)
        first = self.archive.decode(0)
        self.shape, self.dtype = tuple(first.shape), first.dtype
        if conditional and self.archive.labels is None:
            raise UserError(f"data.conditional: {path} has no labels (dataset.json 'labels' is missing or null)")
        # Archive checked the labels with formats.check_labels, the memory source's check: both refuse alike.
        self.num_classes = self.archive.num_classes if conditional else 0
        self.global_batch, self.shard, self.device = global_batch, shard, device
        self.workers, self.prefetch, self.timeout_s, self.skip_corrupt = workers, prefetch, timeout_s, skip_corrupt
        self.order = EpochOrder(len(self.archive), seed)
        self.position = 0  # global samples consumed by completed advance() calls
        self.skipped = 0
        local = global_batch // shard.world
        self.images = torch.zeros((local, *self.shape), dtype=torch.from_numpy(np.zeros(0, first.dtype)).dtype, device=device)
        self.labels = torch.zeros(local, dtype=torch.int64, device=device) if conditional else None
        self._batches = None

    def __len__(self) -> int:
        return len(self.archive)

    def _loader(self, batch_sampler, position: int, persistent: bool) -> torch.utils.data.DataLoader:
        return make_loader(_Members(self.archive, self.shape, self.dtype, self.skip_corrupt), batch_sampler, seed=self.order.seed,
                           position=position, workers=self.workers, prefetch=self.prefetch, timeout_s=self.timeout_s,
                           persistent=persistent, pin=self.device.type == "cuda")

    def _next(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, notes = next_batch(batches)
        self.skipped = count_skipped(notes, self.skip_corrupt, self.skipped)
        return images, labels

    def advance(self) -> None:
        """Copy the next global batch's rows for this rank into the device buffers (host side, before the step)."""
        if self._batches is None:
            sampler = ShardedBatches(self.order, self.global_batch, self.shard, self.position)
            self._batches = _iterate(self._loader(sampler, self.position, persistent=True))
        images, labels = self._next(self._batches)
        self.images.copy_(images, non_blocking=True)
        if self.labels is not None:
            self.labels.copy_(labels, non_blocking=True)
        self.position += self.global_batch

    def draw(self, n: int, rng: torch.Generator, shard: Shard) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's rows of the current step's global batch: the device buffers ``advance`` fills
        (the order, not ``rng``, decides which)."""
        if n != self.global_batch or shard != self.shard:
            raise ValueError(f"the stream reads global batches of {self.global_batch} for {self.shard}, not {n} for {shard}")
        return self.images, self.labels

    def reference(self, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A fixed random subset of ``count`` members (on the host) to evaluate against; the same
        subset for every run over this set, read once through the workers."""
        count = min(count, len(self.archive))
        items = EpochOrder(len(self.archive), _REFERENCE_SEED).items(0, count)
        chunk = max(1, min(256, count))
        batches = _iterate(self._loader([items[i : i + chunk].tolist() for i in range(0, count, chunk)], 0, persistent=False))
        images, labels = zip(*(self._next(batches) for _ in range(0, count, chunk)), strict=True)
        return torch.cat(images), torch.cat(labels) if self.archive.labels is not None else None

    def state(self) -> dict:
        return {"position": self.position, "size": len(self.archive), "skipped": self.skipped}

    def load_state(self, state: dict, source: str) -> None:
        if not isinstance(state, dict) or "position" not in state or "size" not in state:
            raise UserError(f"{source}: the checkpoint has no streaming position and size (written by a data.source=memory run?)")
        position, size, skipped = (state_count(state.get(name, 0), f"data {name}", source) for name in ("position", "size", "skipped"))
        if size != len(self.archive):
            raise UserError(f"{source}: the checkpoint read a set of {size} members, data.path has {len(self.archive)}; "
                            "its order cannot be continued")
        self.position, self.skipped, self._batches = position, skipped, None
