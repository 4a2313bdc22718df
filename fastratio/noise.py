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
from .draws import Draws


def sample_sigma(cfg: NoiseConfig, n: int, draws: Draws, device: torch.device) -> torch.Tensor:
    """Draw n noise levels [n] from the configured distribution."""
    if cfg.sigma_dist == "fixed":
        return torch.full((n,), cfg.sigma_fixed, device=device)
    if cfg.sigma_dist == "lognormal":  # EDM training distribution: ln sigma ~ N(P_mean, P_std^2)
        # A normal draw, as EDM: erfinv(2u - 1) of a uniform is -inf at u = 0, which torch.rand returns
        # about once in 2^24 draws (sigma = 0, an infinite weight, a NaN loss).
        return torch.exp(cfg.p_mean + cfg.p_std * draws.randn((n,), device))
    u = draws.rand((n,), device)  # in [0, 1): every law below stays finite and positive at both ends
    if cfg.sigma_dist == "loguniform":
        lo, hi = math.log(cfg.sigma_min), math.log(cfg.sigma_max)
        return torch.exp(lo + (hi - lo) * u)
    if cfg.sigma_dist == "uniform":
        return cfg.sigma_min + (cfg.sigma_max - cfg.sigma_min) * u
    if cfg.sigma_dist == "sd_steps":  # DMD2, SiD-LSG: t uniform on the integers [t_min, t_max] of SD's grid
        t = (cfg.t_min + u * (cfg.t_max - cfg.t_min + 1)).floor().long().clamp(max=cfg.t_max)
        return sd_sigmas(device)[t]
    raise ValueError(f"unknown sigma distribution {cfg.sigma_dist!r}")


def sd_sigmas(device: torch.device | str = "cpu") -> torch.Tensor:
    """EDM noise levels sqrt((1 - abar_t) / abar_t) of Stable Diffusion v1.x/v2.x's 1000 training steps
    (float32 [1000]): scaled_linear betas from 0.00085 to 0.012, abar the cumulative product of 1 - beta
    in float32, as diffusers' DDPMScheduler computes them (a text2image run checks its teacher's grid
    equals this one before using ``sd_steps``)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32, device=device) ** 2
    abar = torch.cumprod(1.0 - betas, dim=0).to(torch.float64)
    return ((1 - abar) / abar).sqrt().to(torch.float32)


def noise_coefficients(sigma: torch.Tensor, schedule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, std) of x_t = alpha x0 + std eps for EDM noise level sigma [B]."""
    if schedule == "ve":
        return torch.ones_like(sigma), sigma
    if schedule == "vp":
        alpha = torch.rsqrt(1.0 + sigma**2)
        return alpha, sigma * alpha
    raise ValueError(f"unknown noise schedule {schedule!r}")


def expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample [B] coefficient shaped to broadcast against ``like`` [B, ...]."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def add_noise(x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, schedule: str) -> torch.Tensor:
    """x_t = alpha(sigma) x0 + std(sigma) eps, broadcasting the per-sample [B] coefficients."""
    alpha, std = noise_coefficients(sigma, schedule)
    return expand(alpha, x0) * x0 + expand(std, x0) * eps


def loss_weight(sigma: torch.Tensor, kind: str, sigma_data: float = 1.0) -> torch.Tensor:
    """w(sigma) [B]: sigma^2 (the papers' choice for the generator), 1, or EDM's lambda(sigma)."""
    if kind == "sigma2":
        return sigma**2
    if kind == "none":
        return torch.ones_like(sigma)
    if kind == "edm":
        return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    raise ValueError(f"unknown loss weighting {kind!r}")


# EDM Table 1 constants of the VP and VE training laws.
_VP_BETA_D, _VP_BETA_MIN, _VP_EPS_T = 19.9, 0.1, 1e-5
_VE_SIGMA_MIN, _VE_SIGMA_MAX = 0.02, 100.0


def teacher_sigma(loss: str, n: int, draws: Draws, device: torch.device, sigma_data: float,
                  p_mean: float = -0.4, p_std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma [n], lambda(sigma) [n]) of EDM's training losses (Table 1): edm (ln sigma ~ N(-1.2, 1.2^2)
    for sigma_data = 0.5, the mean shifted by ln(sigma_data / 0.5) so the law scales with the data as
    the preconditioning does: -0.51 for the toy's standardised data; lambda = (sigma^2 + sd^2)/(sigma sd)^2), vp (sigma(t), t ~ U(eps_t, 1), lambda = 1/sigma^2),
    ve (sigma log-uniform on [0.02, 100], lambda = 1/sigma^2); edm2 as edm with ln sigma ~
    N(p_mean, p_std^2) (EDM2: -0.4, 1.0 at 512x512; -0.8, 1.6 at 64x64)."""
    if loss in ("edm", "edm2"):  # a normal draw, as EDM's loss.py (see sample_sigma)
        mean, std = (-1.2 + math.log(sigma_data / 0.5), 1.2) if loss == "edm" else (p_mean, p_std)
        sigma = torch.exp(mean + std * draws.randn((n,), device))
        return sigma, loss_weight(sigma, "edm", sigma_data)
    u = draws.rand((n,), device)
    if loss == "vp":
        t = 1 + u * (_VP_EPS_T - 1)
        sigma = torch.sqrt(torch.exp(0.5 * _VP_BETA_D * t**2 + _VP_BETA_MIN * t) - 1)
    elif loss == "ve":
        sigma = _VE_SIGMA_MIN * (_VE_SIGMA_MAX / _VE_SIGMA_MIN) ** u
    else:
        raise ValueError(f"unknown teacher loss {loss!r}")
    return sigma, 1 / sigma**2
