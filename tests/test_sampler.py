"""EDM Heun sampler against a case with an exact answer: Gaussian data, exact denoiser."""

import torch

from fastratio.sampler import heun_sample, sigma_steps


def test_sigma_steps_are_edms():
    s = sigma_steps(18)
    assert s.shape == (19,) and s[-1] == 0
    torch.testing.assert_close(s[0], torch.tensor(80.0, dtype=torch.float64))
    torch.testing.assert_close(s[-2], torch.tensor(0.002, dtype=torch.float64))
    assert (s[:-1] > s[1:]).all()


def test_heun_maps_noise_to_the_gaussian_data_distribution():
    """Data N(mu, s^2) per pixel: D(x; sigma) = mu + s^2/(s^2 + sigma^2) (x - mu) is the exact denoiser,
    and the probability-flow ODE has a closed-form solution to compare each sample with."""
    mu, s = 0.3, 0.5

    def denoiser(x, sigma, labels=None):
        var = sigma.reshape(-1, 1, 1, 1) ** 2
        return mu + s**2 / (s**2 + var) * (x - mu)

    z = torch.randn(512, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    # Exact flow: x(sigma) - mu scales as sqrt(s^2 + sigma^2); started at z * sigma_max.
    exact = mu + (z * 80.0 - mu) * s / (s**2 + 80.0**2) ** 0.5
    errors = [float((heun_sample(denoiser, z, num_steps=n) - exact).abs().max()) for n in (32, 64, 128)]
    assert errors[2] < 3e-3
    # Second order: doubling the steps divides the error by about 4 (Euler would give 2).
    assert errors[1] / errors[0] < 0.3 and errors[2] / errors[1] < 0.3, errors
