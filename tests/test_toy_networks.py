"""The toy generator and ratio net started from the teacher, as on images (Stage 1 -> Stage 2)."""

import torch

from fastratio import config
from fastratio.networks.mlp import MLPDenoiserGenerator, MLPRatio, MLPScore
from fastratio.noise import noise_coefficients
from fastratio.tasks.toy2d import Toy2DTask, needs_teacher


def _score(seed: int) -> MLPScore:
    torch.manual_seed(seed)
    return MLPScore(2, 32, 3, 1.0, "ve")


def test_generator_is_the_teachers_one_step_denoiser():
    """g(z) = x + sigma^2 s(x, sigma) at x = sigma_init z (VE Tweedie), with the teacher's weights."""
    teacher, sigma_init = _score(0), 2.5
    gen = MLPDenoiserGenerator(_score(1), sigma_init)
    gen.load_teacher(teacher)
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(2))
    sigma = torch.full((16,), sigma_init)
    with torch.no_grad():
        expected = sigma_init * z + sigma_init**2 * teacher(sigma_init * z, sigma)
        torch.testing.assert_close(gen(z), expected)
    # VP: x = std z, x0_hat = (x + std^2 s) / alpha.
    vp_teacher = MLPScore(2, 32, 3, 1.0, "vp")
    gen_vp = MLPDenoiserGenerator(MLPScore(2, 32, 3, 1.0, "vp"), sigma_init)
    gen_vp.load_teacher(vp_teacher)
    alpha, std = noise_coefficients(sigma, "vp")
    with torch.no_grad():
        x = std[:, None] * z
        torch.testing.assert_close(gen_vp(z), (x + std[:, None] ** 2 * vp_teacher(x, sigma)) / alpha[:, None])


def test_ratio_net_starts_from_the_teachers_trunk_with_a_fresh_head():
    teacher = _score(0)
    torch.manual_seed(5)
    ratio = MLPRatio(2, 32, 3, 1.0, "ve")
    head = ratio.net[-1].weight.clone()
    ratio.load_trunk(teacher)
    for mine, theirs in zip(ratio.net[:-1], teacher.net[:-1]):
        for a, b in zip(mine.parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(ratio.net[-1].weight, head)
    # The hidden features now equal the teacher's at any input.
    x, sigma = torch.randn(8, 2), torch.rand(8) + 0.1
    hidden = lambda net: net.net[:-1](torch.cat([x * torch.rsqrt(1 + sigma**2)[:, None],
                                                  torch.sin(torch.log(sigma)[:, None] / 4 * net.freqs),
                                                  torch.cos(torch.log(sigma)[:, None] / 4 * net.freqs)], 1))
    torch.testing.assert_close(hidden(ratio), hidden(teacher))


def test_which_toy_runs_fit_a_teacher_and_the_ratio_net_width():
    base = ["model.score_hidden=24", "model.ratio_hidden=40"]
    cfg = config.load(None, base)
    nets = Toy2DTask(cfg, torch.device("cpu")).build_networks()
    assert needs_teacher(cfg) and nets.teacher is not None and nets.fake_score is None
    assert isinstance(nets.generator, MLPDenoiserGenerator) and nets.ratio.net[0].out_features == 24  # the teacher's width
    cfg = config.load(None, [*base, "model.generator_from_teacher=false", "model.ratio_from_teacher=false"])
    nets = Toy2DTask(cfg, torch.device("cpu")).build_networks()
    assert not needs_teacher(cfg) and nets.teacher is None and nets.ratio.net[0].out_features == 40
    assert not isinstance(nets.generator, MLPDenoiserGenerator)
