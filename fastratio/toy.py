"""Exact toy suite: Gaussian mixtures whose noised densities, scores and DiKL gradients are closed-form.

Noising a mixture sum_k pi_k N(mu_k, S_k) by x_t = alpha x0 + std eps gives
sum_k pi_k N(alpha mu_k, alpha^2 S_k + std^2 I), so log p_sigma(x) and its score are exact for every
sigma. A generator whose output is itself a mixture (``MixtureGenerator``) has an exact q_sigma too,
which gives the exact DiKL direction w(sigma) (grad log q_sigma - grad log p_sigma) ("Towards..." Eq. 2)
against which learned ratio and score estimators are measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .noise import noise_coefficients


@dataclass
class GaussianMixture:
    means: torch.Tensor  # [K, D]
    covs: torch.Tensor  # [K, D, D]
    weights: torch.Tensor  # [K], sums to 1

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> GaussianMixture:
        return GaussianMixture(*(t.to(device=device, dtype=dtype) for t in (self.means, self.covs, self.weights)))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact samples [n, D]."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, device=self.means.device, dtype=self.means.dtype)
        chol = torch.linalg.cholesky(self.covs)
        return self.means[k] + (chol[k] @ z.unsqueeze(-1)).squeeze(-1)

    def _noised_components(self, sigma: torch.Tensor, schedule: str) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, std = noise_coefficients(sigma, schedule)
        eye = torch.eye(self.dim, device=self.means.device, dtype=self.means.dtype)
        means = alpha[:, None, None] * self.means  # [B, K, D]
        covs = alpha[:, None, None, None] ** 2 * self.covs + std[:, None, None, None] ** 2 * eye  # [B, K, D, D]
        return means, covs

    def log_prob_and_score(
        self, x: torch.Tensor, sigma: torch.Tensor, schedule: str = "ve"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log p_sigma(x) [B] and grad_x log p_sigma(x) [B, D], each row at its own sigma [B]."""
        means, covs = self._noised_components(sigma, schedule)
        chol = torch.linalg.cholesky(covs)
        diff = (x[:, None, :] - means).unsqueeze(-1)  # [B, K, D, 1]
        solved = torch.cholesky_solve(diff, chol).squeeze(-1)  # C^{-1} (x - m)   [B, K, D]
        maha = (diff.squeeze(-1) * solved).sum(-1)
        log_det = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        log_comp = torch.log(self.weights) - 0.5 * (maha + log_det + self.dim * math.log(2 * math.pi))  # [B, K]
        log_p = torch.logsumexp(log_comp, dim=1)
        resp = torch.softmax(log_comp, dim=1)
        score = -(resp.unsqueeze(-1) * solved).sum(1)
        return log_p, score

    def log_prob(self, x: torch.Tensor, sigma: torch.Tensor, schedule: str = "ve") -> torch.Tensor:
        return self.log_prob_and_score(x, sigma, schedule)[0]

    def score(self, x: torch.Tensor, sigma: torch.Tensor, schedule: str = "ve") -> torch.Tensor:
        return self.log_prob_and_score(x, sigma, schedule)[1]


def _isotropic(means: list[list[float]], std: float) -> GaussianMixture:
    m = torch.tensor(means, dtype=torch.float64)
    k, d = m.shape
    return GaussianMixture(m, torch.eye(d, dtype=torch.float64).expand(k, d, d) * std**2, torch.full((k,), 1.0 / k, dtype=torch.float64))


def ring8(radius: float = 2.0, std: float = 0.1) -> GaussianMixture:
    angles = [2 * math.pi * i / 8 for i in range(8)]
    return _isotropic([[radius * math.cos(a), radius * math.sin(a)] for a in angles], std)


def grid25(spacing: float = 1.0, std: float = 0.05) -> GaussianMixture:
    return _isotropic([[spacing * i, spacing * j] for i in range(-2, 3) for j in range(-2, 3)], std)


