"""The random numbers a training step consumes, all drawn from the run's ``torch.Generator``.

torch.compile cannot trace a call that takes a ``torch.Generator``, so a step that called
``torch.rand(..., generator=rng)`` itself could not be compiled as one graph. Steps ask a ``Draws``
for their random tensors instead, and it serves them in one of two ways:

live     each request is drawn from the generator when it is made (eager steps);
replay   each request is answered, in order, from tensors drawn ahead of the step.

A step's requests never depend on data (a compiled graph or a CUDA graph could not hold it if they
did), so the requests of one eager step, recorded with ``recording()``, are the requests of every
later step: the runner draws them with ``draw_ahead()`` outside the compiled step and hands them in
with ``replaying()``. The generator sees the same calls in the same order either way, so eager and
compiled steps consume identical random numbers, and the checkpointed generator state resumes both.

An update split into micro-batches (``optim.batch_gpu``) draws each tensor once, at the full batch's
shape, on its first micro-batch (``keep_served``) and serves the later micro-batches the same tensors
again (``serve_again``), each taking its own rows (fastratio.shard): the generator, the recorded
requests and the tape see exactly the unsplit step's draws. Plain method calls, not context managers,
so dynamo traces them inside a compiled step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Request:
    kind: str  # rand (uniform [0, 1)), randn (standard normal), randint ([0, high), int64)
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    high: int = 0

    def draw(self, generator: torch.Generator) -> torch.Tensor:
        if self.kind == "randint":
            return torch.randint(0, self.high, self.shape, generator=generator, device=self.device)
        fn = torch.rand if self.kind == "rand" else torch.randn
        return fn(self.shape, generator=generator, device=self.device, dtype=self.dtype)


class Draws:
    def __init__(self, generator: torch.Generator):
        self.generator = generator
        self._recorded: list[Request] | None = None
        self._tape: list[torch.Tensor] | None = None
        self._next = 0
        self._kept: list[torch.Tensor] | None = None  # what is served, collected for later micro-batches
        self._again: list[torch.Tensor] | None = None  # served again instead of drawing
        self._again_next = 0

    def rand(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._serve(Request("rand", tuple(shape), dtype, torch.device(device)))

    def randn(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._serve(Request("randn", tuple(shape), dtype, torch.device(device)))

    def randint(self, high: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return self._serve(Request("randint", tuple(shape), torch.int64, torch.device(device), high))

    def _serve(self, request: Request) -> torch.Tensor:
        if self._again is not None:
            return self._serve_kept(request)
        if self._tape is None:
            if self._recorded is not None:
                self._recorded.append(request)
            out = request.draw(self.generator)
        else:
            if self._next >= len(self._tape):
                raise RuntimeError(f"the step asked for more random tensors than its recorded {len(self._tape)}")
            out = self._tape[self._next]
            if tuple(out.shape) != request.shape or out.dtype != request.dtype:
                raise RuntimeError(f"random request {self._next} is {request}, but the recorded step drew {tuple(out.shape)} {out.dtype}")
            self._next += 1
        if self._kept is not None:
            self._kept.append(out)
        return out

    def _serve_kept(self, request: Request) -> torch.Tensor:
        # A micro-batch's requests must be the first one's (they never depend on data): anything else
        # is a bug, and the error ends the step, leaving the generator serving as usual.
        kept, i = self._again, self._again_next
        if i >= len(kept) or tuple(kept[i].shape) != request.shape or kept[i].dtype != request.dtype:
            self._kept, self._again, self._again_next = None, None, 0
            drew = f"{tuple(kept[i].shape)} {kept[i].dtype}" if i < len(kept) else "nothing more"
            raise RuntimeError(f"micro-batch random request {i} is {request}, but the first micro-batch drew {drew}")
        self._again_next += 1
        return kept[i]

    def keep_served(self) -> list[torch.Tensor]:
        """Serve as usual and collect, in order, every tensor served until ``serve_normally`` (the
        first micro-batch of an update)."""
        self._kept, self._again, self._again_next = [], None, 0
        return self._kept

    def serve_again(self, kept: list[torch.Tensor]) -> None:
        """Answer the requests that follow from ``kept``, in order, drawing nothing (a later
        micro-batch of the same update: the same requests, so the same tensors)."""
        self._check_all_served()
        self._kept, self._again, self._again_next = None, kept, 0

    def serve_normally(self) -> None:
        """End ``keep_served``/``serve_again``: back to drawing (or the tape)."""
        self._check_all_served()
        self._kept, self._again, self._again_next = None, None, 0

    def _check_all_served(self) -> None:
        if self._again is not None and self._again_next != len(self._again):
            used, drawn = self._again_next, len(self._again)
            self._kept, self._again, self._again_next = None, None, 0  # the error ends the step: serve as usual again
            raise RuntimeError(f"a micro-batch used {used} of the first micro-batch's {drawn} random tensors")

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[Request]]:
        """Draw live and collect the requests made inside the block."""
        self._recorded = []
        try:
            yield self._recorded
        finally:
            self._recorded = None

    @contextlib.contextmanager
    def replaying(self, tensors: list[torch.Tensor]) -> Iterator[None]:
        """Answer the requests made inside the block from ``tensors``, in order; all must be used."""
        self._tape, self._next = tensors, 0
        try:
            yield
            if self._next != len(tensors):
                raise RuntimeError(f"the step used {self._next} of its {len(tensors)} recorded random tensors")
        finally:
            self._tape, self._next = None, 0

    def draw_ahead(self, requests: list[Request]) -> list[torch.Tensor]:
        return [request.draw(self.generator) for request in requests]
