import math

import pytest
import torch

from fastratio.config import NoiseConfig
from fastratio.noise import add_noise, loss_weight, noise_coefficients, sample_sigma


@pytest.mark.parametrize(
    "cfg, log_mean, log_std",
    [
        (NoiseConfig(sigma_dist="lognormal", p_mean=-1.2, p_std=1.2), -1.2, 1.2),
        (NoiseConfig(sigma_dist="loguniform", sigma_min=0.01, sigma_max=10.0), 0.5 * math.log(0.1), math.log(1000) / math.sqrt(12)),
    ],
)
def test_sigma_distributions_have_the_right_log_moments(cfg, log_mean, log_std):
    s = sample_sigma(cfg, 200_000, torch.Generator().manual_seed(0), torch.device("cpu")).double().log()
    assert float(s.mean()) == pytest.approx(log_mean, abs=0.02)
    assert float(s.std()) == pytest.approx(log_std, abs=0.02)


def test_fixed_and_uniform_sigma():
    rng = torch.Generator().manual_seed(0)
    assert (sample_sigma(NoiseConfig(sigma_dist="fixed", sigma_fixed=2.5), 5, rng, torch.device("cpu")) == 2.5).all()
    u = sample_sigma(NoiseConfig(sigma_dist="uniform", sigma_min=0.5, sigma_max=1.5), 100_000, rng, torch.device("cpu"))
    assert 0.5 <= float(u.min()) and float(u.max()) <= 1.5 and float(u.mean()) == pytest.approx(1.0, abs=0.01)


def test_ve_and_vp_noising():
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    x0, eps = torch.ones(2, 3, dtype=torch.float64), torch.full((2, 3), 2.0, dtype=torch.float64)
    torch.testing.assert_close(add_noise(x0, sigma, eps, "ve"), 1 + 2 * sigma[:, None].expand(2, 3))
    alpha, std = noise_coefficients(sigma, "vp")
    torch.testing.assert_close(alpha**2 + std**2, torch.ones(2, dtype=torch.float64))  # variance preserving
    torch.testing.assert_close(std / alpha, sigma)  # same noise-to-signal ratio as VE
    torch.testing.assert_close(loss_weight(sigma, "sigma2"), sigma**2)
    torch.testing.assert_close(loss_weight(sigma, "edm", 0.5), (sigma**2 + 0.25) / (sigma * 0.5) ** 2)
