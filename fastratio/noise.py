"""Noise levels, forward noising and loss weighting, in one place so a fused kernel can replace them.

sigma is always the EDM noise level (noise-to-signal ratio). The forward process is
x_t = alpha * x0 + std * eps with
  ve: alpha = 1,                  std = sigma
  vp: alpha = 1/sqrt(1+sigma^2),  std = sigma/sqrt(1+sigma^2)   (EDM's VP scaling s(t))
Networks are conditioned on sigma in both cases.
"""

from __future__ import annotations

import math

import torch

from .config import NoiseConfig


def sample_sigma(cfg: NoiseConfig, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Draw n noise levels [n] from the configured distribution."""
    if cfg.sigma_dist == "fixed":
        return torch.full((n,), cfg.sigma_fixed, device=device)
    u = torch.rand(n, generator=generator, device=device)
    if cfg.sigma_dist == "lognormal":  # EDM training distribution: ln sigma ~ N(P_mean, P_std^2)
        return torch.exp(cfg.p_mean + cfg.p_std * math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0))
    if cfg.sigma_dist == "loguniform":
        lo, hi = math.log(cfg.sigma_min), math.log(cfg.sigma_max)
        return torch.exp(lo + (hi - lo) * u)
    if cfg.sigma_dist == "uniform":
        return cfg.sigma_min + (cfg.sigma_max - cfg.sigma_min) * u
    raise ValueError(f"unknown sigma distribution {cfg.sigma_dist!r}")


def noise_coefficients(sigma: torch.Tensor, schedule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, std) of x_t = alpha x0 + std eps for EDM noise level sigma [B]."""
    if schedule == "ve":
        return torch.ones_like(sigma), sigma
    if schedule == "vp":
        alpha = torch.rsqrt(1.0 + sigma**2)
        return alpha, sigma * alpha
    raise ValueError(f"unknown noise schedule {schedule!r}")


def add_noise(x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, schedule: str) -> torch.Tensor:
    """x_t = alpha(sigma) x0 + std(sigma) eps, broadcasting the per-sample [B] coefficients."""
    alpha, std = noise_coefficients(sigma, schedule)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return alpha.reshape(shape) * x0 + std.reshape(shape) * eps


def loss_weight(sigma: torch.Tensor, kind: str, sigma_data: float = 1.0) -> torch.Tensor:
    """w(sigma) [B]: sigma^2 (the papers' choice for the generator and DSM), 1, or EDM's lambda(sigma)."""
    if kind == "sigma2":
        return sigma**2
    if kind == "none":
        return torch.ones_like(sigma)
    if kind == "edm":
        return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    raise ValueError(f"unknown loss weighting {kind!r}")
