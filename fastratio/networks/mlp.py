"""MLP networks for low-dimensional data (the toy suite).

The sigma-conditioned nets use EDM's preconditioning so one set of weights works across noise
levels: the input is scaled to unit variance by c_in = 1/sqrt(alpha^2 sigma_data^2 + std^2), the
noise level enters as Fourier features of c_noise = log(sigma)/4, and the denoiser's output is
c_skip x + c_out F.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..noise import noise_coefficients


def _mlp(in_dim: int, hidden: int, depth: int, out_dim: int) -> nn.Sequential:
    """SiLU MLP whose last hidden layer is normalised (no affine): the output is bounded whatever the
    input. Unnormalised, the output grows linearly far from the data, and so does the difference of
    two such score nets: VSD on ring8 pushed the generator's tail outward, where the teacher's score
    pointed outward too, and diverged at step 77 (|x| 3 -> 37 in two steps, fake-score loss 0.6 ->
    1e18); with the norm it trains (README, "Measured on the toy suite")."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.SiLU()]
    layers += [nn.LayerNorm(hidden, elementwise_affine=False), nn.Linear(hidden, out_dim)]
    return nn.Sequential(*layers)


class MLPGenerator(nn.Module):
    """One-step generator x = g(z) [B, D] from z [B, latent_dim]."""

    def __init__(self, latent_dim: int, out_dim: int, hidden: int, depth: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = _mlp(latent_dim, hidden, depth, out_dim)

    def forward(self, z: torch.Tensor, class_labels=None) -> torch.Tensor:
        return self.net(z)


class SigmaMLP(nn.Module):
    """f(c_in x, fourier(c_noise)) with EDM input preconditioning; base of the ratio net and the denoiser.
    The toy task is unconditional: the class/augmentation label arguments of the image nets are
    accepted for a common call signature and unused."""

    def __init__(self, dim: int, out_dim: int, hidden: int, depth: int, sigma_data: float, schedule: str, n_freq: int = 8):
        super().__init__()
        self.sigma_data = sigma_data
        self.schedule = schedule
        # Fixed log-spaced frequencies: c_noise spans about [-1.5, 0.5] over the sigma range we train on.
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32) / 4)
        self.net = _mlp(dim + 2 * n_freq, hidden, depth, out_dim)

    def features(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The MLP's input [B, D + 2 n_freq]: c_in x and the Fourier features of c_noise."""
        alpha, std = noise_coefficients(sigma, self.schedule)
        c_in = torch.rsqrt((alpha * self.sigma_data) ** 2 + std**2)
        angles = (torch.log(sigma) / 4)[:, None] * self.freqs.to(x.dtype)
        return torch.cat([c_in[:, None] * x, torch.sin(angles), torch.cos(angles)], dim=1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None, augment_labels=None) -> torch.Tensor:
        return self.net(self.features(x, sigma))


class MLPRatio(SigmaMLP):
    """Ratio network: logit l(x_t, sigma) [B] of "real" (log p/q at the optimum)."""

    def __init__(self, dim: int, hidden: int, depth: int, sigma_data: float, schedule: str):
        super().__init__(dim, 1, hidden, depth, sigma_data, schedule)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None, augment_labels=None) -> torch.Tensor:
        return super().forward(x, sigma).squeeze(1)

    @torch.no_grad()
    def load_trunk(self, denoiser: SigmaMLP) -> None:
        """Start from a fitted denoiser's hidden layers (the toy analogue of the ratio UNet starting
        from the teacher's encoder); the scalar head stays fresh."""
        for mine, theirs in zip(self.net[:-1], denoiser.net[:-1]):
            if isinstance(mine, nn.Linear):
                mine.weight.copy_(theirs.weight)
                mine.bias.copy_(theirs.bias)


class MLPDenoiser(SigmaMLP):
    """EDM-preconditioned denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) [B, D] of
    x = x0 + sigma n (Karras et al. 2022, Eq. 7 and Table 1), EDM's Precond interface: the toy teacher,
    and, through ``fastratio.networks.from_denoiser``, the generator and the scores, as on images.
    At sigma_init = 2.5 the generator's output is 0.14 x + 0.93 F; a noise predictor (x - sigma F)
    would have to cancel its input 2.5 z to within the modes' widths (README, "Measured on the toy
    suite": it left spiral6 at 2.6-3.1x an exact sample's energy distance, 1.6-1.8x with this)."""

    def __init__(self, dim: int, hidden: int, depth: int, sigma_data: float):
        super().__init__(dim, dim, hidden, depth, sigma_data, "ve")

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None, augment_labels=None) -> torch.Tensor:
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data * torch.rsqrt(sigma**2 + sd2)
        return c_skip[:, None] * x + c_out[:, None] * super().forward(x, sigma)