def aniso3() -> GaussianMixture:
    """Three elongated, rotated components with unequal weights."""
    means = torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]], dtype=torch.float64)
    covs = []
    for angle, (a, b) in zip((0.3, -0.8, 1.4), ((0.5, 0.05), (0.3, 0.08), (0.6, 0.04))):
        rot = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=torch.float64)
        covs.append(rot @ torch.diag(torch.tensor([a**2, b**2], dtype=torch.float64)) @ rot.T)
    return GaussianMixture(means, torch.stack(covs), torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))


MIXTURES = {"ring8": ring8, "grid25": grid25, "aniso3": aniso3}


class MixtureGenerator(nn.Module):
    """A generator whose output law is an exact Gaussian mixture: x = mu_k + L_k z, k ~ pi, z ~ N(0, I).

    Means and Cholesky factors are parameters, so its exact DiKL gradient is available in closed form.
    """

    def __init__(self, init: GaussianMixture):
        super().__init__()
        self.means = nn.Parameter(init.means.clone())
        chol = torch.linalg.cholesky(init.covs)
        self.log_diag = nn.Parameter(torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).clone())
        self.off_diag = nn.Parameter(torch.tril(chol, diagonal=-1).clone())
        self.register_buffer("weights", init.weights.clone())

    def cholesky(self) -> torch.Tensor:
        return torch.tril(self.off_diag, diagonal=-1) + torch.diag_embed(torch.exp(self.log_diag))

    def mixture(self) -> GaussianMixture:
        chol = self.cholesky()
        return GaussianMixture(self.means, chol @ chol.transpose(-1, -2), self.weights)

    def forward(self, component: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """component [B] (long), z [B, D] -> x [B, D]."""
        return self.means[component] + (self.cholesky()[component] @ z.unsqueeze(-1)).squeeze(-1)


def exact_dikl_direction(
    x_t: torch.Tensor, sigma: torch.Tensor, q: GaussianMixture, p: GaussianMixture, weight_sigma: torch.Tensor, schedule: str = "ve"
) -> torch.Tensor:
    """Exact DiKL generator direction w(sigma) (grad log q_sigma - grad log p_sigma)(x_t) [B, D] (Eq. 2)."""
    return weight_sigma[:, None] * (q.score(x_t, sigma, schedule) - p.score(x_t, sigma, schedule))


def exact_log_ratio(x_t: torch.Tensor, sigma: torch.Tensor, q: GaussianMixture, p: GaussianMixture, schedule: str = "ve") -> torch.Tensor:
    """The optimal ratio-classifier logit l* = log p_sigma(x) - log q_sigma(x) [B]."""
    return p.log_prob(x_t, sigma, schedule) - q.log_prob(x_t, sigma, schedule)


# --- metrics ------------------------------------------------------------------------------------

def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Squared energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (V-statistic, so >= 0)."""
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def mode_coverage(samples: torch.Tensor, mixture: GaussianMixture, n_std: float = 3.0, min_share: float = 0.2) -> dict:
    """Assign each sample to its nearest component (Mahalanobis); a sample is high quality when it lies
    within n_std of it, a mode is covered when it gets at least min_share of its expected count.
    Returns {"modes_covered", "modes", "high_quality"}."""
    samples = samples.to(mixture.means)
    zero = torch.zeros(samples.shape[0], dtype=samples.dtype, device=samples.device)
    means, covs = mixture._noised_components(zero, "ve")
    diff = (samples[:, None, :] - means).unsqueeze(-1)
    maha = (diff * torch.linalg.solve(covs, diff)).sum((-1, -2)).sqrt()  # [N, K]
    dist, nearest = maha.min(dim=1)
    good = dist <= n_std
    counts = torch.bincount(nearest[good], minlength=len(mixture.weights)).double()
    expected = mixture.weights * samples.shape[0]
    return {
        "modes_covered": int((counts >= min_share * expected).sum()),
        "modes": len(mixture.weights),
        "high_quality": float(good.double().mean()),
    }


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors flattened to vectors."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))
