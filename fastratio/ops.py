"""Hot-path ops behind one switch: the fused Triton kernels or their PyTorch references.

``run.kernels`` (or the environment variable FASTRATIO_KERNELS, which wins) picks ``triton``,
``torch`` or ``auto``: Triton on a CUDA device, or on the CPU when TRITON_INTERPRET=1 (tests);
the references otherwise. Both paths compute the same per-sample values.
"""

from __future__ import annotations

import os

import torch

from . import objectives
from .config import KERNEL_CHOICES
from .draws import Draws
from .errors import UserError
from .noise import add_noise, noise_coefficients
from .shard import SINGLE, Shard

# Seeds for the Philox noise kernel are drawn from the run's generator as device tensors, so the
# stream is reproducible and resumable from the checkpointed generator state and never syncs.
_SEED_BOUND = 2**62


def use_triton(setting: str, device: torch.device) -> bool:
    choice = os.environ.get("FASTRATIO_KERNELS", setting)
    if choice not in KERNEL_CHOICES:
        raise UserError(f"FASTRATIO_KERNELS: {choice!r} is not one of {', '.join(KERNEL_CHOICES)}")
    if choice == "auto":
        return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return choice == "triton"


def classifier_loss(logit_real: torch.Tensor, logit_fake: torch.Tensor, triton: bool) -> torch.Tensor:
    """Mean of the per-class mean BCE of the ratio classifier (objectives.ratio_classifier_loss)."""
    if not triton:
        loss_real, loss_fake = objectives.ratio_classifier_loss(logit_real, logit_fake)
        return 0.5 * (loss_real.mean() + loss_fake.mean())
    from .kernels.ratio_weighting import ratio_weighting

    logit = torch.cat([logit_real, logit_fake])
    label = torch.cat([torch.ones_like(logit_real), torch.zeros_like(logit_fake)])
    loss, _, _ = ratio_weighting(logit, label, torch.zeros_like(logit), "dikl")
    n_real = logit_real.shape[0]
    return 0.5 * (loss[:n_real].mean() + loss[n_real:].mean())


def standard_normal(shape: tuple[int, ...], like: torch.Tensor, draws: Draws) -> torch.Tensor:
    """The reference path's noise of ``shape`` on like's device and dtype (a function so a parity
    test can swap in Philox noise)."""
    return draws.randn(shape, like.device, like.dtype)


def inject_noise(x0: torch.Tensor, sigma: torch.Tensor, schedule: str, draws: Draws, triton: bool, shard: Shard = SINGLE) -> torch.Tensor:
    """x_t = alpha(sigma) x0 + std(sigma) eps (fastratio.noise.add_noise), eps being this rank's rows of
    the global batch's noise (fastratio.shard); with Triton, eps is Philox noise regenerated in the
    backward instead of stored, and the rank's rows are an index offset, not a bigger draw."""
    if not triton:
        global_eps = standard_normal((shard.rows(x0.shape[0]), *x0.shape[1:]), x0, draws)
        return add_noise(x0, sigma, shard.take(global_eps), schedule)
    from .kernels.noise_injection import noise_inject

    alpha, std = noise_coefficients(sigma, schedule)
    seed = draws.randint(_SEED_BOUND, (1,), x0.device)
    return noise_inject(x0, alpha, std, seed, row_offset=shard.row_offset(x0.shape[0]))
