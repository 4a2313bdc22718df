import math

import pytest
import torch

from fastratio.config import NoiseConfig
from fastratio.draws import Draws
from fastratio.noise import add_noise, loss_weight, noise_coefficients, sample_sigma


@pytest.mark.parametrize(
    "cfg, log_mean, log_std",
    [
        (NoiseConfig(sigma_dist="lognormal", p_mean=-1.2, p_std=1.2), -1.2, 1.2),
        (NoiseConfig(sigma_dist="loguniform", sigma_min=0.01, sigma_max=10.0), 0.5 * math.log(0.1), math.log(1000) / math.sqrt(12)),
    ],
)
def test_sigma_distributions_have_the_right_log_moments(cfg, log_mean, log_std):
    s = sample_sigma(cfg, 200_000, Draws(torch.Generator().manual_seed(0)), torch.device("cpu")).double().log()
    assert float(s.mean()) == pytest.approx(log_mean, abs=0.02)
    assert float(s.std()) == pytest.approx(log_std, abs=0.02)


def test_fixed_and_uniform_sigma():
    rng = Draws(torch.Generator().manual_seed(0))
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


def test_teacher_sigma_laws_are_edms_table_1():
    from fastratio.noise import teacher_sigma

    g = Draws(torch.Generator().manual_seed(0))
    sigma, weight = teacher_sigma("edm", 200_000, g, torch.device("cpu"), sigma_data=0.5)
    assert abs(float(sigma.log().mean()) + 1.2) < 0.01 and abs(float(sigma.log().std()) - 1.2) < 0.01
    torch.testing.assert_close(weight, (sigma**2 + 0.25) / (sigma * 0.5) ** 2)
    # The law scales with the data: for sigma_data = 1 (the toy) sigma / 2 has EDM's law.
    sigma, weight = teacher_sigma("edm", 200_000, g, torch.device("cpu"), sigma_data=1.0)
    assert abs(float((sigma / 2).log().mean()) + 1.2) < 0.01 and abs(float(sigma.log().std()) - 1.2) < 0.01
    torch.testing.assert_close(weight, (sigma**2 + 1) / sigma**2)
    sigma, weight = teacher_sigma("ve", 200_000, g, torch.device("cpu"), sigma_data=0.5)
    assert sigma.min() >= 0.02 and sigma.max() <= 100
    # log-uniform: log sigma uniform on [log 0.02, log 100], mean at the midpoint
    assert abs(float(sigma.log().mean()) - 0.5 * (math.log(0.02) + math.log(100))) < 0.02
    torch.testing.assert_close(weight, sigma**-2)
    sigma, weight = teacher_sigma("vp", 200_000, g, torch.device("cpu"), sigma_data=0.5)
    # VP: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) for t ~ U(1e-5, 1)
    t_max, t_min = 1.0, 1e-5
    assert float(sigma.max()) <= math.sqrt(math.exp(19.9 / 2 + 0.1) - 1) + 1e-3
    assert float(sigma.min()) >= math.sqrt(math.exp(19.9 / 2 * t_min**2 + 0.1 * t_min) - 1) - 1e-6
    t = torch.sqrt(0.1**2 + 2 * 19.9 * torch.log1p(sigma.double() ** 2)) / 19.9 - 0.1 / 19.9  # sigma^-1(sigma)
    assert abs(float(t.mean()) - 0.5 * (t_max + t_min)) < 0.01  # t is uniform
    torch.testing.assert_close(weight, sigma**-2)


class _ExtremeDraws:
    """Uniforms at exactly 0 and just below 1 (torch.rand's range is [0, 1)) and normals at +-8 std."""

    def rand(self, shape, device, dtype=torch.float32):
        return torch.tensor([0.0, 1.0 - 2**-24, 0.5], dtype=dtype).expand(shape[0] // 3, 3).reshape(shape)

    def randn(self, shape, device, dtype=torch.float32):
        return torch.tensor([-8.0, 8.0, 0.0], dtype=dtype).expand(shape[0] // 3, 3).reshape(shape)


@pytest.mark.parametrize("dist", ["lognormal", "loguniform", "uniform"])
def test_sample_sigma_is_finite_and_positive_at_the_ends_of_the_draws(dist):
    sigma = sample_sigma(NoiseConfig(sigma_dist=dist, sigma_min=0.002, sigma_max=80.0), 6, _ExtremeDraws(), torch.device("cpu"))
    assert torch.isfinite(sigma).all() and (sigma > 0).all()


@pytest.mark.parametrize("loss", ["edm", "vp", "ve"])
def test_teacher_sigma_and_weight_are_finite_at_the_ends_of_the_draws(loss):
    from fastratio.noise import teacher_sigma

    sigma, weight = teacher_sigma(loss, 6, _ExtremeDraws(), torch.device("cpu"), sigma_data=0.5)
    assert torch.isfinite(sigma).all() and (sigma > 0).all() and torch.isfinite(weight).all()
