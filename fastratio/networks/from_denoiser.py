"""What stage 2 makes of an EDM-style denoiser D(x; sigma) (x = x0 + sigma n): the one-step
generator and the score of the noised marginal. The image UNets and the toy MLP denoiser share them,
so the toy's generator and scores are built exactly as the images' are."""

from __future__ import annotations

import torch
from torch import nn

from ..noise import expand, noise_coefficients


class OneStepGenerator(nn.Module):
    """g(z, c) = D(sigma_init z; sigma_init, c): a denoiser applied once at a fixed noise level,
    initialised from the teacher ("Towards..." Sec. 4: without this init training collapses)."""

    def __init__(self, denoiser: nn.Module, sigma_init: float, checkpointing: bool = False):
        super().__init__()
        self.denoiser, self.sigma_init = denoiser, sigma_init
        if checkpointing:
            # Activation checkpointing per UNet block: only block inputs (and the decoder's skips) stay
            # alive between the forward and the backward, which recomputes each block once.
            denoiser.model.checkpointing = True

    def forward(self, z: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = torch.full((z.shape[0],), self.sigma_init, device=z.device)
        return self.denoiser(self.sigma_init * z, sigma, class_labels)


class DenoiserScore(nn.Module):
    """Score of the noised marginal from a denoiser: with x_t = alpha x0 + std eps (std = alpha sigma),
    grad log p(x_t) = (alpha D(x_t / alpha; sigma) - x_t) / std^2 (Tweedie)."""

    def __init__(self, denoiser: nn.Module, schedule: str):
        super().__init__()
        self.denoiser, self.schedule = denoiser, schedule

    def forward(self, x_t, sigma, class_labels=None, augment_labels=None) -> torch.Tensor:
        alpha, std = (expand(v, x_t) for v in noise_coefficients(sigma, self.schedule))
        d = self.denoiser(x_t / alpha, sigma, class_labels, augment_labels)
        return (alpha * d - x_t) / std**2
