"""One training iteration, data sampling included, in the mode ``step.mode`` asks for.

eager    Python drives every op (the reference).
compile  every network's forward is compiled in place with ``torch.compile(fullgraph=True)`` (the
         Triton ops are custom ops, so the graph has no break); the step logic, its backward passes
         and the optimizers stay eager. Dynamo cannot trace ``.backward()`` inside one graph, so the
         *step* is not one compiled graph: fusing the whole step is the job of ``graph``.
graph    (CUDA, one process) the whole iteration (sampling the batch from the on-device dataset,
         noise, ratio update, generator update with its backward through the ratio network, both
         Adam steps with capturable state) is captured once as a CUDA graph after
         ``step.warmup_steps`` eager iterations and replayed: one launch per step, no host work, no
         sync. Random numbers come from the run's generator, registered with the graph so every
         replay draws fresh ones. Metrics land in static buffers that the loop reads every
         ``run.log_every`` steps. Networks run compiled inside the capture when compile is possible.
"""

from __future__ import annotations

import time

import torch

from .config import Config
from .errors import UserError
from .shard import Shard


def _take(shard: Shard, t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else shard.take(t)


class StepRunner:
    def __init__(self, cfg: Config, task, nets, step_fn, rng: torch.Generator, shard: Shard, device: torch.device):
        self.cfg, self.task, self.nets, self.step_fn, self.rng, self.shard = cfg, task, nets, step_fn, rng, shard
        self.mode = cfg.step.mode
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_metrics: dict[str, torch.Tensor] | None = None
        self.capture_seconds = 0.0
        self.compile_seconds = 0.0
        if self.mode == "graph":
            if device.type != "cuda":
                raise UserError(f"step.mode: 'graph' captures a CUDA graph and needs a CUDA device (run.device is {device.type})")
            if shard.world > 1:
                raise UserError("step.mode: 'graph' runs on one process for now; use 'compile' under torchrun")
            if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
                raise UserError("step.mode: 'graph' needs torch.cuda.CUDAGraph.register_generator_state (torch >= 2.5)")
        if self.mode in ("compile", "graph"):
            for name in ("generator", "ratio", "teacher", "fake_score"):
                net = getattr(nets, name)
                # AOTAutograd has no double backward: with R1 the ratio net stays eager.
                if net is not None and not (name == "ratio" and cfg.method.r1_gamma > 0):
                    net.compile(fullgraph=True, dynamic=False)
        self._eager_steps = 0

    def _iteration(self) -> dict[str, torch.Tensor]:
        batch = self.cfg.optim.batch_size
        x_real, labels_real = (_take(self.shard, t) for t in self.task.sample_real(batch, self.rng))
        z, labels_fake = (_take(self.shard, t) for t in self.task.sample_latent(batch, self.rng))
        return self.step_fn(x_real, z, labels_real, labels_fake)

    def __call__(self) -> dict[str, torch.Tensor]:
        if self.mode != "graph":
            t0 = time.perf_counter()
            metrics = self._iteration()
            if self.mode == "compile" and self._eager_steps == 0:
                self.compile_seconds = time.perf_counter() - t0  # the first call compiles
            self._eager_steps += 1
            return metrics
        if self.graph is None:
            if self._eager_steps < self.cfg.step.warmup_steps:
                self._eager_steps += 1
                return self._warmup()
            self._capture()
        self.graph.replay()
        return self.static_metrics

    def _warmup(self) -> dict[str, torch.Tensor]:
        # Warm-up on a side stream, as CUDA-graph capture requires (lazy allocations happen here).
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            metrics = self._iteration()
        torch.cuda.current_stream().wait_stream(stream)
        return metrics

    def _capture(self) -> None:
        t0 = time.perf_counter()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.rng)
        with torch.cuda.graph(graph):
            self.static_metrics = self._iteration()
        torch.cuda.synchronize()
        self.graph = graph
        self.capture_seconds = time.perf_counter() - t0
