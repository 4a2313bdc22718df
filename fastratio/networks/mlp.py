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
    """One-step generator x = g(z) [B, D] from z [B, latent_dim]."""

    def __init__(self, latent_dim: int, out_dim: int, hidden: int, depth: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = _mlp(latent_dim, hidden, depth, out_dim)

    def forward(self, z: torch.Tensor, class_labels=None) -> torch.Tensor:
        return self.net(z)


class MLPDenoiserGenerator(nn.Module):
    """One-step generator g(z) = D(x; sigma_init) at x = std(sigma_init) z, z ~ N(0, I) [B, D], D being
    the Tweedie denoiser (x + std^2 s(x, sigma)) / alpha of a score net: the papers' generator, which
    starts from the teacher's weights (``load_teacher``) so that it begins as the teacher's one-step
    posterior mean from pure noise."""

    def __init__(self, score: MLPScore, sigma_init: float):
        super().__init__()
        self.score, self.sigma_init = score, sigma_init
        self.latent_dim = score.net[-1].out_features  # the data's dimension

    @torch.no_grad()
    def load_teacher(self, teacher: MLPScore) -> None:
        self.score.load_state_dict(teacher.state_dict())

    def forward(self, z: torch.Tensor, class_labels=None) -> torch.Tensor:
        sigma = torch.full((z.shape[0],), self.sigma_init, dtype=z.dtype, device=z.device)
        alpha, std = noise_coefficients(sigma, self.score.schedule)
        x = std[:, None] * z
        return (x + std[:, None] ** 2 * self.score(x, sigma)) / alpha[:, None]


class SigmaMLP(nn.Module):
    """f(c_in x, fourier(c_noise)) with EDM input preconditioning; base of the ratio and score nets.
    The toy task is unconditional: the class/augmentation label arguments of the image nets are
    accepted for a common call signature and unused."""

    def __init__(self, dim: int, out_dim: int, hidden: int, depth: int, sigma_data: float, schedule: str, n_freq: int = 8):
        super().__init__()
        self.sigma_data = sigma_data
        self.schedule = schedule
        # Fixed log-spaced frequencies: c_noise spans about [-1.5, 0.5] over the sigma range we train on.
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32) / 4)
        self.net = _mlp(dim + 2 * n_freq, hidden, depth, out_dim)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None, augment_labels=None) -> torch.Tensor:
        alpha, std = noise_coefficients(sigma, self.schedule)
        c_in = torch.rsqrt((alpha * self.sigma_data) ** 2 + std**2)
        angles = (torch.log(sigma) / 4)[:, None] * self.freqs.to(x.dtype)
        h = torch.cat([c_in[:, None] * x, torch.sin(angles), torch.cos(angles)], dim=1)
        return self.net(h)


class MLPRatio(SigmaMLP):
    """Ratio network: logit l(x_t, sigma) [B] of "real" (log p/q at the optimum)."""

    def __init__(self, dim: int, hidden: int, depth: int, sigma_data: float, schedule: str):
        super().__init__(dim, 1, hidden, depth, sigma_data, schedule)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None, augment_labels=None) -> torch.Tensor:
        return super().forward(x, sigma).squeeze(1)

    @torch.no_grad()
    def load_trunk(self, score: SigmaMLP) -> None:
        """Start from a fitted score net's hidden layers (the toy analogue of the ratio UNet starting
        from the teacher's encoder); the scalar head stays fresh."""
        for mine, theirs in zip(self.net[:-1], score.net[:-1]):
            if isinstance(mine, nn.Linear):
                mine.weight.copy_(theirs.weight)
                mine.bias.copy_(theirs.bias)


class MLPScore(SigmaMLP):
    """Score network s(x_t, sigma) = -eps_hat(x_t, sigma) / std(sigma) [B, D] (noise prediction)."""

    def __init__(self, dim: int, hidden: int, depth: int, sigma_data: float, schedule: str):
        super().__init__(dim, dim, hidden, depth, sigma_data, schedule)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None, augment_labels=None) -> torch.Tensor:
        _, std = noise_coefficients(sigma, self.schedule)
        return -super().forward(x, sigma) / std[:, None]
