"""Moving averages of the trained network: exponential with a half-life in images (EDM), or EDM2's
power-function average with a relative standard deviation."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn


def ema_beta(batch_size: int, nimg: torch.Tensor, halflife_kimg: float, rampup: float) -> torch.Tensor:
    """Per-step decay so that a weight halves after ``halflife_kimg`` thousand images; during ramp-up
    the half-life is at most ``rampup`` times the images seen so far (early weights fade quickly).
    ``nimg`` (images seen, this step's included) is a 0-dim device tensor, so the decay is computed
    inside a compiled or captured step instead of being passed in from the host."""
    halflife_nimg = torch.full_like(nimg, halflife_kimg * 1000)
    if rampup > 0:
        halflife_nimg = torch.minimum(halflife_nimg, nimg * rampup)
    return 0.5 ** (batch_size / halflife_nimg.clamp_min(1e-8))


def std_to_exp(std: float) -> float:
    """EDM2's power-function exponent gamma for a relative std (Karras et al. 2024, Eq. 3; the largest
    real root of gamma^3 + 7 gamma^2 + (16 - std^-2) gamma + (12 - std^-2), as ``phema.std_to_exp``)."""
    t = std**-2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def power_ema_beta(batch_size: int, nimg: torch.Tensor, exponent: float) -> torch.Tensor:
    """EDM2's power-function EMA decay after an update at ``nimg`` images (this step's included):
    beta = (1 - batch / nimg)^(gamma + 1) (``phema.power_function_beta``)."""
    return (1 - batch_size / nimg.clamp_min(batch_size)) ** (exponent + 1)


class EMA(nn.Module):
    """Holds an averaged copy of a module; ``update`` blends the live weights in."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(module).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, live: nn.Module, beta: float | torch.Tensor) -> None:
        """ema = beta ema + (1 - beta) live. A tensor ``beta`` stays on the device: _foreach_lerp_ would
        turn it into a Python scalar (a host sync every step, and an error inside CUDA-graph capture),
        so the blend is two foreach ops with a tensor scalar."""
        ema_params = list(self.module.parameters())
        live_params = list(live.parameters())
        if isinstance(beta, torch.Tensor):
            beta = beta.to(ema_params[0].dtype)
            torch._foreach_mul_(ema_params, beta)
            torch._foreach_add_(ema_params, torch._foreach_mul(live_params, 1 - beta))
        else:
            torch._foreach_lerp_(ema_params, live_params, 1.0 - beta)
        for ema_buf, buf in zip(self.module.buffers(), live.buffers()):
            ema_buf.copy_(buf)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
