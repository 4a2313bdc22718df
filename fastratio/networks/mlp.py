"""MLP networks for low-dimensional data (the toy suite).

The sigma-conditioned nets use EDM-style preconditioning so one set of weights works across noise
levels: the input is scaled to unit variance by c_in = 1/sqrt(alpha^2 sigma_data^2 + std^2) and the
noise level enters as Fourier features of c_noise = log(sigma)/4.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..noise import noise_coefficients


def _mlp(in_dim: int, hidden: int, depth: int, out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.SiLU()]
    layers.append(nn.Linear(hidden, out_dim))
    return nn.Sequential(*layers)


class MLPGenerator(nn.Module):
    """One-step generator x = z[:, :D] + f(z) [B, D] from z [B, latent_dim >= D], f's last layer zero
    at initialisation: the initial law is N(0, I), the standardised data's first two moments. The
    toy's counterpart of starting from the teacher: from a near point mass (a plain MLP's initial
    output), reverse-KL-like objectives pull every sample into the nearest mode's basin and VSD
    kept one of six modes (tests/test_toy_training.py)."""

    def __init__(self, latent_dim: int, out_dim: int, hidden: int, depth: int):
        super().__init__()
        if latent_dim < out_dim:
            raise ValueError(f"latent_dim {latent_dim} < data dimension {out_dim}")
        self.latent_dim, self.out_dim = latent_dim, out_dim
        self.net = _mlp(latent_dim, hidden, depth, out_dim)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, z: torch.Tensor, class_labels=None) -> torch.Tensor:
        return z[:, : self.out_dim] + self.net(z)


# Octaves of sin/cos features of the (preconditioned) input, pi 2^k x for k < X_OCTAVES: an MLP on raw
# coordinates resolves structure finer than about a tenth of the data's scale only after many steps
# (spectral bias). Without them the toy teacher's noise prediction was 61% wrong at sigma = 0.02 on
# spiral6's 0.016-wide components (38% at 0.05), and the ratio net sat at chance for its first
# ~400 steps there.
X_OCTAVES = 6


class SigmaMLP(nn.Module):
    """f(c_in x, fourier(c_noise)) with EDM input preconditioning; base of the ratio and score nets.
    The toy task is unconditional: the class/augmentation label arguments of the image nets are
    accepted for a common call signature and unused."""

    def __init__(self, dim: int, out_dim: int, hidden: int, depth: int, sigma_data: float, schedule: str, n_freq: int = 8,
                 n_xfreq: int = X_OCTAVES):
        super().__init__()
        self.sigma_data = sigma_data
        self.schedule = schedule
        # Fixed log-spaced frequencies: c_noise spans about [-1.5, 0.5] over the sigma range we train on.
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32) / 4)
        self.register_buffer("xfreqs", math.pi * 2.0 ** torch.arange(n_xfreq, dtype=torch.float32))
        self.net = _mlp(dim * (1 + 2 * n_xfreq) + 2 * n_freq, hidden, depth, out_dim)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None, augment_labels=None) -> torch.Tensor:
        alpha, std = noise_coefficients(sigma, self.schedule)
        c_in = torch.rsqrt((alpha * self.sigma_data) ** 2 + std**2)
        angles = (torch.log(sigma) / 4)[:, None] * self.freqs.to(x.dtype)
        x_in = c_in[:, None] * x
        x_angles = (x_in[:, :, None] * self.xfreqs.to(x.dtype)).flatten(1)
        h = torch.cat([x_in, torch.sin(x_angles), torch.cos(x_angles), torch.sin(angles), torch.cos(angles)], dim=1)
        return self.net(h)


class MLPRatio(SigmaMLP):
    """Ratio network: logit l(x_t, sigma) [B] of "real" (log p/q at the optimum)."""

    def __init__(self, dim: int, hidden: int, depth: int, sigma_data: float, schedule: str):
        super().__init__(dim, 1, hidden, depth, sigma_data, schedule)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None, augment_labels=None) -> torch.Tensor:
        return super().forward(x, sigma).squeeze(1)


class MLPScore(SigmaMLP):
    """Score network s(x_t, sigma) = -eps_hat(x_t, sigma) / std(sigma) [B, D] (noise prediction)."""

    def __init__(self, dim: int, hidden: int, depth: int, sigma_data: float, schedule: str):
        super().__init__(dim, dim, hidden, depth, sigma_data, schedule)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None, augment_labels=None) -> torch.Tensor:
        _, std = noise_coefficients(sigma, self.schedule)
        return -super().forward(x, sigma) / std[:, None]
