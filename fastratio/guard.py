"""Stopping safely: signals turn into a final checkpoint, divergence into a clear stop.

``StopRequest`` catches SIGTERM/SIGINT (a scheduler's preemption, Ctrl-C) and only sets a flag; the
loop checkpoints the current step and exits normally. A second SIGINT interrupts at once: the CLI
(``errors.run_cli``) reports it in one line, status 130; a checkpoint being written is dropped
(``atomic.atomic_write``) and the previous one is intact. Loader workers ignore both
signals (``data.stream.make_loader``): the trainer stops them itself.
``DivergenceWatch`` records, on the device and without a host sync, the first step whose metrics
were NaN/Inf; the loop reads it on log and checkpoint steps, and a checkpoint is written only after
that check (and a parameter check) passes, so the newest checkpoint is always a good one.
"""

from __future__ import annotations

import math
import signal
import statistics
import threading

import torch

from .errors import UserError


class TrainingDiverged(UserError):
    """NaN/Inf in losses or parameters; the message names the step and the last good checkpoint."""


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:  # noqa: PYI034 - a plain class, not subclassed
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_name == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


class DivergenceWatch:
    """``explode_factor`` > 0 also stops a run whose logged losses or gradient norms (non-negative
    metrics) jump above that many times their median over the earlier log lines: still finite, but
    diverging (a two-score baseline was seen at gradient norm 1e17 with nothing NaN)."""

    def __init__(self, device: torch.device, explode_factor: float = 0.0):
        self.first_bad = torch.zeros((), dtype=torch.int64, device=device)  # 0: all finite so far
        self.explode_factor = explode_factor
        self.history: dict[str, list[float]] = {}

    def update(self, metrics: dict[str, torch.Tensor], step: int) -> None:
        """Device-side: remember ``step`` if any metric is non-finite and none was before."""
        if not metrics:
            return
        finite = torch.isfinite(torch.stack([v.detach().float().reshape(()) for v in metrics.values()])).all()
        self.first_bad = torch.where((self.first_bad == 0) & ~finite, step, self.first_bad)

    def check(self, step: int, params: list[torch.Tensor], last_good: str, losses: dict[str, float] | None = None) -> None:
        """Raise TrainingDiverged if a metric or a parameter is non-finite (one host sync), or a logged
        loss or norm in ``losses`` exploded (see the class doc)."""
        first = int(self.first_bad)
        bad_param = not bool(torch.stack([p.detach().float().abs().amax() for p in params]).isfinite().all()) if params else False
        if first or bad_param:
            names = [k for k, v in (losses or {}).items() if not math.isfinite(v)]
            what = f"non-finite {', '.join(names) or 'metrics'} first at step {first}" if first else f"non-finite parameters at step {step}"
            raise TrainingDiverged(f"{what} (stopped at step {step}); last good checkpoint: {last_good} (kept)")
        self._check_explosion(step, losses or {}, last_good)

    _WATCHED = ("_loss", "_grad_norm", "_direction_norm")
    # From the second log line on: a two-score run exploded between its first and second line (VSD
    # on ring8, fake-score loss 0.86 -> 1.4e8), and a median over exploded lines would never trip.
    _MIN_HISTORY = 1

    def _check_explosion(self, step: int, losses: dict[str, float], last_good: str) -> None:
        if self.explode_factor <= 0:
            return
        for key, value in losses.items():
            if not key.endswith(self._WATCHED) or value < 0:
                continue
            seen = self.history.setdefault(key, [])
            if len(seen) >= self._MIN_HISTORY:
                typical = statistics.median(seen)
                if value > self.explode_factor * max(typical, 1e-12):
                    raise TrainingDiverged(
                        f"{key} exploded to {value:.3g} at step {step}, {value / max(typical, 1e-12):.2g}x its median {typical:.3g} "
                        f"over earlier log lines (run.explode_factor {self.explode_factor:g}); last good checkpoint: {last_good} (kept)")
            seen.append(value)
