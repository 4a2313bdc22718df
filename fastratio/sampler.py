"""EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1 without churn) for teacher samples.

Noise levels sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, i < N, then 0;
dx/dsigma = (x - D(x; sigma)) / sigma, Euler step plus a second-order correction except at the last
step: 2N - 1 denoiser evaluations (35 for EDM's CIFAR-10 setting, N = 18).
"""

from __future__ import annotations

import itertools

import torch


def sigma_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, device=None) -> torch.Tensor:
    """[num_steps + 1] decreasing noise levels ending in 0."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    span = sigma_min ** (1 / rho) - sigma_max ** (1 / rho)
    sigmas = (sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * span) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64, device=device)])


@torch.no_grad()
def heun_sample(denoiser, latents: torch.Tensor, class_labels: torch.Tensor | None = None, num_steps: int = 18,
                sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """x_0 from latents ~ N(0, I) [B, C, H, W]; ``denoiser(x, sigma [B], class_labels)`` is an EDM D."""
    sigmas = sigma_steps(num_steps, sigma_min, sigma_max, rho, latents.device)
    x = latents.to(torch.float64) * sigmas[0]
    batch = latents.shape[0]

    def slope(x, sigma):
        d = denoiser(x.to(torch.float32), sigma.to(torch.float32).expand(batch), class_labels).to(torch.float64)
        return (x - d) / sigma

    for s_cur, s_next in itertools.pairwise(sigmas):
        d_cur = slope(x, s_cur)
        x_next = x + (s_next - s_cur) * d_cur
        if s_next > 0:
            x_next = x + (s_next - s_cur) * 0.5 * (d_cur + slope(x_next, s_next))
        x = x_next
    return x.to(torch.float32)
