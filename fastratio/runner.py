"""One training iteration, data sampling included, in the mode ``step.mode`` asks for.

eager    Python drives every op (the reference).
compile  the whole step (ratio or fake-score updates, generator update, every backward pass, the
         gradient clipping and both Adam steps) is one ``torch.compile(fullgraph=True)`` graph.
         The first step runs eagerly and records the step's random requests (fastratio.draws);
         later steps draw them ahead from the run's generator and hand them to the compiled step,
         so compile consumes exactly eager's random numbers. Dynamo traces the backward passes
         (``autograd.grad``) under ``trace_autograd_ops``. A torch that cannot trace the step gets
         a one-line notice and per-network compilation instead. Under torchrun the networks are
         compiled one by one: DDP's all-reduce hooks run in eager autograd.
graph    (CUDA, one process) the compiled step, with data sampling, random draws and EMA updates,
         captured once as a CUDA graph after the recording step and ``step.warmup_steps``
         compiled steps, then replayed: one launch per step, no host work, no sync. The run's
         generator is registered with the graph, so every replay draws fresh numbers. Adam's
         state is capturable. Metrics land in static buffers the loop reads every
         ``run.log_every`` steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch
import torch._inductor.exc

from .config import Config
from .ema import EMA, ema_beta, power_ema_beta, std_to_exp
from .errors import UserError
from .optim import LearningRateSchedule
from .shard import Shard

# A compiler crash (say, inductor's CPU code generation on some bf16 graphs in torch 2.14) is a
# toolchain failure, not something per-network compilation would avoid: it stops the run with one line.
_COMPILER_FAILURES = (torch._dynamo.exc.BackendCompilerFailed, getattr(torch._inductor.exc, "InductorError", torch._dynamo.exc.BackendCompilerFailed))


def _tracing_autograd():
    """Let dynamo trace autograd.grad; a torch without the switch cannot, and the step falls back
    to per-network compilation (StepRunner._compile_and_run)."""
    if hasattr(torch._dynamo.config, "trace_autograd_ops"):
        return torch._dynamo.config.patch(trace_autograd_ops=True)
    return contextlib.nullcontext()


class StepRunner:
    def __init__(self, cfg: Config, task, nets, step_fn, shard: Shard, device: torch.device,
                 averages: tuple[tuple[EMA, torch.nn.Module, float], ...] = (), nimg: int = 0,
                 optimizers: dict[str, torch.optim.Optimizer] | None = None):
        self.cfg, self.task, self.nets, self.step_fn, self.shard = cfg, task, nets, step_fn, shard
        self.draws = step_fn.draws
        self.mode = cfg.step.mode
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_metrics: dict[str, torch.Tensor] | None = None
        self.capture_seconds = 0.0
        self.compile_seconds = 0.0
        self.requests = None  # the step's random requests, recorded by its first (eager) run
        self.compiled = None
        self.steps = 0
        # (EMA, live module, half-life in kimg): averaged after every step, inside the captured graph.
        self.averages = averages
        # Images seen (nimg when a run resumes), kept on the device so the EMA decays need nothing
        # from the host.
        self.nimg = torch.full((), float(nimg), dtype=torch.float64, device=device)
        self.power_exponent = std_to_exp(cfg.optim.ema_std) if cfg.optim.ema_std else None
        self.schedule = LearningRateSchedule(optimizers or {}, cfg) if cfg.optim.lr_schedule != "constant" else None
        if self.schedule is not None:
            self.schedule(self.nimg)  # the first update's learning rate (EDM2: 0 at nimg 0 with a warm-up)
        if self.mode == "graph":
            if device.type != "cuda":
                raise UserError(f"step.mode: 'graph' captures a CUDA graph and needs a CUDA device (run.device is {device.type})")
            if shard.world > 1:
                raise UserError("step.mode: 'graph' runs on one process for now; use 'compile' under torchrun")
            if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
                raise UserError("step.mode: 'graph' needs torch.cuda.CUDAGraph.register_generator_state (torch >= 2.5)")
        # What is compiled: "step" (the whole step, one graph), "networks" (each forward), or nothing.
        self.compiled_unit = None if self.mode == "eager" else ("step" if shard.world == 1 else "networks")
        if self.compiled_unit == "networks":
            self._compile_networks()

    def _compile_networks(self) -> None:
        for field in dataclasses.fields(self.nets):
            name, net = field.name, getattr(self.nets, field.name)
            # AOTAutograd has no double backward: with R1 the ratio net stays eager here.
            if net is not None and not (name == "ratio" and self.cfg.method.r1_gamma > 0):
                net.compile(fullgraph=True, dynamic=False)

    def _batch(self) -> tuple:
        batch, rng = self.cfg.optim.batch_size, self.draws.generator
        x_real, labels_real = self.task.sample_real(batch, rng, self.shard)
        z, labels_fake = self.task.sample_latent(batch, rng, self.shard)
        return x_real, z, labels_real, labels_fake

    def _iteration(self) -> dict[str, torch.Tensor]:
        metrics = self._step(self._batch())
        self._average()
        return metrics

    def _step(self, batch: tuple) -> dict[str, torch.Tensor]:
        if self.compiled_unit != "step":
            return self.step_fn(*batch)
        if self.requests is None:  # the first step: eager, and it tells what a step draws
            with self.draws.recording() as requests:
                metrics = self.step_fn(*batch)
            self.requests = list(requests)
            return metrics
        drawn = self.draws.draw_ahead(self.requests)
        with self.draws.replaying(drawn):
            if self.compiled is None:
                return self._compile_and_run(batch)
            with _tracing_autograd():
                return self.compiled(*batch)

    def _average(self) -> None:
        batch = self.cfg.optim.batch_size
        self.nimg += batch
        for i, (ema, live, halflife_kimg) in enumerate(self.averages):
            if i == 0 and self.power_exponent is not None:  # the trained network, averaged as EDM2 does
                beta = power_ema_beta(batch, self.nimg, self.power_exponent)
            else:
                beta = ema_beta(batch, self.nimg, halflife_kimg, self.cfg.optim.ema_rampup)
            ema.update(live, beta)
        if self.schedule is not None:
            self.schedule(self.nimg)  # the next update's learning rate

    def _compile_and_run(self, batch: tuple) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        self.compiled = torch.compile(self.step_fn.__call__, fullgraph=True, dynamic=False)
        try:
            with _tracing_autograd():
                metrics = self.compiled(*batch)
        except torch._dynamo.exc.Unsupported as err:
            reason = str(err).strip().splitlines()[0]
            print(f"step.mode={self.mode}: torch {torch.__version__} cannot trace the whole step as one graph ({reason}); compiling each network instead")
            self.compiled_unit, self.compiled = "networks", None
            torch._dynamo.reset()
            self._compile_networks()
            metrics = self.step_fn(*batch)  # the same drawn numbers, still being replayed
        except _COMPILER_FAILURES as err:
            cause = getattr(err, "inner_exception", None) or err
            reason = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"
            raise UserError(f"step.mode={self.mode}: the compiler failed on this step ({reason}); "
                            "use step.mode=eager, or on a CPU try run.precision=fp32") from None
        self.compile_seconds = time.perf_counter() - t0
        return metrics

    def __call__(self) -> dict[str, torch.Tensor]:
        self.steps += 1
        self.task.advance()  # host side: a streamed batch lands in the buffers the step (or graph) reads
        if self.mode != "graph":
            t0 = time.perf_counter()
            metrics = self._iteration()
            if self.compiled_unit == "networks" and self.steps == 1:
                self.compile_seconds = time.perf_counter() - t0  # the first call compiles
            return metrics
        if self.graph is None:
            # One recording step, then warm-up steps (compilation, lazy allocations) before capture.
            if self.steps <= 1 + self.cfg.step.warmup_steps:
                return self._warmup()
            self._capture()
        self.graph.replay()
        return self.static_metrics

    def _warmup(self) -> dict[str, torch.Tensor]:
        # Warm-up on a side stream, as CUDA-graph capture requires.
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
        graph.register_generator_state(self.draws.generator)
        with torch.cuda.graph(graph):
            self.static_metrics = self._iteration()
        torch.cuda.synchronize()
        self.graph = graph
        self.capture_seconds = time.perf_counter() - t0
